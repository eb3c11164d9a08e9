"""A fidelity summary (``validation.check_latency_model``) in words: one line a person reads
after ``autoquant profile --validate`` and after a search's latency check."""

from __future__ import annotations

import math

from autoquant.latency.validation import busy


def fidelity_line(summary: dict) -> str:
    """The model's fidelity figures beside the plain kernel sum's, one line."""
    if not summary.get("measured"):
        return "no held-out config was measured end to end"
    plain = summary.get("plain_sum", {})
    return (
        f"over {summary['measured']} held-out configs: model (predicted) "
        f"{summary['within_10pct']:.0%} within ±10%, MAPE {summary['mape']:.1%}, max "
        f"{summary['max_abs_rel_error']:.0%}, Spearman {summary['spearman']:.3f}; plain per-layer "
        f"kernel sum {plain.get('within_10pct', math.nan):.0%} within ±10%, MAPE "
        f"{plain.get('mape', math.nan):.1%}, Spearman {plain.get('spearman', math.nan):.3f}"
        + noise_note(
            summary.get("end_to_end_round_spread", math.nan),
            summary.get("end_to_end_round_drift", math.nan),
        )
        + ceiling_note(summary.get("end_to_end_repeat_spearman"), summary.get("spearman_ceiling"))
        + busy_note(summary)
    )


def busy_note(summary: dict) -> str:
    """A warning when the end-to-end timings ran on a busy host, else nothing."""
    if not busy(summary):
        return ""
    return (
        f"; WARNING: this host was busy while timing (load average {summary['load_average']:.1f} "
        f"on {summary['cpus']} CPUs): other processes' work is in these medians, and a config "
        "visited in a busy moment is off by far more than the model; measure.statistic: min "
        "(profile --statistic min) reads the same samples' fastest, or time on a quiet host"
    )


def ceiling_note(repeat: float | None, ceiling: float | None) -> str:
    """How well the measurement ranks the configs against itself, when known."""
    if repeat is None or repeat != repeat:
        return ""
    known = ceiling is not None and ceiling == ceiling
    best = f", so an exact predictor would reach about {ceiling:.3f}" if known else ""
    return (
        f"; measured twice (two halves of the rounds) the configs rank with Spearman "
        f"{repeat:.3f}{best}"
    )


def noise_note(spread: float | None, drift: float | None = None) -> str:
    """How much the measurements themselves moved, when known."""
    if spread is None or spread != spread:  # one round (NaN; None once written as JSON)
        return ""
    machine = (
        f"the machine's speed moved {drift:.1%} between rounds (every config with it), "
        if drift is not None and drift == drift
        else ""
    )
    return (
        f"; measured: {machine}a config's end-to-end median {spread:.1%} against the others' "
        "(median over configs), the noise these figures sit on"
    )
