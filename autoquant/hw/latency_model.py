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
    return LatencyModel(layers, dict(per_layer), fp32_e2e_us - kernels, fp32_e2e_us)


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


def summarize(rows: list[ValidationRow]) -> dict[str, Any]:
    good = [r for r in rows if r.error is None and not math.isnan(r.rel_error)]
    if not good:
        return {"configs": len(rows), "measured": 0}
    rel = [abs(r.rel_error) for r in good]
    return {
        "configs": len(rows),
        "measured": len(good),
        "mean_abs_rel_error": statistics.fmean(rel),
        "max_abs_rel_error": max(rel),
        "mean_abs_error_ms": statistics.fmean(abs(r.predicted_ms - r.measured_ms) for r in good),
        "kendall_tau": kendall_tau([r.predicted_ms for r in good], [r.measured_ms for r in good]),
    }
