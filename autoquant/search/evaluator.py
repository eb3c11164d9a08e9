"""Measure one config: simulated quantization, the task metric with its uncertainty, exact costs.

The accuracy figure carries a 95% percentile interval from a seeded bootstrap over the
evaluation samples (``autoquant.tasks.base``: the outputs are computed once, each resample costs
one metric call, or one gather of per-sample scores). Every config of a run is resampled with the
same indices, and so is the float32 model (its outputs are computed once per evaluator, lazily),
so ``accuracy_drop`` (float32's accuracy minus the config's) gets a *paired* interval: the drop
is within the evaluation set's noise when that interval contains 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from autoquant.measurement import Figure, Measurement
from autoquant.space import QuantConfig, config_cost
from autoquant.space.values import LayerInfo
from autoquant.tasks.base import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED


@dataclass(frozen=True)
class _Fp32Reference:
    value: float
    resampled: Any  # numpy array [resamples]: float32's metric on each resample


@dataclass(frozen=True)
class Evaluator:
    task: object  # autoquant.tasks.Task; typed loosely to keep torch out of this import
    layers: tuple[LayerInfo, ...]
    calibration: object  # autoquant.quant.Calibration
    other_param_bytes: int
    batch_size: int = 512
    # One autoquant.search.latency.RunLatency per hardware profile: each adds the figure
    # latency_ms@<profile>, predicted by its latency model (never measured here).
    latency: tuple = ()
    resamples: int = BOOTSTRAP_RESAMPLES
    interval_seed: int = BOOTSTRAP_SEED
    # The bootstrap indices and the float32 reference, computed at the first measurement.
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def costs(self, config: QuantConfig) -> tuple[tuple[str, Figure], ...]:
        cost = config_cost(self.layers, config, other_param_bytes=self.other_param_bytes)
        return (
            ("size_bytes", Figure(float(cost.size_bytes), "exact")),
            ("mean_weight_bits", Figure(cost.mean_weight_bits, "exact")),
            ("bops", Figure(float(cost.bops), "exact")),
            *((lat.figure, lat.predict(config)) for lat in self.latency),
        )

    def measure(self, config: QuantConfig) -> Measurement:
        """Never raises for a bad config: the failure becomes a failed figure with its reason.

        Figures: ``accuracy`` (measured, with its interval), ``accuracy_drop`` (measured against
        the float32 model on the same samples, with the paired interval; absent when the float32
        model itself cannot be evaluated or the accuracy failed), then the costs."""
        from autoquant.quant import apply
        from autoquant.tasks.base import all_finite, eval_outputs

        start = time.perf_counter()
        accuracy: tuple[tuple[str, Figure], ...]
        try:
            model = apply(self.task.model, config, self.calibration)
            outputs = eval_outputs(self.task, model, batch_size=self.batch_size)
            if not all_finite(outputs):
                failed = Figure.failed("the quantized model produced non-finite outputs")
                accuracy = (("accuracy", failed),)
            else:
                accuracy = self._accuracy_figures(outputs)
        except Exception as exc:  # a config the simulation can't run is data, not a crash
            accuracy = (("accuracy", Figure.failed(f"{type(exc).__name__}: {exc}")),)
        figures = (*accuracy, *self.costs(config))
        return Measurement(config.hash, figures, duration_s=time.perf_counter() - start)

    def _accuracy_figures(self, outputs) -> tuple[tuple[str, Figure], ...]:
        from autoquant.tasks.base import percentile_interval, resampled_metric

        value = float(self.task.metric(outputs, self.task.eval_targets))
        if math.isnan(value):
            return (("accuracy", Figure.failed("the task metric is NaN")),)
        indices = self._indices()
        samples = indices.shape[1]
        resampled = resampled_metric(self.task, outputs, indices)
        interval = percentile_interval(resampled, samples=samples)
        out = [("accuracy", Figure(value, "measured", interval=interval))]
        ref = self.fp32_reference()
        if ref is not None:
            drop = percentile_interval(ref.resampled - resampled, samples=samples)
            out.append(("accuracy_drop", Figure(ref.value - value, "measured", interval=drop)))
        return tuple(out)

    def _indices(self):
        if "indices" not in self._cache:
            from autoquant.tasks.base import bootstrap_indices, eval_sample_count

            self._cache["indices"] = bootstrap_indices(
                eval_sample_count(self.task), resamples=self.resamples, seed=self.interval_seed
            )
        return self._cache["indices"]

    def fp32_reference(self) -> _Fp32Reference | None:
        """The float32 model's metric, whole and on each resample; computed once. None when
        the float32 model cannot be evaluated (then no config gets an ``accuracy_drop``)."""
        if "fp32" not in self._cache:
            from autoquant.tasks.base import all_finite, eval_outputs, resampled_metric

            ref = None
            try:
                outputs = eval_outputs(self.task, self.task.model, batch_size=self.batch_size)
                if all_finite(outputs):
                    value = float(self.task.metric(outputs, self.task.eval_targets))
                    ref = _Fp32Reference(
                        value, resampled_metric(self.task, outputs, self._indices())
                    )
            except Exception:  # a broken task shows in the fp32 reference trial's own figure
                ref = None
            self._cache["fp32"] = ref
        return self._cache["fp32"]
