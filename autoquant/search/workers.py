"""Workers sharing one study: each asks its sampler, claims the config, measures it under a
heartbeat and tells the shared ledger, until the budget of distinct configs is spent.

The budget counts claims (``autoquant.search.claims``): a measured or failed config holds its
slot for good, a running one until its heartbeat stops; so the workers together measure exactly
``trials`` distinct configs. A worker that finds every slot held waits while some are held by
running trials (their worker may have died: the heartbeat check then frees the slot) and stops
when every held slot is settled and no trial of the study runs.

Workers write nothing outside the storage: ``collect`` (or ``autoquant search`` on the machine
that owns the run directory) turns the shared ledger into the run directory's tables.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoquant.errors import UserError
from autoquant.search.claims import Claims, Outcome
from autoquant.search.driver import (
    MAX_CONSECUTIVE_REPEATS,
    SearchOutcome,
    TrialRecorder,
    _constraints_func,
    _params_of,
)
from autoquant.search.ledger import (
    INTERRUPTED,
    SKIPPED,
    STUDY_NAME,
    entries,
    is_measured,
    sqlite_url,
)
from autoquant.search.objectives import objectives_for
from autoquant.search.run import PreparedRun
from autoquant.storage import (
    StorageSettings,
    check_url,
    open_shared_study,
    open_storage,
    redact,
    retrying,
    spec_fingerprint,
)


@dataclass(frozen=True)
class SharedStudy:
    """A study in a storage several workers may use, opened with heartbeats."""

    url: str  # with the driver, never with a password
    shown: str  # redacted, for every message and file
    study: Any
    claims: Claims
    settings: StorageSettings


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def storage_settings(run: PreparedRun) -> StorageSettings:
    w = run.spec.workers
    return StorageSettings(w.heartbeat_interval_s, w.grace_period_s, w.retry_s)


def resolve_storage(run: PreparedRun, override: str | None, run_dir: Path | None) -> tuple[str, str]:
    """(URL, study name): ``--storage`` over the spec's ``storage``, else the run directory's
    study.db (study ``autoquant``, as a single-process search). A shared database holds one
    study per spec name."""
    given = override if override is not None else run.spec.storage
    if given is None:
        if run_dir is None:
            raise UserError(
                "bad value None: a worker needs a shared storage; allowed: --storage URL or "
                "storage: in the spec (postgresql://USER@HOST:PORT/DB)",
                file=str(run.spec_path),
                key="storage",
            )
        return sqlite_url(run_dir), STUDY_NAME
    key = "--storage" if override is not None else "storage"
    url = check_url(given, file=None if override is not None else str(run.spec_path), key=key)
    return url, run.spec.name


def open_shared(
    url: str,
    name: str,
    directions: list[str],
    fingerprint: str,
    settings: StorageSettings,
    sampler: Any = None,
    *,
    worker: str,
) -> SharedStudy:
    holder: dict[str, Claims] = {}

    def on_stale(study: Any, trial: Any) -> None:
        # the heartbeat failed this trial: its config goes back to the pool
        if "claims" in holder:
            holder["claims"].release(trial._trial_id)

    storage = open_storage(url, settings, on_stale=on_stale)
    shown = redact(url)
    study = retrying(
        lambda: open_shared_study(storage, name, directions, sampler, fingerprint, shown=shown),
        url=url,
        retry_s=settings.retry_s,
    )
    claims = Claims(storage, study._study_id, worker)
    holder["claims"] = claims
    return SharedStudy(url, shown, study, claims, settings)


def sweep(shared: SharedStudy) -> None:
    """Fail the trials whose worker stopped beating (their claims return to the pool), and the
    running trials that never got a heartbeat nor a claim (killed right after asking) once
    they are older than the grace period."""
    import datetime as dt

    import optuna

    study, storage = shared.study, shared.study._storage
    optuna.storages.fail_stale_trials(study)
    claimed = {tid for _, _, tid in shared.claims.rows()}
    now = dt.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial._trial_id in claimed or trial.datetime_start is None:
            continue
        if (now - trial.datetime_start).total_seconds() > 2 * shared.settings.grace_period_s:
            try:
                storage.set_trial_user_attr(trial._trial_id, "fail_reason", INTERRUPTED)
                storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # its worker finished it after all, or another sweep got there first


class _Heartbeat:
    """Records the trial's heartbeat every interval while it is measured. A storage that does
    not answer just misses beats: past the grace period the trial is failed and re-measured."""

    def __init__(self, storage: Any, trial_id: int, interval_s: float) -> None:
        self.storage, self.trial_id, self.interval_s = storage, trial_id, interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a missed beat is what the grace period is for
                pass
            if self.stop.wait(self.interval_s):
                return

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


class ClaimingRecorder(TrialRecorder):
    """``TrialRecorder`` for a shared study: a new config is measured only once its claim is
    won; the ledger is refreshed from every worker's trials before each proposal."""

    def __init__(self, run: PreparedRun, shared: SharedStudy, objectives, worker: str) -> None:
        super().__init__(run, shared.study, objectives, entries(shared.study))
        self.shared = shared
        self.worker = worker
        self.skipped = 0
        self.full = False

    def refresh(self) -> None:
        done = entries(self.study)
        fresh = TrialRecorder(self.run, self.study, self.objectives, done)
        self.measured, self.failed = fresh.measured, fresh.failed
        self.n_failed, self.fp32_accuracy = fresh.n_failed, fresh.fp32_accuracy

    def admit(self, trial: Any, config: Any) -> str | None:
        import optuna

        trial.set_user_attr("worker", self.worker)
        # beat before claiming: a claim always belongs to a trial the heartbeat check can see
        self.study._storage.record_heartbeat(trial._trial_id)
        claim = self.shared.claims.claim(config.hash, trial._trial_id, self.run.spec.search.trials)
        if claim.outcome is Outcome.WON:
            return None
        if claim.outcome is Outcome.FULL:
            self.full = True
            reason = f"{SKIPPED}every budget slot is held by a measured or running config"
        else:
            holder = self.study._storage.get_trial(claim.holder_trial_id)
            reason = f"{SKIPPED}trial {holder.number} claimed this config first"
        trial.set_user_attr("fail_reason", reason)
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        self.skipped += 1
        return "skipped"

    def measuring(self, trial: Any):
        return _Heartbeat(
            self.study._storage, trial._trial_id, self.shared.settings.heartbeat_interval_s
        )


def run_worker(
    run: PreparedRun,
    url: str,
    study_name: str,
    *,
    index: int = 0,
    on_progress: Any = None,
    on_status: Any = None,
) -> SearchOutcome:
    """Measure configs of the shared study until the spec's budget of distinct configs (all
    workers together) is spent and settled, its time budget (this worker) runs out, or the
    space is exhausted. Storage faults are retried for ``workers.retry_s``, then exit 1."""
    settings = run.spec.search
    if settings.sampler == "guided":
        raise UserError(
            "bad value 'guided': workers sharing a study run Optuna's samplers; allowed: "
            "nsga2, tpe or random (--sampler)",
            file=str(run.spec_path),
            key="search.sampler",
        )
    from autoquant.search.samplers import make_sampler

    start = time.monotonic()
    objectives = objectives_for(run.spec.objectives)
    directions = [o.direction for o in objectives]
    fingerprint = spec_fingerprint(run.resolved_spec())
    worker = worker_name()
    ss = storage_settings(run)
    shared = open_shared(url, study_name, directions, fingerprint, ss, worker=worker)

    def step(fn):
        return retrying(fn, url=url, retry_s=ss.retry_s, on_retry=on_status)

    done = step(lambda: entries(shared.study))
    # each worker (and each restart of one) samples its own sequence
    shared.study.sampler = make_sampler(
        settings.sampler,
        seed=settings.seed + 1000 * index + len(done),
        population_size=settings.population_size,
        constraints_func=_constraints_func
        if run.spec.constraints.model_dump(exclude_none=True)
        else None,
    )
    recorder = step(lambda: ClaimingRecorder(run, shared, objectives, worker))
    step(lambda: _adopt(shared, done))
    step(lambda: _enqueue_references(run, shared, recorder))

    repeats = 0
    stopped = "trial budget reached"
    while True:
        if settings.timeout_s is not None and time.monotonic() - start >= settings.timeout_s:
            stopped = f"time budget of {settings.timeout_s:g} s reached"
            break
        if repeats >= MAX_CONSECUTIVE_REPEATS:
            stopped = f"the sampler proposed only measured configs {repeats} times in a row"
            break
        state = step(lambda: _budget_state(run, shared, recorder))
        if on_progress:
            on_progress(state.held, settings.trials)
        if state.finished:
            stopped = state.finished
            break
        if state.wait:
            time.sleep(min(1.0, ss.heartbeat_interval_s))
            continue
        result = step(lambda: recorder.record(shared.study.ask()))
        repeats = 0 if result == "measured" or result == "failed" else repeats + 1
    return SearchOutcome(
        run_dir=Path("."),
        measured=len(recorder.measured),
        failed=recorder.n_failed,
        new_measurements=recorder.new,
        reused=recorder.reused + recorder.skipped,
        interrupted_before=0,
        stopped_because=stopped,
        elapsed_s=time.monotonic() - start,
    )


@dataclass(frozen=True)
class _Budget:
    held: int
    finished: str | None
    wait: bool


def _budget_state(run: PreparedRun, shared: SharedStudy, recorder: ClaimingRecorder) -> _Budget:
    import optuna

    sweep(shared)
    recorder.refresh()
    rows = shared.claims.rows()
    running = {
        t._trial_id
        for t in shared.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    }
    held = len(rows)
    unsettled = sum(1 for _, _, tid in rows if tid in running)
    trials = run.spec.search.trials
    settled = held - unsettled
    if settled >= trials or settled >= run.space.size:
        # every slot holds a measurement: wait for stray running trials to be failed, so that
        # none is left RUNNING when the workers are gone
        if running:
            return _Budget(held, None, True)
        if settled >= trials:
            return _Budget(held, "trial budget reached", False)
        return _Budget(held, "every config of the space is measured", False)
    if held >= trials or held >= run.space.size:
        return _Budget(held, None, True)  # the rest are being measured, or their worker died
    return _Budget(held, None, False)


def _adopt(shared: SharedStudy, done: list) -> None:
    """Measurements made before claims existed (a single-process run resumed with workers)
    hold their slots too."""
    claimed = {h for h, _, _ in shared.claims.rows()}
    for e in done:
        if is_measured(e) and e.config_hash and e.config_hash not in claimed:
            shared.claims.claim(e.config_hash, _trial_id(shared, e.number), None)
            claimed.add(e.config_hash)


def _trial_id(shared: SharedStudy, number: int) -> int:
    return shared.study._storage.get_trial_id_from_study_id_trial_number(
        shared.study._study_id, number
    )


def _enqueue_references(run: PreparedRun, shared: SharedStudy, recorder: ClaimingRecorder) -> None:
    claimed = {h for h, _, _ in shared.claims.rows()}
    for name, config in run.references():
        if config.hash not in claimed and config.hash not in recorder.measured:
            shared.study.enqueue_trial(
                _params_of(config), user_attrs={"reference": name}, skip_if_exists=True
            )


def collect(run_dir: Path, url: str, study_name: str, resolved: dict, settings: StorageSettings):
    """Fail stale trials (their claims return to the pool) and return the shared ledger."""
    objectives = objectives_for(resolved["objectives"])
    directions = [o.direction for o in objectives]
    shared = open_shared(
        url, study_name, directions, spec_fingerprint(resolved), settings, worker=worker_name()
    )
    retrying(lambda: sweep(shared), url=url, retry_s=settings.retry_s)
    ledger = retrying(lambda: entries(shared.study), url=url, retry_s=settings.retry_s)
    return shared, objectives, ledger
