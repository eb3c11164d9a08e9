"""The latency model: a config's latency composed from per-layer table entries.

    predicted(config) = sum over layers of kernel(layer, choice) + residual

``residual`` is measured once per (device, batch): the float32 model's end-to-end latency minus
the sum of its float32 layer kernels. It covers everything that is not a quantizable layer
(activations, pooling, reshapes, the runtime's per-call overhead). It does *not* cover the
quantize / dequantize / cast operators a quantized config adds between layers: the validation
against measured end-to-end latency is there to show how much that misses.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from autoquant.hw.timing import KernelTiming
from autoquant.measurement import Figure
from autoquant.space.values import LayerInfo, QuantChoice, QuantConfig


@dataclass(frozen=True)
class LatencyModel:
    layers: tuple[LayerInfo, ...]
    per_layer: dict[tuple[str, str], KernelTiming]  # (layer name, choice label) -> timing
    residual_us: float
    fp32_e2e_us: float
    # Set when the fit had to correct the residual (the reason, one line); None otherwise.
    note: str | None = None

    def predict(self, config: QuantConfig) -> Figure:
        """Milliseconds, ``predicted``; ``failed`` with the reason when a layer has no timing."""
        total = self.residual_us
        mapping = config.as_mapping()
        for layer in self.layers:
            choice = mapping.get(layer.name, QuantChoice())
            timing = self.per_layer.get((layer.name, choice.label))
            if timing is None:
                return Figure.failed(f"{layer.name} {choice.label}: not in the latency table")
            if not timing.ok:
                return Figure.failed(
                    f"{layer.name} {choice.label}: {timing.status}: {timing.error}"
                )
            total += timing.median_us
        return Figure(total / 1000.0, "predicted")


def fit_latency_model(
    layers: tuple[LayerInfo, ...],
    per_layer: dict[tuple[str, str], KernelTiming],
    fp32_e2e_us: float,
) -> LatencyModel:
    """The residual from one end-to-end float32 measurement. Raises ValueError when a float32
    layer timing is missing or failed (the residual would be meaningless)."""
    kernels = 0.0
    for layer in layers:
        timing = per_layer.get((layer.name, QuantChoice().label))
        if timing is None or not timing.ok:
            raise ValueError(f"no float32 timing for layer {layer.name}")
        kernels += timing.median_us
    residual = fp32_e2e_us - kernels
    if residual < 0:
        # The kernels alone can't take longer than the whole model: the table's timings and this
        # end-to-end timing were taken under different conditions (a busy machine, most often).
        # A negative residual would push predictions of fast configs below zero.
        note = (
            f"the float32 kernels sum to {kernels:.1f} µs, more than the float32 model measured "
            f"end to end ({fp32_e2e_us:.1f} µs): the table's kernel timings and this end-to-end "
            f"timing disagree (taken under different machine load?); residual set to 0 instead "
            f"of {residual:.1f} µs, so predictions are the plain per-layer sum"
        )
        return LatencyModel(layers, dict(per_layer), 0.0, fp32_e2e_us, note)
    return LatencyModel(layers, dict(per_layer), residual, fp32_e2e_us)


@dataclass(frozen=True)
class ValidationRow:
    config: QuantConfig
    predicted_ms: float
    measured_ms: float
    measured_spread: float
    error: str | None = None

    @property
    def rel_error(self) -> float:
        if self.error or not self.measured_ms > 0:
            return math.nan
        return (self.predicted_ms - self.measured_ms) / self.measured_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "config_hash": self.config.hash,
            "predicted_ms": self.predicted_ms,
            "measured_ms": self.measured_ms,
            "measured_spread": self.measured_spread,
            "rel_error": self.rel_error,
            "error": self.error,
        }


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a of two equally long lists (NaN with fewer than two pairs)."""
    n = len(a)
    concordant = discordant = 0
    for i in range(n):
        for j in range(i + 1, n):
            s = (a[i] - a[j]) * (b[i] - b[j])
            concordant += s > 0
            discordant += s < 0
    pairs = n * (n - 1) // 2
    return (concordant - discordant) / pairs if pairs else math.nan


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties given their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman_rho(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson on ranks; NaN with fewer than two values or a
    constant list)."""
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


def fidelity(predicted_ms: list[float], measured_ms: list[float]) -> dict[str, float]:
    """How well predictions match measurements: share within ±10 %, MAPE, max error, rank
    correlations."""
    rel = [abs(p - m) / m for p, m in zip(predicted_ms, measured_ms)]
    return {
        "within_10pct": sum(r <= 0.10 for r in rel) / len(rel),
        "mape": statistics.fmean(rel),
        "max_abs_rel_error": max(rel),
        "spearman": spearman_rho(predicted_ms, measured_ms),
        "kendall_tau": kendall_tau(predicted_ms, measured_ms),
    }


def summarize(rows: list[ValidationRow], *, residual_us: float | None = None) -> dict[str, Any]:
    """Error figures of the model's predictions; with ``residual_us``, the same figures of the
    plain per-layer kernel sum (prediction minus residual) under ``plain_sum``."""
    good = [r for r in rows if r.error is None and not math.isnan(r.rel_error)]
    if not good:
        return {"configs": len(rows), "measured": 0}
    rel = [abs(r.rel_error) for r in good]
    predicted = [r.predicted_ms for r in good]
    measured = [r.measured_ms for r in good]
    out: dict[str, Any] = {
        "configs": len(rows),
        "measured": len(good),
        "mean_abs_rel_error": statistics.fmean(rel),
        "max_abs_rel_error": max(rel),
        "mean_abs_error_ms": statistics.fmean(abs(r.predicted_ms - r.measured_ms) for r in good),
        "kendall_tau": kendall_tau(predicted, measured),
        "within_10pct": sum(r <= 0.10 for r in rel) / len(rel),
        "mape": statistics.fmean(rel),
        "spearman": spearman_rho(predicted, measured),
    }
    if residual_us is not None:
        out["plain_sum"] = fidelity([p - residual_us / 1000.0 for p in predicted], measured)
    return out
