"""Tables of a run, computed from the ledger, and the files they are written to.

``trials.parquet`` has one row per measured or failed config (a trial that re-proposed a measured
config is bookkeeping of the sampler and is not a row). ``pareto.csv`` holds the non-dominated
rows among the complete, feasible ones.

A figure with an interval adds ``<figure>_lo`` / ``<figure>_hi`` (``accuracy_lo``,
``accuracy_drop_lo``, ...). ``eval_samples`` is how many samples the accuracy was measured on,
and ``within_noise_of_fp32`` says whether the drop against fp32 is within the evaluation set's
noise (its paired interval contains 0): True / False, or None where the ledger has no interval
(runs recorded before intervals existed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from autoquant.pareto import non_dominated_mask
from autoquant.predict.record import predicted_columns
from autoquant.rundir import atomic_write
from autoquant.search.ledger import LedgerEntry
from autoquant.search.objectives import Objective

LAYER_PREFIX = "layer:"


def _fp32_reference(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    for row in rows:
        if row["reference"] == "fp32" and row["state"] == "COMPLETE":
            return row
    return None


def trial_rows(
    ledger: list[LedgerEntry], objectives: tuple[Objective, ...]
) -> list[dict[str, Any]]:
    rows = []
    for entry in ledger:
        if entry.reused_from is not None or entry.skipped:
            continue
        if entry.state not in ("COMPLETE", "FAIL"):
            continue
        row: dict[str, Any] = {
            "trial": entry.number,
            "state": entry.state,
            "config_hash": entry.config_hash,
            "reference": entry.reference,
            "duration_s": entry.duration_s,
            "fail_reason": entry.fail_reason,
        }
        for name, figure in entry.figures.items():
            row[name] = figure.value
            row[f"{name}_source"] = figure.source
            if figure.interval is not None:
                row[f"{name}_lo"] = figure.interval.lo
                row[f"{name}_hi"] = figure.interval.hi
        row.update(_noise_columns(entry))
        if entry.predicted is not None:
            row.update(predicted_columns(entry.predicted))
        if entry.constraints is not None:
            row["feasible"] = all(c <= 0 for c in entry.constraints)
        else:
            row["feasible"] = entry.state == "COMPLETE"
        # A trial interrupted before the sampler chose its config has no config: still a row,
        # so the interruption is on record.
        if entry.config is not None:
            for layer, choice in entry.config.choices:
                row[f"{LAYER_PREFIX}{layer}"] = choice.label
        row["config"] = entry.config.to_json() if entry.config is not None else None
        rows.append(row)
    fp32 = _fp32_reference(rows)
    for row in rows:
        ok = fp32 is not None and row["state"] == "COMPLETE"
        # The drop against the fp32 trial. A run without one (a space that does not allow
        # fp32 everywhere) keeps the evaluator's drop against the float32 model, which is the
        # same number where both exist.
        if ok:
            row["accuracy_drop"] = fp32["accuracy"] - row["accuracy"]
        elif row["state"] != "COMPLETE" or "accuracy_drop" not in row:
            row["accuracy_drop"] = math.nan
        row["size_ratio"] = fp32["size_bytes"] / row["size_bytes"] if ok else math.nan
    front = front_mask(rows, objectives)
    for row, on in zip(rows, front):
        row["on_front"] = bool(on)
    return rows


def _noise_columns(entry: LedgerEntry) -> dict[str, Any]:
    accuracy = entry.figures.get("accuracy")
    drop = entry.figures.get("accuracy_drop")
    out: dict[str, Any] = {"within_noise_of_fp32": None}
    if accuracy is not None and accuracy.interval is not None:
        out["eval_samples"] = accuracy.interval.samples
    if drop is not None and drop.interval is not None and drop.source == "measured":
        out["within_noise_of_fp32"] = drop.interval.contains(0.0)
    return out


def front_mask(rows: list[dict[str, Any]], objectives: tuple[Objective, ...]) -> np.ndarray:
    eligible = [i for i, r in enumerate(rows) if r["state"] == "COMPLETE" and r["feasible"]]
    mask = np.zeros(len(rows), dtype=bool)
    if not eligible:
        return mask
    values = np.array([[rows[i][o.figure] for o in objectives] for i in eligible], dtype=float)
    on = non_dominated_mask(values, [o.direction for o in objectives])
    mask[np.array(eligible)[on]] = True
    return mask


def trials_frame(rows: list[dict[str, Any]]):
    import pandas as pd

    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    first = [
        "trial",
        "state",
        "reference",
        "config_hash",
        "accuracy",
        "accuracy_source",
        "accuracy_lo",
        "accuracy_hi",
        "accuracy_drop",
        "accuracy_drop_lo",
        "accuracy_drop_hi",
        "within_noise_of_fp32",
        "eval_samples",
        "size_bytes",
        "size_bytes_source",
        "size_ratio",
        "mean_weight_bits",
        "bops",
        "feasible",
        "on_front",
    ]
    ordered = [c for c in first if c in frame.columns]
    return frame[ordered + [c for c in frame.columns if c not in ordered]]


def pareto_frame(frame, objectives: tuple[Objective, ...]):
    if frame.empty:
        return frame
    front = frame[frame["on_front"]].copy()
    cost = [o.figure for o in objectives if o.direction == "minimize"]
    return front.sort_values(cost + ["trial"]).reset_index(drop=True)


def write_tables(run_dir: Path, ledger: list[LedgerEntry], objectives: tuple[Objective, ...]):
    """Write ``trials.parquet`` and ``pareto.csv``; returns (trials, pareto) frames."""
    frame = trials_frame(trial_rows(ledger, objectives))
    front = pareto_frame(frame, objectives)
    atomic_write(run_dir / "trials.parquet", lambda p: frame.to_parquet(p, index=False))
    atomic_write(run_dir / "pareto.csv", lambda p: front.to_csv(p, index=False))
    return frame, front


def write_run_info(run_dir: Path, outcome: Any, extra: dict[str, Any] | None = None) -> None:
    """``run.json``: the budget the last invocation used and the versions it ran with (and
    ``extra``: where the study lives, redacted, for a shared one)."""
    import json

    from autoquant.versions import package_versions

    info = {
        "measured": outcome.measured,
        "failed": outcome.failed,
        "new_measurements": outcome.new_measurements,
        "repeat_proposals": outcome.reused,
        "interrupted_before": outcome.interrupted_before,
        "stopped_because": outcome.stopped_because,
        "elapsed_s": outcome.elapsed_s,
        "versions": package_versions(),
        **(extra or {}),
    }
    atomic_write(run_dir / "run.json", lambda p: p.write_text(json.dumps(info, indent=2)))
