"""The search loop: ask the sampler, measure what is new, tell the ledger, write as it goes."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoquant.errors import UserError, naming, show
from autoquant.measurement import Measurement
from autoquant.search.ledger import (
    LedgerEntry,
    entries,
    entry_from_trial,
    fail_interrupted,
    is_measured,
    open_study,
    sqlite_url,
)
from autoquant.search.objectives import objectives_for
from autoquant.search.run import PreparedRun
from autoquant.search.samplers import derived_seed, make_sampler
from autoquant.space import QuantConfig

MAX_CONSECUTIVE_REPEATS = 200


@dataclass(frozen=True)
class SearchOutcome:
    run_dir: Path
    measured: int
    failed: int
    new_measurements: int
    reused: int
    interrupted_before: int
    stopped_because: str
    elapsed_s: float


def _constraints(
    run: PreparedRun, figures: dict[str, float], fp32_accuracy: float | None
) -> list[float]:
    """Optuna's convention: a value <= 0 is satisfied."""
    out = []
    limits = run.spec.constraints
    if limits.max_accuracy_drop is not None:
        if fp32_accuracy is None or math.isnan(figures["accuracy"]):
            out.append(0.0)
        else:
            out.append(fp32_accuracy - figures["accuracy"] - limits.max_accuracy_drop)
    if limits.max_size_bytes is not None:
        out.append(figures["size_bytes"] - limits.max_size_bytes)
    if getattr(limits, "max_latency_ms", None) is not None:  # every profile's predicted latency
        out.extend(
            v - limits.max_latency_ms for k, v in figures.items() if k.startswith("latency_ms@")
        )
    return out


def _constraints_func(trial) -> list[float]:
    return list(trial.user_attrs.get("constraints", [0.0]))


def _config_from_params(run: PreparedRun, params: dict[str, str]) -> QuantConfig:
    choices = []
    for layer_space in run.space.layers:
        name = layer_space.layer.name
        choices.append((name, layer_space.by_label()[params[name]]))
    return QuantConfig(tuple(choices))


def _params_of(config: QuantConfig) -> dict[str, str]:
    return {name: choice.label for name, choice in config.choices}


def _fp32_accuracy(done: list[LedgerEntry]) -> float | None:
    for entry in done:
        if entry.reference == "fp32" and entry.state == "COMPLETE":
            return entry.figures["accuracy"].value
    return None


class TrialRecorder:
    """The one place a trial becomes a record in the ledger, for every sampler.

    Takes a trial the sampler just created, suggests each layer's label and stores the config; a
    config measured before is answered from the ledger (``reused_from``), a new one is measured
    and told with its figures and constraints, a failed measurement is told FAIL with its reason.
    """

    def __init__(self, run: PreparedRun, study: Any, objectives, done: list[LedgerEntry]) -> None:
        self.run = run
        self.study = study
        self.objectives = objectives
        self.measured: dict[str, LedgerEntry] = {
            e.config_hash: e
            for e in done
            if e.state == "COMPLETE" and e.reused_from is None and e.config_hash
        }
        self.failed: dict[str, QuantConfig] = {
            e.config_hash: e.config
            for e in done
            if e.state == "FAIL" and is_measured(e) and e.config_hash and e.config
        }
        self.n_failed = sum(1 for e in done if e.state == "FAIL" and is_measured(e))
        self.fp32_accuracy = _fp32_accuracy(done)
        self.new = 0
        self.reused = 0

    def record(self, trial: Any) -> str:
        """Returns "reused", "failed" or "measured"."""
        import optuna

        run, study = self.run, self.study
        params = {
            ls.layer.name: trial.suggest_categorical(ls.layer.name, [c.label for c in ls.choices])
            for ls in run.space.layers
        }
        config = _config_from_params(run, params)
        trial.set_user_attr("config", config.to_json())
        trial.set_user_attr("config_hash", config.hash)
        previous = self.measured.get(config.hash)
        if previous is not None:
            trial.set_user_attr("reused_from", previous.number)
            trial.set_user_attr(
                "figures", json.dumps({k: f.to_dict() for k, f in previous.figures.items()})
            )
            if previous.constraints is not None:
                trial.set_user_attr("constraints", list(previous.constraints))
            study.tell(trial, [previous.figures[o.figure].value for o in self.objectives])
            self.reused += 1
            return "reused"
        refused = self.admit(trial, config)
        if refused is not None:
            return refused
        with self.measuring(trial):
            measurement: Measurement = run.evaluator.measure(config)
        trial.set_user_attr("figures", json.dumps(measurement.figures_dict()))
        self.new += 1
        failure = measurement.failure
        if failure is not None:
            trial.set_user_attr("fail_reason", failure)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self.n_failed += 1
            self.failed[config.hash] = config
            return "failed"
        values = {name: fig.value for name, fig in measurement.figures}
        if trial.user_attrs.get("reference") == "fp32":
            self.fp32_accuracy = values["accuracy"]
        constraints = _constraints(run, values, self.fp32_accuracy)
        if constraints:
            trial.set_user_attr("constraints", constraints)
        frozen = study.tell(trial, [values[o.figure] for o in self.objectives])
        self.measured[config.hash] = entry_from_trial(frozen)
        return "measured"

    def admit(self, trial: Any, config: QuantConfig) -> str | None:
        """Whether a new config may be measured: None to measure it, else what became of the
        trial instead. The embedded ledger has one process: always. Workers sharing a study
        claim the config first (``autoquant.search.workers``)."""
        return None

    def measuring(self, trial: Any):
        """Context held while the config is measured (a worker's heartbeat)."""
        import contextlib

        return contextlib.nullcontext()


def run_search(
    run: PreparedRun,
    run_dir: Path,
    *,
    on_progress: Any = None,
    after_trial: Any = None,
    on_status: Any = None,
) -> SearchOutcome:
    """``_run_search``; a failure of the ledger's database names it (a one-line error)."""
    with naming(run_dir / "study.db"):
        return _run_search(
            run, run_dir, on_progress=on_progress, after_trial=after_trial, on_status=on_status
        )


def _run_search(
    run: PreparedRun,
    run_dir: Path,
    *,
    on_progress: Any = None,
    after_trial: Any = None,
    on_status: Any = None,
) -> SearchOutcome:
    """Measure configs until the spec's trial budget (measured + failed configs in the ledger,
    this invocation and earlier ones together) or its time budget (this invocation) is spent.

    ``on_progress(done, total)`` is called after each trial; ``after_trial()`` lets the caller
    rewrite result files as the run goes; ``on_status(text)`` hears what a long step before
    the trials is doing (the guided sampler's sensitivity pass).
    """
    import optuna

    settings = run.spec.search
    if settings.sampler == "guided":
        from autoquant.search.guided import run_guided

        return run_guided(
            run, run_dir, on_progress=on_progress, after_trial=after_trial, on_status=on_status
        )
    objectives = objectives_for(run.spec.objectives)
    start = time.monotonic()
    storage = sqlite_url(run_dir)
    probe = open_study(storage, [o.direction for o in objectives], None)
    interrupted = fail_interrupted(probe)
    done = entries(probe)
    # A resumed run reseeds past the trials it already has, so a seeded sampler does not replay
    # its first proposals as repeats.
    sampler = make_sampler(
        settings.sampler,
        seed=derived_seed(settings.seed, len(done)),
        population_size=settings.population_size,
        constraints_func=_constraints_func
        if run.spec.constraints.model_dump(exclude_none=True)
        else None,
    )
    study = open_study(storage, [o.direction for o in objectives], sampler)

    recorder = TrialRecorder(run, study, objectives, done)
    measured = recorder.measured
    waiting = {
        _config_from_params(run, t.params).hash
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if t.params
    }
    for name, config in run.references():
        if config.hash not in measured and config.hash not in waiting:
            study.enqueue_trial(_params_of(config), user_attrs={"reference": name})
            waiting.add(config.hash)

    repeats = 0
    stopped = "trial budget reached"
    if on_progress:
        on_progress(len(measured) + recorder.n_failed, settings.trials)
    while len(measured) + recorder.n_failed < settings.trials:
        if settings.timeout_s is not None and time.monotonic() - start >= settings.timeout_s:
            stopped = f"time budget of {settings.timeout_s:g} s reached"
            break
        if len(measured) >= run.space.size:
            stopped = "every config of the space is measured"
            break
        if repeats >= MAX_CONSECUTIVE_REPEATS:
            stopped = f"the sampler proposed only measured configs {repeats} times in a row"
            break
        if recorder.record(study.ask()) == "reused":
            repeats += 1
            continue
        repeats = 0
        if after_trial:
            after_trial()
        if on_progress:
            on_progress(len(measured) + recorder.n_failed, settings.trials)
    return SearchOutcome(
        run_dir=run_dir,
        measured=len(measured),
        failed=recorder.n_failed,
        new_measurements=recorder.new,
        reused=recorder.reused,
        interrupted_before=interrupted,
        stopped_because=stopped,
        elapsed_s=time.monotonic() - start,
    )


def check_resumable(run: PreparedRun, run_dir: Path, resolved: dict) -> None:
    """A run directory continues only the search it was made for."""
    from autoquant.safeyaml import read_mapping

    stored_path = run_dir / "spec.yaml"
    if not stored_path.exists():
        return
    stored = read_mapping(stored_path)
    for key in ("task", "space", "objectives", "constraints", "evaluation"):
        if stored.get(key) != resolved.get(key):
            raise UserError(
                f"bad value: the run directory holds a search with a different {key!r} "
                f"(stored {show(stored.get(key))}); allowed: the same spec, or another --out",
                file=str(run.spec_path),
                key=key,
            )
