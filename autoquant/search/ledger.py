"""The Optuna study as the ledger of every trial: what was measured, what failed, what is queued.

Trial user attributes carry the config (versioned JSON), its hash, every figure with its source,
and, for a trial that re-proposed an already measured config, ``reused_from``.

Nothing is read out of the ledger unchecked: a trial's config must parse, match its hash and the
labels Optuna recorded as the trial's params (``entry_from_trial``). ``check_ledger`` refuses a
run directory whose results the ledger no longer backs (study.db deleted, emptied, unreadable,
or without trials the tables hold), so a search never overwrites them with a fresh study.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoquant.errors import UserError
from autoquant.measurement import Figure
from autoquant.space import QuantConfig

STUDY_NAME = "autoquant"
INTERRUPTED = "interrupted: the process ended before the trial finished"
# A worker's trial whose config another worker had claimed first, or whose budget slot went to
# another worker: bookkeeping, not a measurement (no row in the tables, not in the budget).
SKIPPED = "skipped: "
LEDGER_FILE = "study.db"
# What a search writes from the ledger: if any is there, the ledger must be too.
RESULT_FILES = ("trials.parquet", "pareto.csv", "report.html", "run.json")
_RESTORE = "allowed: the run's own study.db (restore it), or another run directory"


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


def _checked_config(trial: Any, file: str | None) -> QuantConfig | None:
    """The trial's config, refused unless it parses, matches its stored hash and is the config
    the trial's params name (a config edited in study.db fails one of the three)."""
    attrs = trial.user_attrs
    if "config" not in attrs:
        return None
    text = str(attrs["config"])

    def refuse(problem: str) -> UserError:
        return UserError(
            f"bad value {text[:60]!r}: trial {trial.number}'s config {problem}; {_RESTORE}",
            file=file,
            key=f"trial {trial.number}",
        )

    try:
        config = QuantConfig.from_json(text)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise refuse(f"does not parse ({type(exc).__name__})") from None
    recorded = attrs.get("config_hash")
    # A process killed between writing the config and its hash leaves an unfinished trial
    # with no hash: nothing to check it against, and nothing measured in it.
    if recorded is None and trial.state.name != "COMPLETE":
        return config
    if config.hash != recorded:
        raise refuse(f"has hash {config.hash}, the ledger records {attrs.get('config_hash')!r}")
    labels = {name: choice.label for name, choice in config.choices}
    # A storage read is not one snapshot (PostgreSQL reads a trial's params and its attributes
    # in separate statements): a running trial may show its config with only the params
    # written before the first statement. Those must agree; a finished trial's must all match.
    names = labels.keys() | trial.params.keys() if trial.state.is_finished() else trial.params.keys()
    wrong = sorted(n for n in names if labels.get(n) != trial.params.get(n))
    if trial.params and wrong:
        raise refuse(f"disagrees with the trial's params on layer {wrong[0]!r}")
    return config


def entry_from_trial(trial: Any, *, file: str | None = None) -> LedgerEntry:
    attrs = trial.user_attrs
    config = _checked_config(trial, file)
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
    """Mark trials left RUNNING by a process that died as FAIL, with the reason. The run
    directory's owner lock (``autoquant.rundir``) makes the search the study's one user, so any
    RUNNING trial at start is stale."""
    import optuna

    storage = study._storage
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", INTERRUPTED)
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        count += 1
    return count


def entries(study: Any, *, file: str | None = None) -> list[LedgerEntry]:
    return [entry_from_trial(t, file=file) for t in study.get_trials(deepcopy=False)]


def read_ledger(run_dir: Path, *, key: str = "RUN") -> list[LedgerEntry] | None:
    """The checked entries of ``run_dir/study.db``, read without creating or changing it; None
    when there is no ledger (missing or zero bytes). ``UserError`` when it is unreadable (not
    SQLite, truncated, another schema, no autoquant study) or a trial's config was edited."""
    import optuna

    path = run_dir / LEDGER_FILE
    if not path.is_file() or path.stat().st_size == 0:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.RDBStorage(sqlite_url(run_dir), skip_table_creation=True)
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        trials = study.get_trials(deepcopy=False)
    except Exception as exc:  # whatever stops reading it, the ledger is not there to build on
        cause = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise UserError(
            f"bad value {str(run_dir)!r}: {LEDGER_FILE} is not a readable autoquant ledger "
            f"({type(exc).__name__}: {cause}); {_RESTORE}",
            file=str(path),
            key=key,
        ) from None
    return [entry_from_trial(t, file=str(path)) for t in trials]


def check_ledger(run_dir: Path, layer_names: set[str], *, key: str = "--out") -> None:
    """Refuse (``UserError``) a run directory a search would lose results in: result files
    without a ledger (missing, empty, unreadable), a ledger without the trials ``trials.parquet``
    holds, or a ledger whose configs are edited or name layers the task does not have."""
    path = run_dir / LEDGER_FILE
    results = [name for name in RESULT_FILES if (run_dir / name).exists()]
    done = read_ledger(run_dir, key=key)
    if done is None:
        if results:
            what = "missing" if not path.exists() else "empty"
            raise UserError(
                f"bad value {str(run_dir)!r}: the run directory holds {', '.join(results)} but "
                f"its ledger {LEDGER_FILE} is {what}; a search would start a new study and "
                f"overwrite them; {_RESTORE}",
                key=key,
            )
        return
    lost = _table_trials(run_dir) - {e.number for e in done if e.state in ("COMPLETE", "FAIL")}
    if lost:
        raise UserError(
            f"bad value {str(run_dir)!r}: trials.parquet holds trial(s) "
            f"{', '.join(map(str, sorted(lost)[:5]))} that the ledger {LEDGER_FILE} does not "
            f"({len(lost)} in all); a search would overwrite them; {_RESTORE}",
            key=key,
        )
    for entry in done:
        if entry.config is None:
            continue
        extra = {name for name, _ in entry.config.choices} ^ layer_names
        if extra:
            raise UserError(
                f"bad value {sorted(extra)[0]!r}: trial {entry.number}'s config does not have "
                f"the task's layers (differs on {len(extra)}); {_RESTORE}",
                file=str(path),
                key=f"trial {entry.number}",
            )


def _table_trials(run_dir: Path) -> set[int]:
    """Trial numbers in ``trials.parquet``; none if it is absent or unreadable (the ledger is
    the source of truth: a corrupt table is rewritten from it)."""
    import pandas as pd

    try:
        return {int(t) for t in pd.read_parquet(run_dir / "trials.parquet", columns=["trial"])["trial"]}
    except Exception:
        return set()
