"""A finished (or running) run, read back from its directory: the input of reports and compare."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoquant.errors import UserError
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


def load_run(path: Path) -> RunData:
    """Read ``spec.yaml``, ``trials.parquet``, ``pareto.csv`` and ``run.json`` of a run directory."""
    import pandas as pd

    from autoquant.safeyaml import read_mapping

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
    spec = read_mapping(path / "spec.yaml")
    named = (objective_named(str(n)) for n in spec.get("objectives", ["accuracy", "size"]))
    objectives = tuple(o for o in named if o is not None)
    trials = pd.read_parquet(path / "trials.parquet")
    try:
        front = pd.read_csv(path / "pareto.csv")
    except pd.errors.EmptyDataError:
        front = trials.iloc[0:0]
    info_path = path / RUN_INFO
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    task = spec["task"] if isinstance(spec.get("task"), str) else spec.get("task", {}).get("function", "?")
    # The directory names the run: two runs of one spec (two samplers, say) differ only there.
    return RunData(path, path.resolve().name, task, spec, objectives, trials, front, info)
