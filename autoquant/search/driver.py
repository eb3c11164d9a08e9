"""The one search loop: ask the proposer, measure what is new, tell the ledger, write as it goes.

``drive`` owns the budget, the time limit, the stop reasons, the references, the answers for
repeats and the progress, for every proposer (``autoquant.search.proposer``) and for both
ledgers: this process's study.db (``LocalLedger``) and a study shared by workers
(``autoquant.search.workers.SharedLedger``).
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoquant.errors import UserError, naming, show
from autoquant.measurement import Measurement
from autoquant.sampler_names import derived_seed
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
from autoquant.search.proposer import Stop
from autoquant.search.run import PreparedRun
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

    def record(self, trial: Any, proposal: Any = None) -> str:
        """Returns "reused", "failed" or "measured" (or what ``admit`` says). A ``proposal``'s
        attributes go to the trial if it is the proposed config (a trial queued by another
        worker may have been asked instead)."""
        import optuna

        run, study = self.run, self.study
        params = {
            ls.layer.name: trial.suggest_categorical(ls.layer.name, [c.label for c in ls.choices])
            for ls in run.space.layers
        }
        config = _config_from_params(run, params)
        trial.set_user_attr("config", config.to_json())
        trial.set_user_attr("config_hash", config.hash)
        if proposal is not None and proposal.config.hash == config.hash:
            for key, value in proposal.attrs.items():
                trial.set_user_attr(key, value)
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


@dataclass(frozen=True)
class BudgetState:
    """Where the budget stands: ``held`` configs count against it; ``finished`` says why the
    search is over (None while it goes on); ``wait``: nothing may be proposed now, but slots
    may come free (a worker's trial that is still running or whose worker died)."""

    held: int
    finished: str | None = None
    wait: bool = False


class LocalLedger:
    """The run directory's study.db, used by this one process (the run directory's owner lock):
    the budget is the measured and failed configs in it."""

    pause_s = 0.0

    def __init__(self, run: PreparedRun, study: Any, recorder: TrialRecorder) -> None:
        self.run, self.study, self.recorder = run, study, recorder
        self.maybe_waiting = True

    def step(self, fn):
        return fn()

    def taken(self) -> set[str]:
        return set()

    def state(self) -> BudgetState:
        r = self.recorder
        held = len(r.measured) + r.n_failed
        if held >= self.run.spec.search.trials:
            return BudgetState(held, "trial budget reached")
        if len(r.measured.keys() | r.failed.keys()) >= self.run.space.size:
            return BudgetState(held, "every config of the space is measured")
        return BudgetState(held)

    def waiting(self) -> bool:
        """Whether trials are queued (references, or ones an interrupted run never asked); asked
        of the storage until the queue is found empty, as nothing else fills it."""
        if self.maybe_waiting:
            self.maybe_waiting = bool(queued_hashes(self.run, self.study))
        return self.maybe_waiting

    def enqueue_references(self) -> None:
        """Queue the references not yet measured, failed or queued."""
        r = self.recorder
        skip = queued_hashes(self.run, self.study) | r.measured.keys() | r.failed.keys()
        for name, config in self.run.references():
            if config.hash not in skip:
                self.study.enqueue_trial(_params_of(config), user_attrs={"reference": name})
                skip.add(config.hash)
        self.maybe_waiting = True


def queued_hashes(run: PreparedRun, study: Any) -> set[str]:
    """Config hashes of the study's WAITING trials (their params are the queued ones)."""
    import optuna

    out = set()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        params = t.system_attrs.get("fixed_params") or t.params
        try:
            out.add(_config_from_params(run, params).hash)
        except KeyError:
            pass  # queued with other layers: asked, it is refused by the ledger's checks
    return out


def sampler_args(run: PreparedRun, seed: int):
    from autoquant.search.samplers import SamplerArgs

    return SamplerArgs(
        seed=seed,
        population_size=run.spec.search.population_size,
        constraints_func=_constraints_func
        if run.spec.constraints.model_dump(exclude_none=True)
        else None,
        spec_file=str(run.spec_path),
    )


def run_search(
    run: PreparedRun,
    run_dir: Path,
    *,
    on_progress: Any = None,
    after_trial: Any = None,
    on_status: Any = None,
    proposer: Any = None,
) -> SearchOutcome:
    """``_run_search``; a failure of the ledger's database names it (a one-line error)."""
    with naming(run_dir / "study.db"):
        return _run_search(
            run,
            run_dir,
            on_progress=on_progress,
            after_trial=after_trial,
            on_status=on_status,
            proposer=proposer,
        )


def _run_search(
    run: PreparedRun,
    run_dir: Path,
    *,
    on_progress: Any = None,
    after_trial: Any = None,
    on_status: Any = None,
    proposer: Any = None,
) -> SearchOutcome:
    """Measure configs until the spec's trial budget (measured + failed configs in the ledger,
    this invocation and earlier ones together) or its time budget (this invocation) is spent.

    ``proposer(SamplerArgs)`` (default: the spec's sampler's factory in the registry) makes
    what proposes the configs.
    ``on_progress(done, total)`` hears the budget's progress; ``after_trial()`` lets the caller
    rewrite result files as the run goes; ``on_status(text)`` hears what a long step before
    the trials is doing (the guided sampler's sensitivity pass).
    """
    from autoquant.search.proposer import LoopContext
    from autoquant.search.samplers import make_proposer

    start = time.monotonic()
    objectives = objectives_for(run.spec.objectives)
    directions = [o.direction for o in objectives]
    storage = sqlite_url(run_dir)
    probe = open_study(storage, directions, None)
    interrupted = fail_interrupted(probe)
    done = entries(probe)
    # A resumed run reseeds past the trials it already has, so a seeded sampler does not replay
    # its first proposals as repeats.
    args = sampler_args(run, derived_seed(run.spec.search.seed, len(done)))
    made = proposer(args) if proposer else make_proposer(run.spec.search.sampler, args)
    study = open_study(storage, directions, made.study_sampler())
    recorder = TrialRecorder(run, study, objectives, done)
    ledger = LocalLedger(run, study, recorder)
    ctx = LoopContext(run, tuple(objectives), recorder, study, run_dir, start, on_status=on_status)
    stopped = drive(ctx, ledger, made, on_progress=on_progress, after_trial=after_trial)
    return SearchOutcome(
        run_dir=run_dir,
        measured=len(recorder.measured),
        failed=recorder.n_failed,
        new_measurements=recorder.new,
        reused=recorder.reused,
        interrupted_before=interrupted,
        stopped_because=stopped,
        elapsed_s=time.monotonic() - start,
    )


def drive(ctx, ledger, proposer, *, on_progress: Any = None, after_trial: Any = None) -> str:
    """The one search loop, for every proposer and ledger (this process's study.db, or a study
    shared by workers): queue the references, let the proposer prepare, then measure a config
    at a time until the budget, the time limit or the proposer says stop; returns why it
    stopped. Queued trials are asked before the proposer is; a repeat is answered from the
    ledger and counted, and ``MAX_CONSECUTIVE_REPEATS`` in a row end the search."""
    settings = ctx.run.spec.search
    ledger.step(ledger.enqueue_references)
    proposer.start(ctx)
    repeats = 0
    stopped = "trial budget reached"
    while True:
        state = ledger.step(ledger.state)
        if on_progress:
            on_progress(state.held, settings.trials)
        if state.finished:
            stopped = state.finished
            break
        if settings.timeout_s is not None and time.monotonic() - ctx.start >= settings.timeout_s:
            stopped = f"time budget of {settings.timeout_s:g} s reached"
            break
        if repeats >= MAX_CONSECUTIVE_REPEATS:
            stopped = f"the sampler proposed only measured configs {repeats} times in a row"
            break
        if state.wait:
            time.sleep(ledger.pause_s)
            continue
        proposal = None
        if not ledger.step(ledger.waiting):
            proposal = proposer.propose(ctx, settings.trials - state.held)
            if isinstance(proposal, Stop):
                stopped = proposal.reason
                break
        result = ledger.step(functools.partial(_one_trial, ctx, proposal))
        if result in ("measured", "failed"):
            repeats = 0
            if after_trial:
                after_trial()
        else:
            repeats += 1
    proposer.finish(ctx)
    return stopped


def _one_trial(ctx, proposal) -> str:
    """Ask the study for a trial and record it; a proposal is named to the study's sampler
    (``proposer.naming_sampler``) for the time its labels are suggested."""
    study = ctx.study
    if proposal is None:
        return ctx.recorder.record(study.ask())
    sampler = study.sampler
    sampler.named = proposal.params()
    try:
        return ctx.recorder.record(study.ask(), proposal)
    finally:
        sampler.named = None


def check_resumable(run: PreparedRun, run_dir: Path, resolved: dict) -> None:
    """A run directory continues only the search it was made for."""
    from autoquant.spec import read_run_spec

    stored_path = run_dir / "spec.yaml"
    if not stored_path.exists():
        return
    stored = read_run_spec(stored_path)
    for key in ("task", "space", "objectives", "constraints", "evaluation"):
        if stored.get(key) != resolved.get(key):
            raise UserError(
                f"bad value: the run directory holds a search with a different {key!r} "
                f"(stored {show(stored.get(key))}); allowed: the same spec, or another --out",
                file=str(run.spec_path),
                key=key,
            )
