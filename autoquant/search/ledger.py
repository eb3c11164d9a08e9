"""The Optuna study as the ledger of every trial: what was measured, what failed, what is queued.

Trial user attributes carry the config (versioned JSON), its hash, every figure with its source,
and, for a trial that re-proposed an already measured config, ``reused_from``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoquant.measurement import Figure
from autoquant.space import QuantConfig

STUDY_NAME = "autoquant"
INTERRUPTED = "interrupted: the process ended before the trial finished"
# A worker's trial whose config another worker had claimed first, or whose budget slot went to
# another worker: bookkeeping, not a measurement (no row in the tables, not in the budget).
SKIPPED = "skipped: "


def sqlite_url(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


@dataclass(frozen=True)
class LedgerEntry:
    number: int
    state: str
    config: QuantConfig | None
    config_hash: str | None
    figures: dict[str, Figure]
    reference: str | None
    reused_from: int | None
    fail_reason: str | None
    duration_s: float | None
    constraints: tuple[float, ...] | None
    predicted: str | None = None  # JSON: what the guided sampler's predictor said before measuring
    worker: str | None = None  # host:pid of the worker that ran it (shared storages)

    @property
    def skipped(self) -> bool:
        return (self.fail_reason or "").startswith(SKIPPED)


def is_measured(entry: LedgerEntry) -> bool:
    """A distinct measurement: complete, or failed as a measurement (a config that cannot run
    is data); not a repeat answered from the ledger, an interruption or a skip."""
    if entry.state == "COMPLETE":
        return entry.reused_from is None
    return entry.state == "FAIL" and entry.fail_reason != INTERRUPTED and not entry.skipped


def entry_from_trial(trial: Any) -> LedgerEntry:
    attrs = trial.user_attrs
    config = QuantConfig.from_json(attrs["config"]) if "config" in attrs else None
    figures = {k: Figure.from_dict(v) for k, v in json.loads(attrs.get("figures", "{}")).items()}
    duration = None
    if trial.datetime_start and trial.datetime_complete:
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds()
    constraints = attrs.get("constraints")
    fail_reason = attrs.get("fail_reason")
    if trial.state.name == "FAIL" and fail_reason is None:
        # a measurement failure always says why: this one was failed by Optuna's heartbeat
        # check (its worker died or was cut off mid-trial)
        fail_reason = INTERRUPTED
    return LedgerEntry(
        number=trial.number,
        state=trial.state.name,
        config=config,
        config_hash=attrs.get("config_hash"),
        figures=figures,
        reference=attrs.get("reference"),
        reused_from=attrs.get("reused_from"),
        fail_reason=fail_reason,
        duration_s=duration,
        constraints=tuple(constraints) if constraints is not None else None,
        predicted=attrs.get("predicted"),
        worker=attrs.get("worker"),
    )


def open_study(storage: str, directions: list[str], sampler: Any, *, create: bool = True):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if create:
        return optuna.create_study(
            study_name=STUDY_NAME,
            storage=storage,
            directions=directions,
            sampler=sampler,
            load_if_exists=True,
        )
    return optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler)


def fail_interrupted(study: Any) -> int:
    """Mark trials left RUNNING by a process that died as FAIL, with the reason. With the
    embedded SQLite ledger one process owns the study, so any RUNNING trial at start is stale."""
    import optuna

    storage = study._storage
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", INTERRUPTED)
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        count += 1
    return count


def entries(study: Any) -> list[LedgerEntry]:
    return [entry_from_trial(t) for t in study.get_trials(deepcopy=False)]
