"""Workers sharing one study: each runs the one search loop (``driver.drive``) with its own
proposer (any registered sampler, ``guided`` included) on a ``SharedLedger``: it claims each
config, measures it under a heartbeat and tells the shared ledger, until the budget of distinct
configs is spent.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from autoquant.errors import UserError
from autoquant.sampler_names import derived_seed
from autoquant.search.claims import Claims, Outcome
from autoquant.search.driver import (
    BudgetState,
    SearchOutcome,
    TrialRecorder,
    _params_of,
    drive,
    queued_hashes,
    sampler_args,
)
from autoquant.search.ledger import (
    INTERRUPTED,
    SKIPPED,
    STUDY_NAME,
    entries,
    entry_from_trial,
    is_measured,
    sqlite_url,
)
from autoquant.search.objectives import objectives_for
from autoquant.search.run import PreparedRun
from autoquant.search.targets import check_latency_targets
from autoquant.storage import (
    StorageSettings,
    check_url,
    open_shared_study,
    open_storage,
    redact,
    retrying,
    spec_fingerprint,
)

FINISHED = ("COMPLETE", "FAIL", "PRUNED")


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
    """``storage_of`` for a prepared run."""
    return storage_of(run.spec, run.spec_path, override, run_dir)


def storage_of(spec: Any, spec_path: Path, override: str | None, run_dir: Path | None) -> tuple[str, str]:
    """(URL, study name): ``--storage`` over the spec's ``storage``, else the run directory's
    study.db (study ``autoquant``, as a single-process search). A shared database holds one
    study per spec name."""
    given = override if override is not None else spec.storage
    if given is None:
        if run_dir is None:
            raise UserError(
                "bad value None: a worker needs a shared storage; allowed: --storage URL or "
                "storage: in the spec (postgresql://USER@HOST:PORT/DB)",
                file=str(spec_path),
                key="storage",
            )
        return sqlite_url(run_dir), STUDY_NAME
    key = "--storage" if override is not None else "storage"
    url = check_url(given, file=None if override is not None else str(spec_path), key=key)
    return url, spec.name


def open_shared(
    url: str,
    name: str,
    directions: list[str],
    fingerprint: str,
    *,
    settings: StorageSettings,
    sampler: Any = None,
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
    won; ``refresh`` takes in every worker's trials finished since the last one."""

    def __init__(self, run: PreparedRun, shared: SharedStudy, objectives, worker: str, done) -> None:
        super().__init__(run, shared.study, objectives, done)
        self.shared = shared
        self.worker = worker
        self.skipped = 0
        self.full = False
        self.settled = {e.number for e in done if e.state in FINISHED}
        self.failed_trials = {e.number for e in done if e.state == "FAIL" and is_measured(e)}

    def refresh(self) -> None:
        """Take in the trials finished since the last refresh (Optuna's cached storage reads
        only new and unfinished trials from the database; only those are parsed here)."""
        for trial in self.study.get_trials(deepcopy=False):
            if trial.number in self.settled or trial.state.name not in FINISHED:
                continue
            self.settled.add(trial.number)
            e = entry_from_trial(trial)
            if e.state == "COMPLETE" and e.reused_from is None and e.config_hash:
                self.measured.setdefault(e.config_hash, e)
                if e.reference == "fp32" and self.fp32_accuracy is None:
                    self.fp32_accuracy = e.figures["accuracy"].value
            elif e.state == "FAIL" and is_measured(e):
                self.failed_trials.add(e.number)
                if e.config_hash and e.config:
                    self.failed[e.config_hash] = e.config
        self.n_failed = len(self.failed_trials)

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


class SharedLedger:
    """The budget of a study shared by workers, for the search loop (``driver.drive``): the
    claims count against it (``autoquant.search.claims``). Stale trials are swept once per
    heartbeat interval, not before every proposal; each step is retried while the storage is
    away (``retrying``)."""

    def __init__(self, run: PreparedRun, shared: SharedStudy, recorder: ClaimingRecorder, step):
        self.run, self.shared, self.recorder, self.step = run, shared, recorder, step
        self.pause_s = min(1.0, shared.settings.heartbeat_interval_s)
        self.next_sweep = 0.0
        self.claimed: set[str] = set()
        self.maybe_waiting = True

    def taken(self) -> set[str]:
        """Configs claimed by any worker (as of the last budget check)."""
        return self.claimed

    def state(self) -> BudgetState:
        import optuna

        if time.monotonic() >= self.next_sweep:
            sweep(self.shared)
            self.next_sweep = time.monotonic() + self.shared.settings.heartbeat_interval_s
            self.maybe_waiting = True  # another worker may have queued its references
        self.recorder.refresh()
        rows = self.shared.claims.rows()
        self.claimed = {h for h, _, _ in rows}
        held, trials, size = len(rows), self.run.spec.search.trials, self.run.space.size
        if held < trials and held < size:
            return BudgetState(held)
        running = {
            t._trial_id
            for t in self.shared.study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)
            )
        }
        settled = held - sum(1 for _, _, tid in rows if tid in running)
        if settled >= trials or settled >= size:
            # every slot holds a measurement: wait for stray running trials to be failed, so
            # that none is left RUNNING when the workers are gone
            if running:
                self.next_sweep = 0.0
                return BudgetState(held, wait=True)
            if settled >= trials:
                return BudgetState(held, "trial budget reached")
            return BudgetState(held, "every config of the space is measured")
        # the rest are being measured, or their worker died
        self.next_sweep = 0.0
        return BudgetState(held, wait=True)

    def waiting(self) -> bool:
        if self.maybe_waiting:
            self.maybe_waiting = bool(queued_hashes(self.run, self.shared.study))
        return self.maybe_waiting

    def enqueue_references(self) -> None:
        r = self.recorder
        skip = {h for h, _, _ in self.shared.claims.rows()} | r.measured.keys() | r.failed.keys()
        skip |= queued_hashes(self.run, self.shared.study)
        for name, config in self.run.references():
            if config.hash not in skip:
                self.shared.study.enqueue_trial(_params_of(config), user_attrs={"reference": name})
        self.maybe_waiting = True


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
    space is exhausted: the one search loop (``driver.drive``) on a ``SharedLedger``. Storage
    faults are retried for ``workers.retry_s`` (``on_status`` hears each retry), then exit 1.
    Every profile (the spec's, or the worker's own: ``run.own_hardware``) must be the target
    the study's latency was measured on, and predicts with the study's latency model
    (``autoquant.search.targets``)."""
    from autoquant.search.proposer import LoopContext
    from autoquant.search.samplers import make_proposer

    settings = run.spec.search
    start = time.monotonic()
    objectives = objectives_for(run.spec.objectives)
    directions = [o.direction for o in objectives]
    fingerprint = spec_fingerprint(run.resolved_spec())
    worker = worker_name()
    ss = storage_settings(run)
    shared = open_shared(url, study_name, directions, fingerprint, settings=ss, worker=worker)

    def step(fn):
        return retrying(fn, url=url, retry_s=ss.retry_s, on_retry=on_status)

    run = with_latency(
        run,
        step(
            lambda: check_latency_targets(
                shared.study, run.latency, spec_file=str(run.spec_path), overridden=run.own_hardware
            )
        ),
    )
    done = step(lambda: entries(shared.study))
    # each worker (and each restart of one) samples its own sequence
    args = sampler_args(run, derived_seed(settings.seed, 1000 * index + len(done)))
    proposer = make_proposer(settings.sampler, args)
    shared.study.sampler = proposer.study_sampler()
    recorder = ClaimingRecorder(run, shared, objectives, worker, done)
    step(lambda: _adopt(shared, done))
    ledger = SharedLedger(run, shared, recorder, step)
    ctx = LoopContext(
        run, tuple(objectives), recorder, shared.study, None, start, taken=ledger.taken
    )
    stopped = drive(ctx, ledger, proposer, on_progress=on_progress)
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


def with_latency(run: PreparedRun, latency: tuple) -> PreparedRun:
    """``run`` predicting with ``latency`` (the study's models) in place of its own fits."""
    if not latency:
        return run
    evaluator = run.evaluator and replace(run.evaluator, latency=latency)
    return replace(run, latency=latency, evaluator=evaluator)


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


def collect(run_dir: Path, url: str, study_name: str, resolved: dict, settings: StorageSettings):
    """Fail stale trials (their claims return to the pool) and return the shared ledger."""
    objectives = objectives_for(resolved["objectives"])
    directions = [o.direction for o in objectives]
    shared = open_shared(
        url, study_name, directions, spec_fingerprint(resolved), settings=settings,
        worker=worker_name(),
    )
    retrying(lambda: sweep(shared), url=url, retry_s=settings.retry_s)
    ledger = retrying(lambda: entries(shared.study), url=url, retry_s=settings.retry_s)
    return shared, objectives, ledger
