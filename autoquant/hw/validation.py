"""Check the latency model against measured end-to-end latency on the local device.

``validate_latency_model`` measures the float32 model once (the residual), then ``n`` random
configs drawn from the choices the table has timings for, each compiled whole (``tvm_model``)
and timed like the kernels; it returns the rows and their summary. Remote devices are not
supported yet (the whole-model executable would need uploading like the kernels).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from autoquant.hw.latency_model import (
    LatencyModel,
    ValidationRow,
    fit_latency_model,
    summarize,
)
from autoquant.hw.profiling import ProfileResult, parse_label
from autoquant.space.values import LayerInfo, QuantChoice, QuantConfig


@dataclass(frozen=True)
class ValidationResult:
    model: LatencyModel
    fp32_e2e_spread: float
    rows: tuple[ValidationRow, ...]
    elapsed_s: float

    def summary(self) -> dict[str, Any]:
        return summarize(list(self.rows), residual_us=self.model.residual_us)

    def to_dict(self) -> dict[str, Any]:
        return {
            "residual_us": self.model.residual_us,
            "residual_note": self.model.note,
            "fp32_e2e_us": self.model.fp32_e2e_us,
            "fp32_e2e_spread": self.fp32_e2e_spread,
            "summary": self.summary(),
            "rows": [r.to_dict() for r in self.rows],
            "elapsed_s": self.elapsed_s,
        }


def e2e_timing(
    backend: Any,
    model: Any,
    input_shape: tuple[int, ...],
    layers: tuple[LayerInfo, ...],
    config: QuantConfig,
) -> Any:
    """One config's end-to-end ``KernelTiming`` (impl ``model``), measured on the backend's
    device; a build or run error is a ``failed`` timing, never raised."""
    from autoquant.hw.timing import KernelTiming
    from autoquant.hw.tvm_model import build_model, time_model

    prof = backend.profile
    m = prof.spec.measure
    try:
        ex = build_model(
            model,
            input_shape,
            layers,
            config,
            batch=prof.spec.batch_size,
            target=backend.target,
            threads=prof.threads,
            vnni=backend.vnni,
        )
        samples, _ = time_model(
            ex,
            input_shape,
            batch=prof.spec.batch_size,
            warmup=m.warmup,
            number=m.number,
            repeat=m.repeat,
            min_repeat_ms=m.min_repeat_ms,
        )
    except Exception as exc:
        return KernelTiming.failed(
            f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1][:200]}", "model"
        )
    return KernelTiming.from_samples("model", samples)


def _e2e(
    backend: Any,
    model: Any,
    input_shape: tuple[int, ...],
    layers: tuple[LayerInfo, ...],
    config: QuantConfig,
) -> tuple[float, float, str | None]:
    """(median µs, relative IQR, error) of one config, end to end; never raises."""
    timing = e2e_timing(backend, model, input_shape, layers, config)
    if not timing.ok:
        return float("nan"), float("nan"), timing.error
    return timing.median_us, timing.spread, None


def validate_latency_model(
    backend: Any,
    model: Any,
    input_shape: tuple[int, ...],
    layers: tuple[LayerInfo, ...],
    profiled: ProfileResult,
    *,
    n: int,
    seed: int = 0,
) -> ValidationResult:
    """Fit the residual on the float32 model and compare predictions with ``n`` measured
    configs. ``profiled`` must hold float32 timings for every layer."""
    start = time.monotonic()
    per_layer = profiled.lookup()
    fp32 = QuantConfig.uniform(layers, QuantChoice())
    e2e_us, spread, error = _e2e(backend, model, input_shape, layers, fp32)
    if error:
        raise RuntimeError(f"the float32 model did not run end to end: {error}")
    latency_model = fit_latency_model(layers, per_layer, e2e_us)
    options = {
        layer.name: [
            parse_label(label)
            for (name, label), t in per_layer.items()
            if name == layer.name and t.ok
        ]
        for layer in layers
    }
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        config = QuantConfig.from_mapping(
            {layer.name: rng.choice(options[layer.name]) for layer in layers}
        )
        predicted = latency_model.predict(config)
        measured, m_spread, err = _e2e(backend, model, input_shape, layers, config)
        rows.append(
            ValidationRow(
                config, predicted.value, measured / 1000.0, m_spread, err or predicted.reason
            )
        )
    return ValidationResult(latency_model, spread, tuple(rows), time.monotonic() - start)
