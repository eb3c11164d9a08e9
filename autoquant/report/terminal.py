"""Compact rich tables for people working over SSH."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from autoquant.report.rundata import interval_of, within_noise


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


NOISE_MARK = "≈"


def _interval(row, figure: str) -> str:
    bounds = interval_of(row, figure)
    return "-" if bounds is None else f"{bounds[0]:.3f}-{bounds[1]:.3f}"


def _drop(row) -> str:
    text = _fmt(row["accuracy_drop"] * 100, "+.2f")
    return f"{text} {NOISE_MARK}" if within_noise(row) else text


def run_front_table(front, frame) -> Table:
    """``front_table`` of a run's front, titled with its size among all the run's configs."""
    return front_table(front, title=f"Pareto front ({len(front)} of {len(frame)} configs)")


def front_table(front, *, title: str) -> Table:
    """One row per config; accuracy is measured on the task's held-out data (with its 95%
    bootstrap interval where the run has one), sizes and bits are exact for the config. A drop
    within the evaluation set's noise of fp32 is marked ``≈``."""
    has_interval = "accuracy_lo" in front.columns
    noise = (
        f"; 95%: bootstrap interval on the eval set; {NOISE_MARK}: within noise of fp32 "
        "(the paired interval of the drop contains 0)"
        if has_interval
        else ""
    )
    table = Table(
        title=title,
        title_justify="left",
        caption="acc: measured; drop: points below fp32; KiB, x (smaller than fp32), bits, "
        f"MBOPs: exact{noise}",
        caption_justify="left",
    )
    table.add_column("trial", justify="right")
    table.add_column("ref")
    table.add_column("acc", justify="right")
    if has_interval:
        table.add_column("95%", justify="right")
    table.add_column("drop", justify="right", no_wrap=True)
    table.add_column("KiB", justify="right")
    table.add_column("x", justify="right")
    table.add_column("bits", justify="right")
    table.add_column("MBOPs", justify="right")
    latency_cols = [c for c in front.columns if c.startswith("latency_ms@") and not c.endswith("_source")]
    for col in latency_cols:
        source = front.get(f"{col}_source")
        kind = "/".join(sorted(set(source.dropna()))) if source is not None else "measured"
        table.add_column(f"ms {col.removeprefix('latency_ms@')} ({kind})", justify="right")
    layer_cols = [c for c in front.columns if c.startswith("layer:")]
    listed = len(layer_cols) <= MAX_LISTED_LAYERS
    table.add_column(
        "layers: " + " ".join(c.removeprefix("layer:") for c in layer_cols)
        if listed
        else f"choices of the {len(layer_cols)} layers (count x label)"
    )
    for _, row in front.iterrows():
        table.add_row(
            str(row["trial"]),
            row["reference"] if isinstance(row["reference"], str) else "",
            _fmt(row["accuracy"], ".4f"),
            *([_interval(row, "accuracy")] if has_interval else []),
            _drop(row),
            _fmt(row["size_bytes"] / 1024, ".1f"),
            _fmt(row["size_ratio"], ".2f"),
            _fmt(row["mean_weight_bits"], ".2f"),
            _fmt(row["bops"] / 1e6, ".1f"),
            *[_fmt(row[c], ".4g") for c in latency_cols],
            " ".join(str(row[c]) for c in layer_cols) if listed else choice_counts(row, layer_cols),
        )
    return table


# Above this many layers a row lists how many layers took each choice instead of every layer's
# (36 labels wrap a transformer's row over dozens of lines); report.html has the per-layer map.
MAX_LISTED_LAYERS = 8


def choice_counts(row, layer_cols: list[str]) -> str:
    """``24x w8cs-a8 12x f32-a32``: the choices of a row, most frequent first."""
    from collections import Counter

    counts = Counter(str(row[c]) for c in layer_cols)
    return " ".join(f"{n}x {label}" for label, n in counts.most_common())


def compare_tables(comp) -> list[Table]:
    """Per objective pair: hypervolume, front size, dominated share, best accuracy per budget."""
    tables = []
    for p in comp.pairs:
        t = Table(title=f"accuracy against {p.cost.name}: fronts compared", title_justify="left",
                  caption=f"hypervolume from the shared reference (accuracy {p.reference[0]:.4f}, "
                          f"{p.cost.figure} {p.reference[1]:.4g}); accuracy measured, {p.cost.figure} "
                          + "/".join(sorted({r.source_of(p.cost.figure) for r in comp.runs})),
                  caption_justify="left")
        t.add_column("run")
        t.add_column("hypervolume", justify="right")
        t.add_column("front pts", justify="right")
        t.add_column("dominated", justify="right")
        for b in p.budgets:
            t.add_column(f"best acc, {p.cost.figure} <= {b['budget'][p.cost.figure]:.4g}", justify="right")
        for r in comp.runs:
            t.add_row(
                r.name, f"{p.hypervolume[r.name]:.5g}", str(p.front_points[r.name]),
                f"{p.dominated_fraction[r.name] * 100:.0f}%",
                *[("-" if b["best_accuracy"][r.name] is None else f"{b['best_accuracy'][r.name]:.4f}")
                  + (" *" if r.name in b["winners"] else "") for b in p.budgets],
            )
        tables.append(t)
    return tables
