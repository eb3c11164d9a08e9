"""Measure one config: simulated quantization, the task metric, exact costs."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from autoquant.measurement import Figure, Measurement
from autoquant.space import QuantConfig, config_cost
from autoquant.space.values import LayerInfo


@dataclass(frozen=True)
class Evaluator:
    task: object  # autoquant.tasks.Task; typed loosely to keep torch out of this import
    layers: tuple[LayerInfo, ...]
    calibration: object  # autoquant.quant.Calibration
    other_param_bytes: int
    batch_size: int = 512
    # One autoquant.hw.search_latency.RunLatency per hardware profile: each adds the figure
    # latency_ms@<profile>, predicted by its latency model (never measured here).
    latency: tuple = ()

    def costs(self, config: QuantConfig) -> tuple[tuple[str, Figure], ...]:
        cost = config_cost(self.layers, config, other_param_bytes=self.other_param_bytes)
        return (
            ("size_bytes", Figure(float(cost.size_bytes), "exact")),
            ("mean_weight_bits", Figure(cost.mean_weight_bits, "exact")),
            ("bops", Figure(float(cost.bops), "exact")),
            *((lat.figure, lat.predict(config)) for lat in self.latency),
        )

    def measure(self, config: QuantConfig) -> Measurement:
        """Never raises for a bad config: the failure becomes a failed figure with its reason."""
        from autoquant.quant import apply
        from autoquant.tasks import evaluate

        start = time.perf_counter()
        try:
            model = apply(self.task.model, config, self.calibration)
            accuracy = evaluate(self.task, model, batch_size=self.batch_size)
            if math.isnan(accuracy):
                figure = Figure.failed("the quantized model produced non-finite outputs")
            else:
                figure = Figure(accuracy, "measured")
        except Exception as exc:  # a config the simulation can't run is data, not a crash
            figure = Figure.failed(f"{type(exc).__name__}: {exc}")
        figures = (("accuracy", figure), *self.costs(config))
        return Measurement(config.hash, figures, duration_s=time.perf_counter() - start)
