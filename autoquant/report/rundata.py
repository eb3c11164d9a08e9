"""A finished (or running) run, read back from its directory: the input of reports and compare."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoquant.errors import MachineError, UserError, machine_failure
from autoquant.search.objectives import Objective, objective_named

RUN_INFO = "run.json"


@dataclass(frozen=True)
class RunData:
    path: Path
    name: str
    task: str
    spec: dict[str, Any]
    objectives: tuple[Objective, ...]
    trials: Any  # pandas.DataFrame, one row per measured or failed config
    front: Any  # pandas.DataFrame, pareto.csv
    info: dict[str, Any]  # run.json: versions, budget used

    @property
    def complete(self):
        return self.trials[self.trials["state"] == "COMPLETE"]

    @property
    def layer_columns(self) -> list[str]:
        return [c for c in self.trials.columns if c.startswith("layer:")]

    @property
    def cost_objectives(self) -> tuple[Objective, ...]:
        return tuple(o for o in self.objectives if o.direction == "minimize")

    def source_of(self, figure: str) -> str:
        """Where the run's figure came from (measured / predicted / exact), as its rows say."""
        column = f"{figure}_source"
        if column not in self.complete.columns:
            return "measured"
        return "/".join(sorted(set(self.complete[column].dropna())))

    def reference(self, name: str):
        rows = self.complete[self.complete["reference"] == name]
        return None if rows.empty else rows.iloc[0]


def interval_of(row: Any, figure: str) -> tuple[float, float] | None:
    """``(lo, hi)`` of a figure's interval in a trials / pareto row, or None where the row has
    none (a failed figure, or a run recorded before intervals existed)."""
    try:
        lo, hi = float(row.get(f"{figure}_lo")), float(row.get(f"{figure}_hi"))
    except (TypeError, ValueError):
        return None
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def within_noise(row: Any) -> bool | None:
    """The row's ``within_noise_of_fp32`` as True / False, or None when unknown (pareto.csv
    reads it back as a bool, a string or NaN)."""
    value = row.get("within_noise_of_fp32")
    if isinstance(value, str):
        return {"true": True, "false": False}.get(value.strip().lower())
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        return bool(value)
    except TypeError:  # pandas.NA
        return None


def _damaged(run: Path, name: str, problem: str) -> MachineError:
    """A file of a run directory that autoquant wrote but cannot read back (cut short by a
    crash or a full disk, or changed by hand): the tables and run.json are rewritten from the
    ledger by resuming the search, which measures nothing once its budget is used."""
    hint = (
        "move it aside (it is kept for you) and run the search again; the budget is used, "
        f"so it measures nothing: autoquant search {run / 'spec.yaml'} --out {run}"
    )
    if name == "spec.yaml":
        hint = "the run's resolved spec is damaged: restore it from the spec the run was started with"
    return MachineError(f"damaged: {problem}; {hint}", file=str(run / name))


def _read(run: Path, name: str, reader: Callable[[Path], Any]) -> Any:
    """``reader(run / name)``; a file it cannot parse is a ``MachineError`` naming it."""
    try:
        return reader(run / name)
    except UserError:  # the loader's own refusal (a bomb, a duplicate key) says it best
        raise
    except Exception as exc:
        failure = machine_failure(exc, file=run / name)  # the disk refused: say that instead
        if failure is not None:
            raise failure from exc
        raise _damaged(run, name, f"cannot be read ({short(exc)})") from exc


def short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def _check_tables(run: Path, trials: Any, front: Any, objectives: tuple[Objective, ...]) -> None:
    """The two tables agree: a row cut short reads back with blanks where its figures were."""
    for name, frame, needed in (
        ("trials.parquet", trials, ("trial", "state")),
        ("pareto.csv", front, ("trial", *(o.figure for o in objectives))),
    ):
        if frame.empty and name == "pareto.csv":
            continue
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise _damaged(run, name, f"no column {missing[0]!r}")
    if front.empty:
        return
    blank = front[[o.figure for o in objectives]].isna().any(axis=1)
    unknown = ~front["trial"].isin(trials["trial"])
    bad = front[blank | unknown]
    if not bad.empty:
        row = bad.index[0] + 2  # the header is line 1
        raise _damaged(
            run, "pareto.csv", f"line {row} has blank figures or a trial trials.parquet lacks"
        )


def load_run(path: Path) -> RunData:
    """Read ``spec.yaml``, ``trials.parquet``, ``pareto.csv`` and ``run.json`` of a run directory."""
    import pandas as pd

    from autoquant.spec import read_run_spec

    if not path.exists():
        raise UserError(f"bad value {str(path)!r}: no such run directory; allowed: a directory made by autoquant search", key="RUN")
    if not path.is_dir():
        raise UserError(f"bad value {str(path)!r}: not a directory; allowed: a run directory", key="RUN")
    missing = [n for n in ("spec.yaml", "trials.parquet", "pareto.csv") if not (path / n).exists()]
    if missing:
        raise UserError(
            f"bad value {str(path)!r}: not a finished run directory (missing {', '.join(missing)}); "
            "allowed: a directory made by autoquant search", key="RUN",
        )
    spec = _read(path, "spec.yaml", read_run_spec)
    named = (objective_named(str(n)) for n in spec.get("objectives", ["accuracy", "size"]))
    objectives = tuple(o for o in named if o is not None)
    trials = _read(path, "trials.parquet", pd.read_parquet)

    def read_front(p: Path):
        try:
            return pd.read_csv(p)
        except pd.errors.EmptyDataError:
            return trials.iloc[0:0]

    front = _read(path, "pareto.csv", read_front)
    _check_tables(path, trials, front, objectives)
    info_path = path / RUN_INFO
    info = _read(path, RUN_INFO, lambda p: json.loads(p.read_text())) if info_path.exists() else {}
    if not isinstance(info, dict):
        raise _damaged(path, RUN_INFO, f"holds a {type(info).__name__}, not an object")
    task = spec["task"] if isinstance(spec.get("task"), str) else spec.get("task", {}).get("function", "?")
    # The directory names the run: two runs of one spec (two samplers, say) differ only there.
    return RunData(path, path.resolve().name, task, spec, objectives, trials, front, info)
