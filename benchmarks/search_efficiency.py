"""Search efficiency: how many measurements each sampler needs to find the true Pareto front.

On a built-in task small enough to enumerate (digits-mlp, 3 layers; ``--space wide``: 17 choices
per layer, 4913 configs, the default; ``--space small``: 9 choices, 729 configs), every config is
measured once (cached under the autoquant cache directory) to get the true accuracy / size front.
Then random, NSGA-II, TPE and the predictor-guided sampler each run through the real search driver
(Optuna study on SQLite, the same code as ``autoquant search``), with measurement replaced by a
lookup into the table of real measurements, for several seeds. Printed:

- hypervolume of each sampler's measured front as a ratio to the true front's, at each budget
  (reference point: the true front's nadir);
- IGD+ to the true front (objectives scaled to [0, 1] over the whole space);
- measurements needed to reach 95% and 99% of the true hypervolume, and those counts as ratios
  (random / guided, NSGA-II / guided, TPE / guided), medians over seeds;
- the accuracy predictor's Kendall tau (and Spearman, MAE, front recall) on held-out configs
  after 16, 32, 64 and 128 random training configs.

The guided sampler also uses per-layer sensitivity (on calibration inputs, never on the
evaluation data): O(layers) model passes, a float32 reference, a curvature pass (forward + a few
backward probes) and one or two single-layer quantized passes per layer, the other choices'
figures interpolated. Its cost (passes by kind, seconds, and how many figures were measured,
interpolated or estimated) is printed beside the counts, and the ratios are also given with the
single-layer quantized passes added to guided's count as if each were a measurement.

    python benchmarks/search_efficiency.py --quick             # < 10 minutes on 2 cores
    python benchmarks/search_efficiency.py --space small --json results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SPACES = {
    # 9 choices per layer, 729 configs
    "small": """\
version: 1
description: fp32, or 2/3/4/8-bit per-channel weights with float32 or uint8 activations
rules:
  - match: {}
    weight_bits: [2, 3, 4, 8, 32]
    act_bits: [8, 32]
    granularity: [per_channel]
    symmetric: [true]
""",
    # 17 choices per layer, 4913 configs: per-tensor scales as well
    "wide": """\
version: 1
description: fp32, or 2/3/4/8-bit per-tensor or per-channel weights, float32 or uint8 activations
rules:
  - match: {}
    weight_bits: [2, 3, 4, 8, 32]
    act_bits: [8, 32]
    granularity: [per_tensor, per_channel]
    symmetric: [true]
""",
}
SPEC_YAML = """\
version: 1
name: search-efficiency
task: digits-mlp
space: space.yaml
objectives: [accuracy, size]
search: {sampler: random, trials: 200, seed: 0, population_size: 20}
"""
SAMPLERS = ("random", "nsga2", "tpe", "guided")
DIRECTIONS = ("maximize", "minimize")
GROUND_TRUTH_VERSION = 1


class TableEvaluator:
    """The real evaluator's interface, answering ``measure`` from the table of real
    measurements of every config."""

    def __init__(self, real: Any, table: dict[str, dict[str, Any]]) -> None:
        self.real = real
        self.table = table
        self.calls = 0
        self.task = real.task
        self.layers = real.layers
        self.calibration = real.calibration
        self.other_param_bytes = real.other_param_bytes
        self.batch_size = real.batch_size

    def costs(self, config):
        return self.real.costs(config)

    def measure(self, config):
        from autoquant.measurement import Figure, Measurement

        self.calls += 1
        row = self.table[config.hash]
        figures = tuple((k, Figure.from_dict(v)) for k, v in row["figures"].items())
        return Measurement(config.hash, figures, duration_s=row["duration_s"])


def _ground_truth_key(run: Any) -> str:
    """Changes when the model's weights, the calibration inputs or the space's choices change
    (the digest the table has been cached under since its first version)."""
    import hashlib

    from autoquant.model_inputs import fingerprint_bytes, is_named

    digest = hashlib.sha256(b"v1")
    for name, tensor in sorted(run.task.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    inputs = run.task.calibration_inputs
    if is_named(inputs):
        digest.update(fingerprint_bytes(inputs))
    else:
        digest.update(inputs.detach().float().cpu().contiguous().numpy().tobytes())
    for ls in run.space.layers:
        digest.update(ls.layer.name.encode())
        digest.update(",".join(c.label for c in ls.choices).encode())
    return digest.hexdigest()[:16]


def ground_truth(run: Any, cache: Path) -> tuple[dict[str, dict[str, Any]], float]:
    """Every config's real measurement, from the cache when its fingerprint matches."""
    key = _ground_truth_key(run)
    key += f"-cal{run.spec.evaluation.calibration_samples}-bs{run.spec.evaluation.batch_size}"
    path = cache / f"search_efficiency-{key}.json"
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("_type") == "BenchmarkGroundTruth" and data.get("_version") == 1:
            return data["_data"]["rows"], data["_data"]["seconds"]
    start = time.perf_counter()
    rows = {}
    for config in run.space.all_configs():
        m = run.evaluator.measure(config)
        rows[config.hash] = {
            "config": config.to_json(),
            "figures": m.figures_dict(),
            "duration_s": m.duration_s,
        }
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"_type": "BenchmarkGroundTruth", "_version": GROUND_TRUTH_VERSION}
    record["_data"] = {"rows": rows, "seconds": seconds}
    path.write_text(json.dumps(record))
    return rows, seconds


def _values(rows: list[dict[str, Any]]) -> np.ndarray:
    return np.array(
        [[r["figures"]["accuracy"]["value"], r["figures"]["size_bytes"]["value"]] for r in rows],
        dtype=float,
    )


def igd_plus(front: np.ndarray, found: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """IGD+ (Ishibuchi et al. 2015) of ``found`` to the true ``front``, in loss space scaled by
    the space's range of each objective."""
    from autoquant.pareto import to_loss

    span = np.where(hi - lo > 0, hi - lo, 1.0)
    z = (to_loss(front, DIRECTIONS) - lo) / span
    a = (to_loss(found, DIRECTIONS) - lo) / span
    d = np.sqrt((np.clip(a[None, :, :] - z[:, None, :], 0, None) ** 2).sum(axis=2))
    return float(d.min(axis=1).mean())


def run_one(base: Any, sampler: str, seed: int, budget: int, table, sens_file: Path | None):
    """One search through the real driver; returns measured values in measurement order."""
    import optuna

    from autoquant.search.driver import run_search

    search = base.spec.search.model_copy(
        update={"sampler": sampler, "seed": seed, "trials": budget}
    )
    spec = base.spec.model_copy(update={"search": search})
    evaluator = TableEvaluator(base.evaluator, table)
    run = dataclasses.replace(base, spec=spec, evaluator=evaluator)
    # The study's SQLite commits dominate a table-lookup trial; on tmpfs they are cheap.
    shm = Path("/dev/shm")
    where = str(shm) if shm.is_dir() else None
    with tempfile.TemporaryDirectory(prefix=f"se-{sampler}-{seed}-", dir=where) as tmp:
        run_dir = Path(tmp)
        if sampler == "guided" and sens_file is not None:
            (run_dir / "predictor").mkdir()
            (run_dir / "predictor" / sens_file.name).write_bytes(sens_file.read_bytes())
        start = time.perf_counter()
        outcome = run_search(run, run_dir)
        seconds = time.perf_counter() - start
        study = optuna.load_study(study_name="autoquant", storage=f"sqlite:///{run_dir}/study.db")
        order = []
        for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
            if t.state.name == "COMPLETE" and "reused_from" not in t.user_attrs:
                order.append(table[t.user_attrs["config_hash"]])
        quality_path = run_dir / "predictor" / "quality.json"
        quality = json.loads(quality_path.read_text()) if quality_path.exists() else None
    return _values(order), seconds, outcome, evaluator.calls, quality


def reach(curve: list[float], level: float) -> int | None:
    for n, value in enumerate(curve, start=1):
        if value >= level:
            return n
    return None


def predictor_quality(run: Any, sensitivity: Any, table, sizes, seeds: int) -> dict[int, Any]:
    from autoquant.predict import AccuracyPredictor, FeatureEncoder, quality

    enc = FeatureEncoder(run.space, sensitivity, other_param_bytes=run.evaluator.other_param_bytes)
    idx = enc.all_indices()
    configs = [enc.config(r) for r in idx]
    acc = np.array([table[c.hash]["figures"]["accuracy"]["value"] for c in configs])
    X = enc.encode_indices(idx)
    size = enc.exact(idx)["size_bytes"]
    out = {}
    for n in sizes:
        rows = []
        for seed in range(seeds):
            perm = np.random.default_rng(1000 + seed).permutation(len(idx))
            train, test = perm[:n], perm[n:]
            model = AccuracyPredictor(feature_names=enc.feature_names, seed=seed)
            model.fit(X[train], acc[train])
            q = quality(model.predict(X[test]).mean, acc[test], size[test][:, None])
            rows.append(q.to_dict())
        out[n] = rows
    return out


def _median(values: list[float | None], cap: float) -> float:
    """Median where ``None`` (not reached) counts as above ``cap``."""
    return float(statistics.median([cap + 1 if v is None else v for v in values]))


def _fmt_n(value: float, cap: int) -> str:
    return f">{cap}" if value > cap else f"{value:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds and budgets (<10 min)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per sampler")
    parser.add_argument("--max-budget", type=int, default=200)
    parser.add_argument("--space", choices=sorted(SPACES), default="wide")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    seeds = args.seeds or (5 if args.quick else 10)
    budgets = [b for b in (20, 30, 50, 75, 100, 150, 200) if b <= args.max_budget]
    if args.quick:
        budgets = [b for b in (20, 50, 100, 200) if b <= args.max_budget]
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    for s in samplers:
        if s not in SAMPLERS:
            parser.error(f"--samplers: {s!r} is not one of {', '.join(SAMPLERS)}")

    import optuna
    import torch
    import xgboost

    from autoquant.pareto import hypervolume, non_dominated_mask, to_loss
    from autoquant.predict.sensitivity import compute_sensitivity
    from autoquant.search.run import prepare
    from autoquant.tasks.digits import cache_dir

    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="se-spec-") as tmp:
        (Path(tmp) / "space.yaml").write_text(SPACES[args.space])
        (Path(tmp) / "spec.yaml").write_text(SPEC_YAML)
        base = prepare(Path(tmp) / "spec.yaml")
    table, gt_seconds = ground_truth(base, cache_dir() / "benchmarks")
    all_values = _values(list(table.values()))
    true_mask = non_dominated_mask(all_values, DIRECTIONS)
    true_front = all_values[true_mask]
    # The usual reference for a known front: its nadir (worst accuracy and largest size among
    # the true front's members), so that hypervolume measures how well the front itself is
    # covered, not the empty region between the front and the worst configs of the space.
    reference = [float(true_front[:, 0].min()), float(true_front[:, 1].max())]
    hv_true = hypervolume(true_front, DIRECTIONS, reference)
    loss_all = to_loss(all_values, DIRECTIONS)
    lo, hi = loss_all.min(axis=0), loss_all.max(axis=0)
    print(
        f"task digits-mlp, {base.space.size} configs ({len(base.space.layers)} layers x "
        f"{len(base.space.layers[0].choices)} choices), every one measured once "
        f"({gt_seconds:.1f} s, then cached); true front {int(true_mask.sum())} configs; hypervolume reference "
        f"= the true front's nadir (accuracy {reference[0]:.4f}, size {reference[1]:.0f} B)"
    )

    sensitivity = compute_sensitivity(base.task, base.space, base.evaluator.calibration)
    sens_passes = sensitivity.probe_passes  # single-layer quantized forward passes
    single_layer_configs = sum(1 for ls in base.space.layers for c in ls.choices if not c.is_fp32)
    with tempfile.TemporaryDirectory(prefix="se-sens-") as tmp:
        sens_file = Path(tmp) / "sensitivity.json"
        sens_file.write_text(json.dumps(sensitivity.to_dict()))
        results: dict[str, list[dict[str, Any]]] = {s: [] for s in samplers}
        for sampler in samplers:
            for seed in range(seeds):
                values, seconds, outcome, calls, quality = run_one(
                    base, sampler, seed, args.max_budget, table, sens_file
                )
                curve, igd = [], {}
                for n in range(1, len(values) + 1):
                    curve.append(hypervolume(values[:n], DIRECTIONS, reference) / hv_true)
                for b in budgets:
                    igd[b] = igd_plus(true_front, values[: min(b, len(values))], lo, hi)
                results[sampler].append(
                    {
                        "seed": seed,
                        "measured": len(values),
                        "lookups": calls,
                        "seconds": seconds,
                        "stopped_because": outcome.stopped_because,
                        "hv_ratio_curve": curve,
                        "hv_ratio": {b: curve[min(b, len(curve)) - 1] for b in budgets},
                        "igd_plus": igd,
                        "n95": reach(curve, 0.95),
                        "n99": reach(curve, 0.99),
                        "predictor_quality_in_run": quality,
                    }
                )
                print(
                    f"  {sampler:7s} seed {seed}: {len(values)} measured in {seconds:5.1f} s, "
                    f"hv@{budgets[0]}={curve[min(budgets[0], len(curve)) - 1]:.3f} "
                    f"hv@{budgets[-1]}={curve[-1]:.3f} n95={reach(curve, 0.95)} "
                    f"n99={reach(curve, 0.99)}",
                    flush=True,
                )

    cap = args.max_budget
    print(f"\nhypervolume / true hypervolume, median over {seeds} seeds (min-max):")
    print("  budget " + "".join(f"{s:>22s}" for s in samplers))
    for b in budgets:
        cells = []
        for s in samplers:
            vals = [r["hv_ratio"][b] for r in results[s]]
            cells.append(f"{statistics.median(vals):.4f} ({min(vals):.3f}-{max(vals):.3f})")
        print(f"  {b:6d} " + "".join(f"{c:>22s}" for c in cells))
    print("\nIGD+ to the true front (scaled objectives), median over seeds:")
    print("  budget " + "".join(f"{s:>12s}" for s in samplers))
    for b in budgets:
        cells = [
            f"{statistics.median([r['igd_plus'][b] for r in results[s]]):.4f}" for s in samplers
        ]
        print(f"  {b:6d} " + "".join(f"{c:>12s}" for c in cells))

    summary: dict[str, Any] = {}
    print(
        f"\nmeasurements to reach a share of the true hypervolume, median over seeds "
        f"(>{cap}: not within the budget, counted as {cap + 1}):"
    )
    for level in ("n95", "n99"):
        med = {s: _median([r[level] for r in results[s]], cap) for s in samplers}
        summary[level] = med
        line = "  " + level[1:] + "%: " + ", ".join(f"{s} {_fmt_n(med[s], cap)}" for s in samplers)
        print(line)
        if "guided" in med:
            g = med["guided"]
            ratios = {s: med[s] / g for s in samplers if s != "guided"}
            summary[f"{level}_ratio_to_guided"] = ratios
            print(
                "       ratio to guided: "
                + ", ".join(
                    f"{s}/guided {'>=' if med[s] > cap else ''}{r:.2f}x" for s, r in ratios.items()
                )
            )
            g_sens = g + sens_passes
            ratios_sens = {s: med[s] / g_sens for s in samplers if s != "guided"}
            summary[f"{level}_ratio_to_guided_with_sensitivity"] = ratios_sens
            print(
                f"       counting guided's {sens_passes} sensitivity passes as measurements "
                f"({g_sens:g}): "
                + ", ".join(f"{s}/guided {r:.2f}x" for s, r in ratios_sens.items())
            )
    print(
        f"\nsensitivity: {sensitivity.forward_passes} model passes on {sensitivity.samples} "
        f"calibration inputs ({', '.join(f'{k} {v}' for k, v in sensitivity.passes.items())}), "
        f"{sensitivity.seconds:.2f} s, computed once per task and space; figures of the "
        f"{single_layer_configs} single-layer configs: "
        + ", ".join(f"{k} {v}" for k, v in sensitivity.sources().items() if v)
    )

    sizes = [16, 32, 64, 128]
    tau = predictor_quality(base, sensitivity, table, sizes, 3 if args.quick else 5)
    print("\naccuracy predictor on held-out configs (random training sets, median over seeds):")
    print("  train  kendall_tau  spearman      MAE  front_recall")
    for n in sizes:
        rows = tau[n]
        med = {
            k: statistics.median([r[k] for r in rows])
            for k in ("kendall_tau", "spearman", "mae", "front_recall")
        }
        print(
            f"  {n:5d}  {med['kendall_tau']:11.3f}  {med['spearman']:8.3f}  {med['mae']:7.4f}"
            f"  {med['front_recall']:12.3f}"
        )
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.0f} s")
    if args.json:
        record = {
            "benchmark": "search_efficiency",
            "task_note": "measure() answered from the table of real measurements",
            "argv": sys.argv[1:] if argv is None else argv,
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "xgboost": xgboost.__version__,
                "optuna": optuna.__version__,
                "machine": platform.machine(),
            },
            "task": "digits-mlp",
            "space": args.space,
            "space_yaml": SPACES[args.space],
            "space_size": base.space.size,
            "ground_truth_seconds": gt_seconds,
            "true_front_size": int(true_mask.sum()),
            "true_hypervolume": hv_true,
            "reference_point": reference,
            "budgets": budgets,
            "seeds": seeds,
            "results": results,
            "summary": summary,
            "sensitivity": {
                "forward_passes": sensitivity.forward_passes,
                "passes": sensitivity.passes,
                "measurements": sens_passes,
                "single_layer_configs": single_layer_configs,
                "samples": sensitivity.samples,
                "sources": sensitivity.sources(),
                "seconds": sensitivity.seconds,
            },
            "predictor_quality": {str(k): v for k, v in tau.items()},
            "elapsed_s": elapsed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1, default=_json_default))
        print(f"wrote {args.json}")
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(type(value))


if __name__ == "__main__":
    sys.exit(main())
