"""The predictor-guided search: score a large pool with the accuracy predictor, measure the few
configs most likely to improve the Pareto front, refit, repeat.

Each round:

1. fit the ``AccuracyPredictor`` (bootstrap XGBoost ensemble) on every config measured so far;
2. score a candidate pool: every unmeasured config when the space has at most
   ``GuidedSettings.enumerate_limit`` configs, otherwise ``pool`` random configs plus one- and
   two-layer mutations of the measured front. Cost objectives (size, mean bits, BOPs) are exact,
   from the feature encoder's tables; any other objective figure (a latency model's prediction)
   is asked of ``evaluator.costs`` once per config; accuracy is predicted;
3. pick ``batch`` configs greedily by the hypervolume improvement of their *optimistic* point
   (predicted mean + ``kappa`` x ensemble spread) over the measured front; after each pick its
   predicted-mean point joins the front (a "believer" fantasy) so the batch spreads out. When no
   candidate's optimistic point improves the front, the candidate closest to doing so (smallest
   additive-epsilon gap) is taken;
4. hand them one by one to the search loop (``driver.drive``, as every sampler's proposals),
   which measures them and records a ``predicted`` user attribute: what the predictor said
   before the measurement.

The study stays the ledger: the predictor is refit from it each round, so a resumed run carries on
from what the study holds. The first ``GuidedSettings.initial`` configs are measured before any
predictor exists: the fp32 and int8 references (as every sampler), then configs chosen by the
sensitivity prior alone (greedy hypervolume in summed single-layer output distortion x exact
costs); their ``predicted`` attribute carries no accuracy.

Before all that, the per-layer sensitivity pass (``autoquant.predict.sensitivity``: O(layers)
model passes on calibration inputs) runs once per task and space, within
``GuidedSettings.sensitivity_share`` of the spec's ``timeout_s``; layers it could not probe in
that time get estimated figures and the search goes on. ``on_status(text)`` hears its progress.
Workers sharing a study keep it in the study (``SENSITIVITY_ATTR``), so they compute it once, and
each worker's predictor is fitted on every worker's measurements; a config another worker has
claimed is passed over for the next best.

``run_dir/predictor/`` (single-process searches; workers write nothing) holds the sensitivity cache (``sensitivity.json``), the latest predictor
(``model/``), ``quality.json``: Kendall tau, Spearman, MAE and front recall of the predictions
made before each measurement, i.e. on configs the predictor had not seen, and
``predictions.csv``: predicted beside measured for every measured config (the prediction made
before the measurement where there was one, and a 5-fold out-of-fold prediction for all).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoquant.errors import UserError
from autoquant.predict.record import predicted_columns
from autoquant.rundir import atomic_write, atomic_write_text
from autoquant.sampler_names import derived_seed
from autoquant.search.driver import SearchOutcome
from autoquant.search.ledger import LedgerEntry
from autoquant.search.proposer import LoopContext, Proposal, Stop, naming_sampler
from autoquant.search.run import PreparedRun
from autoquant.space import QuantConfig

PREDICTOR_DIR = "predictor"
# the sensitivity record of a shared study (workers have no run directory to cache it in)
SENSITIVITY_ATTR = "autoquant_sensitivity"


@dataclass(frozen=True, kw_only=True)
class GuidedSettings:
    """Knobs of the guided loop (keyword-only, validated). The defaults were chosen on
    ``benchmarks/search_efficiency.py`` (digits-mlp); ``kappa`` above ~0.25 explored too much there.

    Args:
        initial: configs measured before the first fit (references included).
        batch: configs measured per round, between refits.
        kappa: weight of the ensemble spread in the optimistic accuracy.
        pool: candidates scored per round when the space is too large to enumerate.
        enumerate_limit: spaces up to this many configs are scored whole.
        n_members: ensemble size of the predictor.
        sensitivity_share: the share of the spec's ``timeout_s`` the sensitivity pass may take
            (its deadline; the pass is not limited when the spec has no ``timeout_s``).
    """

    initial: int = 12
    batch: int = 4
    kappa: float = 0.1
    pool: int = 4096
    enumerate_limit: int = 200_000
    n_members: int = 5
    sensitivity_share: float = 0.25

    def __post_init__(self) -> None:
        for name in ("initial", "batch", "pool", "enumerate_limit", "n_members"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.initial < 3:
            raise ValueError(f"initial must be at least 3 to fit a predictor, got {self.initial}")
        if not (math.isfinite(self.kappa) and self.kappa >= 0):
            raise ValueError(f"kappa must be a finite number >= 0, got {self.kappa!r}")
        if not (0 < self.sensitivity_share <= 1):
            raise ValueError(f"sensitivity_share must be in (0, 1], got {self.sensitivity_share!r}")


# --- acquisition (pure functions on arrays, in loss space: every column minimized) -------------


def hypervolume_improvement(
    candidates: np.ndarray, front: np.ndarray, reference: np.ndarray
) -> np.ndarray:
    """Hypervolume each candidate row would add to ``front`` (both in loss space), bounded by
    ``reference``. Exact; vectorized for two objectives, one Optuna hypervolume per candidate
    that is not dominated by the front otherwise."""
    candidates = np.asarray(candidates, dtype=float)
    front = np.asarray(front, dtype=float).reshape(-1, candidates.shape[1])
    reference = np.asarray(reference, dtype=float)
    box = np.prod(np.clip(reference - candidates, 0.0, None), axis=1)
    if len(front) == 0:
        return box
    if candidates.shape[1] == 2:
        f = front[np.argsort(front[:, 0], kind="stable")]
        x = np.minimum(np.maximum(f[None, :, 0], candidates[:, None, 0]), reference[0])
        y = np.minimum(np.maximum(f[None, :, 1], candidates[:, None, 1]), reference[1])
        ymin = np.minimum.accumulate(y, axis=1)
        xnext = np.concatenate([x[:, 1:], np.full((len(x), 1), reference[0])], axis=1)
        covered = ((xnext - x) * (reference[1] - ymin)).sum(axis=1)
        return np.clip(box - covered, 0.0, None)
    from optuna._hypervolume import compute_hypervolume

    inside = front[np.all(front < reference, axis=1)]
    base = float(compute_hypervolume(inside, reference)) if len(inside) else 0.0
    out = np.zeros(len(candidates))
    dominated = np.any(np.all(front[None, :, :] <= candidates[:, None, :], axis=2), axis=1)
    for i in np.flatnonzero(~dominated & (box > 0)):
        pts = np.vstack([inside, candidates[i : i + 1]])
        out[i] = float(compute_hypervolume(pts, reference)) - base
    return np.clip(out, 0.0, None)


def epsilon_gap(candidates: np.ndarray, front: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """How far (in ``scale`` units, along the cheapest objective) each candidate must move to
    leave every front point's dominated region; 0 for candidates no front point dominates."""
    if len(front) == 0:
        return np.zeros(len(candidates))
    diff = (candidates[:, None, :] - front[None, :, :]) / scale  # [n, f, k]
    escape = np.clip(diff.min(axis=2), 0.0, None)  # per front point: cheapest coordinate
    return escape.max(axis=1)


def select_batch(
    mean_loss: np.ndarray,
    optimistic_loss: np.ndarray,
    front: np.ndarray,
    reference: np.ndarray,
    k: int,
) -> list[tuple[int, str, float]]:
    """Greedy batch: up to ``k`` (row, acquisition, score) picks, best first."""
    front = np.asarray(front, dtype=float).reshape(-1, mean_loss.shape[1])
    ideal = np.minimum(optimistic_loss.min(axis=0), front.min(axis=0) if len(front) else np.inf)
    scale = np.where(reference - ideal > 0, reference - ideal, 1.0)
    taken = np.zeros(len(mean_loss), dtype=bool)
    picks: list[tuple[int, str, float]] = []
    for _ in range(min(k, len(mean_loss))):
        hvi = hypervolume_improvement(optimistic_loss, front, reference)
        hvi[taken] = -1.0
        best = int(np.argmax(hvi))
        if hvi[best] > 0:
            picks.append((best, "optimistic_hvi", float(hvi[best] / np.prod(scale))))
        else:
            gap = epsilon_gap(optimistic_loss, front, scale)
            gap[taken] = np.inf
            best = int(np.argmin(gap))
            picks.append((best, "epsilon_gap", float(-gap[best])))
        taken[best] = True
        front = np.vstack([front, mean_loss[best : best + 1]])
    return picks


# --- the loop -----------------------------------------------------------------------------------


class GuidedProposer:
    """The predictor-guided search as a ``Proposer`` of the one search loop
    (``driver.drive``): the sensitivity pass in ``start``, then, once the queued references are
    measured, the sensitivity prior's picks, then predictor batches, a config per ``propose``.
    The loop owns the budget and the ledger (``ctx.recorder``: on a shared study, every
    worker's trials), so each batch is fitted on everything measured so far. A queued config
    another worker measured or claimed meanwhile (``ctx.taken()``) is passed over for the next.
    """

    def __init__(
        self, *, seed: int, spec_file: str | None = None, settings: GuidedSettings | None = None
    ) -> None:
        from autoquant.predict.model import require_xgboost

        try:
            require_xgboost()
        except ImportError as exc:
            raise UserError(
                f"bad value 'guided': {exc}; allowed: install it, or another sampler",
                file=spec_file,
                key="search.sampler",
            ) from None
        self.gs = settings or GuidedSettings()
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.sampler: Any = None
        self.queue: list[Proposal] = []
        # configs passed over because another worker claimed them: kept out of the next pools
        # while their claim stands
        self.passed: dict[str, QuantConfig] = {}
        self.prior_done = False
        self.rounds = 0
        self.cost_cache: dict[tuple[int, ...], dict[str, float]] = {}

    def study_sampler(self) -> Any:
        if self.sampler is None:
            self.sampler = naming_sampler(self.seed)
        return self.sampler

    def start(self, ctx: LoopContext) -> None:
        from autoquant.predict.features import EXACT_FIGURES, FeatureEncoder

        self.ctx, self.run = ctx, ctx.run
        self.objectives = list(ctx.objectives)
        self.directions = [o.direction for o in self.objectives]
        # figures beside accuracy that are not computed from the encoder's tables (predicted
        # latency): asked of the evaluator's ``costs`` once per config and kept
        self.other = [
            o.figure
            for o in self.objectives
            if o.figure != "accuracy" and o.figure not in EXACT_FIGURES
        ]
        self.predictor_dir = ctx.run_dir / PREDICTOR_DIR if ctx.run_dir is not None else None
        sensitivity = _sensitivity(ctx, self.gs, self.predictor_dir)
        if ctx.on_status:
            ctx.on_status("measuring configs")
        evaluator: Any = self.run.evaluator
        self.encoder = FeatureEncoder(
            self.run.space, sensitivity, other_param_bytes=getattr(evaluator, "other_param_bytes", 0)
        )
        # a space is scored whole up to enumerate_limit configs; with a figure that must be
        # asked of the evaluator config by config (latency), only up to the pool size
        limit = self.gs.pool if self.other else self.gs.enumerate_limit
        self.all_idx = self.encoder.all_indices() if self.run.space.size <= limit else None

    def propose(self, ctx: LoopContext, left: int) -> Proposal | Stop:
        while True:
            while self.queue:
                proposal = self.queue.pop(0)
                if self._free(proposal.config.hash):
                    return proposal
                self.passed[proposal.config.hash] = proposal.config
            batch = self._next_batch(left)
            if isinstance(batch, Stop):
                return batch
            self.queue = batch

    def finish(self, ctx: LoopContext) -> None:
        if self.recorder.new and self.predictor_dir is not None:
            _write_quality(self)
            write_predictions(self, self.encoder)

    def _free(self, config_hash: str) -> bool:
        r = self.recorder
        if config_hash in r.measured or config_hash in r.failed:
            return False
        return config_hash not in self.ctx.taken()

    def _next_batch(self, left: int) -> list[Proposal] | Stop:
        """The sensitivity prior's picks the first time (while fewer than ``initial`` configs
        are measured), then a predictor round."""
        if not self.prior_done:
            self.prior_done = True
            want = self.gs.initial - len(self.measured) - len(self.failed)
            if want > 0:
                pool = _pool(self, self.encoder, self.all_idx, self.gs)
                picks = _prior_picks(self, self.encoder, pool, want)
                if picks:
                    return [
                        Proposal(
                            self.encoder.config(row),
                            {"predicted": json.dumps(_prior_record(score))},
                        )
                        for row, score in picks
                    ]
        if self.rounds and self.predictor_dir is not None:
            _write_quality(self)
        return _predictor_round(self, left)

    def costs(self, encoder: Any, pool: np.ndarray) -> dict[str, np.ndarray]:
        """Every objective figure but accuracy, for each pool row: exact ones from the encoder's
        tables, others (a latency model's predictions) from the evaluator's ``costs``. A failed
        figure is NaN."""
        out = encoder.exact(pool)
        if not self.other:
            return out
        evaluator: Any = self.run.evaluator
        for row in pool:
            key = tuple(int(i) for i in row)
            if key not in self.cost_cache:
                figures = dict(evaluator.costs(encoder.config(row)))
                missing = [f for f in self.other if f not in figures]
                if missing:
                    raise UserError(
                        f"bad value {missing[0]!r}: the guided sampler needs every objective "
                        "but accuracy from the evaluator's costs; allowed: accuracy, "
                        f"{', '.join(sorted(figures))}",
                        file=str(self.run.spec_path),
                        key="objectives",
                    )
                self.cost_cache[key] = {f: figures[f].value for f in self.other}
        for f in self.other:
            out[f] = np.array([self.cost_cache[tuple(int(i) for i in r)][f] for r in pool])
        return out

    # The ledger lives in the loop's recorder, which records trials for every sampler.
    @property
    def recorder(self) -> Any:
        return self.ctx.recorder

    @property
    def measured(self) -> dict[str, LedgerEntry]:
        return self.recorder.measured

    @property
    def failed(self) -> dict[str, QuantConfig]:
        return self.recorder.failed

    @property
    def fp32_accuracy(self) -> float | None:
        return self.recorder.fp32_accuracy


def _prior_record(score: float) -> dict[str, Any]:
    return {"accuracy": None, "acquisition": "sensitivity_prior", "score": score}


def _sensitivity(ctx: LoopContext, gs: GuidedSettings, directory: Path | None) -> Any:
    """The per-layer sensitivity pass, within its share of the time budget: cached in the run
    directory's ``predictor/``, or, for workers (no run directory), in the shared study, so the
    workers of a study compute it once (workers starting at the same moment may each compute
    it; the last record written stands, and they are the same)."""
    import tempfile

    from autoquant.predict.sensitivity import FILE_NAME, load_or_compute

    run, settings = ctx.run, ctx.run.spec.search
    deadline = None
    if settings.timeout_s is not None:
        deadline = ctx.start + gs.sensitivity_share * settings.timeout_s

    def compute(folder: Path) -> Any:
        return load_or_compute(
            folder,
            run.task,
            run.space,
            run.evaluator.calibration,
            deadline=deadline,
            status=ctx.on_status,
        )

    if directory is not None:
        return compute(directory)
    storage, study_id = ctx.study._storage, ctx.study._study_id
    stored = storage.get_study_system_attrs(study_id).get(SENSITIVITY_ATTR)
    with tempfile.TemporaryDirectory(prefix="aq-sensitivity-") as folder:
        if stored is not None:
            (Path(folder) / FILE_NAME).write_text(stored)
        result = compute(Path(folder))
    text = json.dumps(result.to_dict(), indent=None, allow_nan=True)
    if text != stored:
        storage.set_study_system_attr(study_id, SENSITIVITY_ATTR, text)
    return result


def _predictor_round(loop: GuidedProposer, left: int) -> list[Proposal] | Stop:
    """Fit the predictor on every measured config and pick the next batch (at most ``left``)."""
    from autoquant.predict.model import AccuracyPredictor

    gs, encoder = loop.gs, loop.encoder
    train = [e for e in _usable(loop) if math.isfinite(e.figures["accuracy"].value)]
    if len(train) < 3:
        return Stop("fewer than 3 successful measurements to fit the predictor")
    pool = _pool(loop, encoder, loop.all_idx, gs)
    if len(pool) == 0:
        return Stop("no unmeasured config meets the constraints")
    predictor = AccuracyPredictor(
        feature_names=encoder.feature_names,
        n_members=gs.n_members,
        seed=derived_seed(loop.run.spec.search.seed, loop.rounds),
    ).fit(
        encoder.encode([e.config for e in train]),
        np.array([e.figures["accuracy"].value for e in train]),
        [e.config_hash for e in train],
    )
    if loop.predictor_dir is not None:
        predictor.save(loop.predictor_dir / "model")
    loop.rounds += 1
    pool, exact = _with_costs(loop, encoder, pool)
    if len(pool) == 0:
        return Stop("no unmeasured config has every cost figure")
    prediction = predictor.predict(encoder.encode_indices(pool))
    picks = _acquire(loop, prediction, exact, min(gs.batch, left))
    return [
        Proposal(
            encoder.config(pool[row]),
            {
                "predicted": json.dumps(
                    {
                        "accuracy": {**prediction.row(row), "source": "predicted"},
                        "acquisition": acquisition,
                        "score": score,
                        "kappa": gs.kappa,
                        "round": loop.rounds,
                        "n_train": predictor.n_train,
                    }
                )
            },
        )
        for row, acquisition, score in picks
    ]


def _acquire(
    loop: GuidedProposer, prediction: Any, exact: dict[str, np.ndarray], k: int
) -> list[tuple[int, str, float]]:
    """``select_batch`` on the pool's predicted (mean and optimistic) and exact figures against
    the measured front."""
    from autoquant.pareto import non_dominated_mask, to_loss

    mean_cols, opt_cols = [], []
    for o in loop.objectives:
        if o.figure == "accuracy":
            mean_cols.append(prediction.mean)
            opt_cols.append(prediction.mean + loop.gs.kappa * prediction.std)
        else:
            mean_cols.append(exact[o.figure])
            opt_cols.append(exact[o.figure])
    mean_values = np.column_stack(mean_cols)
    mean_loss = to_loss(mean_values, loop.directions)
    opt_loss = to_loss(np.column_stack(opt_cols), loop.directions)
    front_values = _measured_front(loop)
    ref_loss = to_loss(_reference(loop, front_values, mean_values)[None, :], loop.directions)[0]
    front_loss = to_loss(front_values, loop.directions)
    if len(front_loss):
        front_loss = front_loss[non_dominated_mask(front_values, loop.directions)]
    return select_batch(mean_loss, opt_loss, front_loss, ref_loss, k)


def _usable(loop: GuidedProposer) -> list[LedgerEntry]:
    """Measured entries whose config belongs to this space."""
    return [e for e in loop.measured.values() if e.config and loop.run.space.contains(e.config)]


def _predictions_quality(loop: GuidedProposer) -> dict[str, Any]:
    """Quality of the predictions recorded before each measurement (held-out by construction)."""
    from autoquant.predict.quality import quality

    pred, meas, rows = [], [], []
    for e in _usable(loop):
        if e.predicted is None:
            continue
        record = json.loads(e.predicted).get("accuracy")
        if not record:
            continue
        pred.append(record["mean"])
        meas.append(e.figures["accuracy"].value)
        rows.append(e)
    costs = [o for o in loop.objectives if o.figure != "accuracy"]
    cost_matrix = None
    if rows and costs:
        cost_matrix = np.array([[e.figures[o.figure].value for o in costs] for e in rows])
    q = quality(
        np.array(pred),
        np.array(meas),
        cost_matrix,
        cost_directions=tuple(o.direction for o in costs),
    )
    return {"held_out": "predicted before measured", **q.to_dict()}


def run_guided(
    run: PreparedRun,
    run_dir: Path,
    *,
    on_progress: Any = None,
    after_trial: Any = None,
    on_status: Any = None,
    guided: GuidedSettings | None = None,
) -> SearchOutcome:
    """``driver.run_search`` with the predictor-guided proposer (``guided``: its knobs)."""
    from autoquant.search.driver import run_search

    return run_search(
        run,
        Path(run_dir),
        on_progress=on_progress,
        after_trial=after_trial,
        on_status=on_status,
        proposer=lambda args: GuidedProposer(
            seed=args.seed, spec_file=args.spec_file, settings=guided
        ),
    )


def write_predictions(loop: GuidedProposer, encoder: Any, *, folds: int = 5) -> Path | None:
    """``predictor/predictions.csv``: for every measured config, the measured accuracy, what the
    predictor said before it was measured (where it did), and an out-of-fold prediction from a
    ``folds``-fold cross-validation over all measured configs, so that every measured config has
    a prediction made without it."""
    import csv

    from autoquant.predict.model import AccuracyPredictor

    usable = [e for e in _usable(loop) if math.isfinite(e.figures["accuracy"].value)]
    if len(usable) < max(folds, 4):
        return None
    usable.sort(key=lambda e: e.number)
    X = encoder.encode([e.config for e in usable])
    y = np.array([e.figures["accuracy"].value for e in usable])
    oof = np.full(len(y), np.nan)
    fold_of = np.arange(len(y)) % folds
    for fold in range(folds):
        test = fold_of == fold
        model = AccuracyPredictor(
            feature_names=encoder.feature_names, n_members=loop.gs.n_members, seed=fold
        ).fit(X[~test], y[~test])
        oof[test] = model.predict(X[test]).mean
    rows = [
        [
            "trial",
            "config_hash",
            "accuracy_measured",
            "accuracy_predicted",
            "accuracy_predicted_std",
            "acquisition",
            f"accuracy_predicted_{folds}fold",
        ]
    ]
    for e, cv in zip(usable, oof):
        cols = predicted_columns(e.predicted)
        rows.append(
            [
                e.number,
                e.config_hash,
                e.figures["accuracy"].value,
                cols["accuracy_predicted"],
                cols["accuracy_predicted_std"],
                cols["acquisition"],
                float(cv),
            ]
        )

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            csv.writer(handle).writerows(rows)

    path = loop.predictor_dir / "predictions.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


def _write_quality(loop: GuidedProposer) -> None:
    figures = _predictions_quality(loop)
    path = loop.predictor_dir / "quality.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(figures, indent=1))


def _with_costs(
    loop: GuidedProposer, encoder: Any, pool: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The pool rows whose every cost figure is finite and within the spec's latency limit (for
    the latency figures that are objectives), and those figures."""
    figures = loop.costs(encoder, pool)
    names = [o.figure for o in loop.objectives if o.figure != "accuracy"]
    if not names or len(pool) == 0:
        return pool, figures
    keep = np.all([np.isfinite(figures[f]) for f in names], axis=0)
    limit = getattr(loop.run.spec.constraints, "max_latency_ms", None)
    if limit is not None:
        for f in names:
            if f.startswith("latency_ms@"):
                keep &= figures[f] <= limit
    if keep.all():
        return pool, figures
    return pool[keep], {k: v[keep] for k, v in figures.items()}


def _measured_front(loop: GuidedProposer) -> np.ndarray:
    """Objective values of the feasible measured configs."""
    rows = []
    for e in loop.measured.values():
        if e.constraints is not None and any(c > 0 for c in e.constraints):
            continue
        values = [e.figures[o.figure].value for o in loop.objectives]
        if all(math.isfinite(v) for v in values):
            rows.append(values)
    return np.array(rows, dtype=float).reshape(-1, len(loop.objectives))


def _reference(loop: GuidedProposer, front: np.ndarray, pool_values: np.ndarray) -> np.ndarray:
    """The worst corner: for accuracy, a tenth of the measured range below the worst measured
    accuracy (or the constraint's floor); for exact costs, just past the worst in the pool."""
    ref = []
    for j, o in enumerate(loop.objectives):
        seen = np.concatenate([front[:, j], pool_values[:, j]]) if o.figure != "accuracy" else None
        if o.figure == "accuracy":
            acc = front[:, j] if len(front) else pool_values[:, j]
            lo, hi = float(np.min(acc)), float(np.max(acc))
            value = lo - 0.1 * (hi - lo) - 1e-9
            drop = loop.run.spec.constraints.max_accuracy_drop
            if drop is not None and loop.fp32_accuracy is not None:
                value = max(value, loop.fp32_accuracy - drop - 1e-9)
        else:
            worst = float(np.max(seen) if o.direction == "minimize" else np.min(seen))
            pad = 0.01 * abs(worst) + 1e-9
            value = worst + pad if o.direction == "minimize" else worst - pad
        ref.append(value)
    return np.array(ref)


def _pool(loop: GuidedProposer, encoder: Any, all_idx: np.ndarray | None, gs: GuidedSettings) -> np.ndarray:
    """Unmeasured candidate rows (choice positions) that meet the exact size constraint."""
    done = [e.config for e in _usable(loop)]
    done += [c for c in loop.failed.values() if loop.run.space.contains(c)]
    if loop.passed:
        taken = loop.ctx.taken()
        loop.passed = {h: c for h, c in loop.passed.items() if h in taken}
        done += [c for h, c in loop.passed.items() if h not in loop.measured]
    seen = {tuple(row) for row in encoder.indices(done)}
    if all_idx is not None:
        if seen:
            codes = np.ravel_multi_index(all_idx.T, encoder.n_choices)
            taken = np.ravel_multi_index(np.array(sorted(seen)).T, encoder.n_choices)
            pool = all_idx[~np.isin(codes, taken)]
        else:
            pool = all_idx
    else:
        parts = [encoder.sample_indices(gs.pool, loop.rng)]
        front = _front_rows(loop, encoder)
        if len(front):
            parents = front[loop.rng.integers(0, len(front), size=gs.pool // 2)]
            mutants = parents.copy()
            for flips in (1, 2):
                rows = np.arange(len(mutants)) if flips == 1 else np.arange(0, len(mutants), 2)
                layers = loop.rng.integers(0, len(encoder.n_choices), size=len(rows))
                highs = np.array(encoder.n_choices)[layers]
                mutants[rows, layers] = loop.rng.integers(0, highs)
            parts.append(mutants)
        pool = np.unique(np.concatenate(parts), axis=0)
        pool = pool[[tuple(r) not in seen for r in pool]]
    limit = loop.run.spec.constraints.max_size_bytes
    if limit is not None and len(pool):
        pool = pool[encoder.exact(pool)["size_bytes"] <= limit]
    return pool


def _prior_picks(
    loop: GuidedProposer, encoder: Any, pool: np.ndarray, k: int
) -> list[tuple[np.ndarray, float]]:
    """Before any accuracy is known: up to ``k`` pool rows chosen greedily by the hypervolume they
    add in (summed single-layer output distortion, exact costs), i.e. with the sensitivity as the
    accuracy estimate. The first lands on the knee of that prior front, the next ones fill its
    gaps. Distortion, not KL: it means the same whatever the output is (logits or embeddings)."""
    from autoquant.pareto import non_dominated_mask, to_loss

    pool, exact = _with_costs(loop, encoder, pool)
    if len(pool) == 0:
        return []
    prior = encoder.encode_indices(pool)[:, encoder.feature_names.index("sum_distortion")]
    costs = [o for o in loop.objectives if o.figure != "accuracy"]
    directions = ["minimize", *(o.direction for o in costs)]
    values = np.column_stack([prior, *(exact[o.figure] for o in costs)])
    on_front = np.flatnonzero(non_dominated_mask(values, directions))
    loss = to_loss(values[on_front], directions)
    reference = loss.max(axis=0) + 1e-6 * (np.abs(loss.max(axis=0)) + 1.0)
    empty = np.zeros((0, loss.shape[1]))
    picks = select_batch(loss, loss, empty, reference, k)
    return [(pool[on_front[row]], score) for row, _, score in picks]


def _front_rows(loop: GuidedProposer, encoder: Any) -> np.ndarray:
    from autoquant.pareto import non_dominated_mask

    entries_ = [
        e
        for e in _usable(loop)
        if all(math.isfinite(e.figures[o.figure].value) for o in loop.objectives)
    ]
    if not entries_:
        return np.zeros((0, len(encoder.n_choices)), dtype=np.int64)
    values = np.array([[e.figures[o.figure].value for o in loop.objectives] for e in entries_])
    mask = non_dominated_mask(values, loop.directions)
    return encoder.indices([e.config for e, m in zip(entries_, mask) if m])
