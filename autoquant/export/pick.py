"""Which front point to export: the knee, a trial number, or the best point inside a budget.

``--pick`` grammar (``Pick.parse``):

==========================  ===============================================================
``knee``                    the knee of the run's objectives (``autoquant.pareto.knee_index``)
``trial=N``                 front point of trial ``N``
``max_accuracy_drop=X``     accuracy budget: the cheapest point (by the run's first cost
                            objective) whose drop below fp32 is at most ``X`` (a fraction)
``min_accuracy=X``          accuracy budget: the cheapest point with accuracy at least ``X``
``max_<figure>=X``          cost budget (``max_size_bytes``, ``max_latency_ms``, ...): the most
                            accurate point whose ``<figure>`` is at most ``X``; with one
                            latency per hardware profile, ``max_latency_ms@<profile>=X``
                            (plain ``max_latency_ms`` when the run has one profile)
==========================  ===============================================================
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoquant.errors import UserError

ACCURACY = "accuracy"
_SIZE_SUFFIX = {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2}
PICK_HELP = (
    "knee | trial=N | max_accuracy_drop=X | min_accuracy=X | max_size_bytes=X | max_latency_ms=X"
)


@dataclass(frozen=True)
class Pick:
    kind: str  # "knee" | "trial" | "accuracy_budget" | "cost_budget"
    figure: str | None = None
    value: float | None = None
    text: str = "knee"

    @classmethod
    def parse(cls, text: str) -> Pick:
        raw = text.strip()
        if raw == "knee":
            return cls("knee", text="knee")
        if "=" not in raw:
            raise UserError(f"bad value {text!r}; allowed: {PICK_HELP}", key="--pick")
        key, _, val = (p.strip() for p in raw.partition("="))
        if key == "trial":
            if not re.fullmatch(r"\d+", val):
                raise UserError(
                    f"bad value {text!r}: trial must be a whole number; allowed: {PICK_HELP}",
                    key="--pick",
                )
            return cls("trial", value=int(val), text=f"trial={int(val)}")
        number = _number(val, text, allow_suffix=key.endswith("_bytes"))
        if key == "max_accuracy_drop":
            return cls("accuracy_budget", "accuracy_drop", number, raw)
        if key == "min_accuracy":
            return cls("accuracy_budget", ACCURACY, number, raw)
        if key.startswith("max_") and len(key) > 4:
            return cls("cost_budget", key[4:], number, raw)
        raise UserError(
            f"bad value {text!r}: unknown pick {key!r}; allowed: {PICK_HELP}", key="--pick"
        )

    @property
    def slug(self) -> str:
        """Folder name under ``RUN/exports``."""
        if self.kind == "knee":
            return "knee"
        if self.kind == "trial":
            return f"trial-{int(self.value)}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.text.replace("=", "-"))


def _number(val: str, text: str, *, allow_suffix: bool) -> float:
    m = re.fullmatch(r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)", val)
    suffix = m.group(2).lower() if m else ""
    if not m or (suffix and (not allow_suffix or suffix not in _SIZE_SUFFIX)):
        allowed = "a number" + (" with optional KB/KiB/MB/MiB" if allow_suffix else "")
        raise UserError(
            f"bad value {text!r}: {val!r} is not {allowed}; allowed: {PICK_HELP}", key="--pick"
        )
    return float(m.group(1)) * _SIZE_SUFFIX[suffix]


@dataclass(frozen=True)
class RunFront:
    """A run directory's front and objectives, as written by ``autoquant search``."""

    run_dir: Path
    frame: Any  # pandas.DataFrame of pareto.csv
    objectives: tuple  # autoquant.search.objectives.Objective
    spec: dict

    @property
    def cost_figures(self) -> list[str]:
        return [o.figure for o in self.objectives if o.direction == "minimize"]


def load_front(run_dir: Path) -> RunFront:
    """Read ``RUN/spec.yaml`` and ``RUN/pareto.csv``; ``UserError`` if either is missing or the
    front is empty."""
    import pandas as pd

    from autoquant.search.objectives import objectives_for
    from autoquant.spec import read_run_spec

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "does not exist" if not run_dir.exists() else "is not a directory"
        raise UserError(
            f"bad value {str(run_dir)!r}: {what}; allowed: a run directory made by autoquant search",
            key="RUN",
        )
    spec_path, pareto = run_dir / "spec.yaml", run_dir / "pareto.csv"
    for path in (spec_path, pareto):
        if not path.is_file():
            raise UserError(
                f"bad value {str(run_dir)!r}: no {path.name}; allowed: a run directory made by autoquant search",
                key="RUN",
            )
    try:
        frame = pd.read_csv(pareto)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    if frame.empty or "config" not in frame.columns:
        raise UserError(
            f"run {str(run_dir)!r} has no Pareto front yet (pareto.csv is empty); run more trials",
            key="RUN",
        )
    spec = read_run_spec(spec_path)
    names = list(spec.get("objectives") or ["accuracy", "size"])
    try:
        objectives = objectives_for(names)
    except KeyError:
        objectives = tuple(_objective_from_columns(name, frame, spec_path) for name in names)
    return RunFront(run_dir, frame, objectives, spec)


def check_in_ledger(front: RunFront, rows: list[Any]) -> None:
    """Each front row must be a trial the run's ledger (``study.db``) measured, with the same
    config: pareto.csv is a table written from the ledger, so a row the ledger does not back
    (an edited trial number or config) is refused. A run directory without its ledger (a copy
    of the tables alone) is checked by the export's own validation only."""
    from autoquant.search.ledger import read_ledger

    done = read_ledger(front.run_dir, key="RUN")
    if done is None:
        return
    by_number = {e.number: e for e in done}
    for row in rows:
        number = int(row["trial"])
        entry = by_number.get(number)
        problem = None
        if entry is None:
            problem = "is not in the ledger study.db"
        elif entry.state != "COMPLETE" or entry.reused_from is not None:
            problem = f"is {entry.state.lower()} in the ledger study.db, not a measured config"
        elif entry.config_hash != row["config_hash"]:
            problem = f"has config {entry.config_hash} in the ledger study.db, not {row['config_hash']}"
        if problem:
            raise UserError(
                f"bad value {number}: trial {number} {problem}; allowed: the trials of pareto.csv "
                "as autoquant search wrote it (rerun autoquant search to rewrite it)",
                file=str(front.run_dir / "pareto.csv"),
                key="trial",
            )


def _objective_from_columns(name: str, frame: Any, spec_path: Path):
    """An objective this autoquant does not register (e.g. one latency per hardware profile):
    its figure is the pareto.csv column named like it; every such cost is minimized."""
    from autoquant.search.objectives import OBJECTIVES, Objective

    if name in OBJECTIVES:
        return OBJECTIVES[name]
    columns = [c for c in frame.columns if not str(c).endswith("_source")]
    matches = [c for c in columns if c == name or str(c).startswith(name)]
    if len(matches) != 1:
        raise UserError(
            f"objective {name!r} matches {len(matches)} pareto.csv columns; allowed: one of "
            + ", ".join(map(str, columns)),
            file=str(spec_path),
            key="objectives",
        )
    return Objective(name, str(matches[0]), "minimize", "")


def choose(front: RunFront, pick: Pick):
    """The front row (a pandas Series) the pick selects; ``UserError`` when none fits."""
    import numpy as np

    from autoquant.pareto import knee_index

    frame = front.frame
    if pick.kind == "knee":
        figures = [o.figure for o in front.objectives]
        values = frame[figures].to_numpy(dtype=float)
        return frame.iloc[knee_index(values, [o.direction for o in front.objectives])]
    if pick.kind == "trial":
        rows = frame[frame["trial"] == int(pick.value)]
        if rows.empty:
            on = ", ".join(str(t) for t in sorted(frame["trial"]))
            raise UserError(
                f"bad value {pick.text!r}: trial {int(pick.value)} is not on the front; allowed: trial={{{on}}}",
                key="--pick",
            )
        return rows.iloc[0]
    assert pick.figure is not None and pick.value is not None
    figure = pick.figure
    if figure not in frame.columns:
        # one latency figure per hardware profile: "latency_ms@<profile>"
        suffixed = [
            c
            for c in frame.columns
            if str(c).startswith((f"{figure}@", f"{figure}:")) and not str(c).endswith("_source")
        ]
        if len(suffixed) > 1:
            raise UserError(
                f"bad value {pick.text!r}: the run has {len(suffixed)} {figure!r} figures; "
                f"allowed: " + ", ".join(f"max_{c}=X" for c in suffixed),
                key="--pick",
            )
        if suffixed:
            figure = suffixed[0]
    if figure not in frame.columns:
        have = [
            c
            for c in frame.columns
            if c in ("accuracy_drop", "size_bytes") or c.startswith("latency")
        ]
        raise UserError(
            f"bad value {pick.text!r}: the run has no {pick.figure!r} figure; allowed budgets on this run: "
            + ", ".join(f"max_{c}" for c in have)
            + ", min_accuracy",
            key="--pick",
        )
    col = frame[figure].astype(float)
    if pick.kind == "accuracy_budget":
        inside = (
            frame[col >= pick.value]
            if pick.figure == ACCURACY
            else frame[col <= pick.value + 1e-12]
        )
        if inside.empty:
            best = col.max() if pick.figure == ACCURACY else col.min()
            raise UserError(
                f"bad value {pick.text!r}: no front point satisfies it (best {pick.figure} on the front: {best:.4g})",
                key="--pick",
            )
        cost = front.cost_figures[0] if front.cost_figures else figure
        order = inside.sort_values([cost, ACCURACY, "trial"], ascending=[True, False, True])
        return order.iloc[0]
    inside = frame[col <= pick.value]
    if inside.empty:
        raise UserError(
            f"bad value {pick.text!r}: no front point satisfies it "
            f"(smallest {figure} on the front: {col.min():.6g})",
            key="--pick",
        )
    order = inside.sort_values([ACCURACY, figure, "trial"], ascending=[False, True, True])
    if np.isnan(order[ACCURACY].iloc[0]) or math.isnan(float(order[ACCURACY].iloc[0])):
        raise UserError(
            f"bad value {pick.text!r}: the points inside the budget have no accuracy", key="--pick"
        )
    return order.iloc[0]


def run_ort_threads(run_dir: Path) -> tuple[int, str]:
    """(threads, why): the intra-op threads of the ONNX Runtime profile the run's latency was
    predicted for (``latency_fidelity.json``), so that the export is timed as the search
    promised; 1 when the run has none. The file is input like any other: a count that is not a
    whole number from 1 to this machine's CPUs is ignored."""
    import json
    import os

    try:
        data = json.loads((Path(run_dir) / "latency_fidelity.json").read_text())
        profiles = data["profiles"]
        found = [
            (name, p["threads"])
            for name, p in profiles.items()
            if isinstance(p, dict)
            and (p.get("fingerprint") or {}).get("runtime") == "onnxruntime"
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 1, "the run has no ONNX Runtime profile"
    for name, threads in found:
        if isinstance(threads, int) and not isinstance(threads, bool) and 1 <= threads <= (os.cpu_count() or 1):
            return threads, f"the threads of the run's profile {name}"
    return 1, "the run has no ONNX Runtime profile"
