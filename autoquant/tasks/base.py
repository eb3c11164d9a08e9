"""The task contract: a model, calibration data, evaluation data and a metric."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Task:
    """What a search needs to know about a network.

    Attributes:
        name: shown in reports.
        model: the float32 ``torch.nn.Module`` to quantize; quantizable layers are its
            ``nn.Linear`` and ``nn.Conv2d`` modules. It is never modified.
        calibration_inputs: model inputs (first axis = samples) used to calibrate activation
            ranges: one float tensor, or a mapping ``name -> tensor`` for a model with several
            inputs (``{"input_ids": ..., "attention_mask": ...}``, integer dtypes allowed), which
            is then called as ``model(**inputs)``; see ``autoquant.tasks.inputs``. A few hundred
            samples are plenty.
        eval_inputs, eval_targets: held-out data the metric is measured on (same kind of inputs
            as ``calibration_inputs``).
        metric: ``metric(outputs, targets) -> float``, higher is better (accuracy in [0, 1]).
        input_shape: the shape of one batch-1 input, e.g. ``(1, 1, 8, 8)``; for named inputs,
            the shape of the first one (``(1, seq)``).
    """

    name: str
    model: torch.nn.Module
    calibration_inputs: torch.Tensor
    eval_inputs: torch.Tensor
    eval_targets: torch.Tensor
    metric: Callable[[torch.Tensor, torch.Tensor], float]
    input_shape: tuple[int, ...]
    metric_name: str = "accuracy"
    description: str = ""
    # Set by autoquant when it loads the task (never by the task function): the (conv, bn) pairs
    # folded into ``model`` and the BatchNorm modules left as they are, with the reason.
    folded_batchnorm: tuple[tuple[str, str], ...] = ()
    unfolded_batchnorm: dict[str, str] = field(default_factory=dict)

    def example_inputs(self, batch: int = 1):
        """A probe batch for tracing and export: zeros of ``input_shape`` for one tensor (as
        layer discovery always used), the first ``batch`` calibration samples for named inputs
        (token ids of zeros would not be a sentence)."""
        import torch

        from autoquant.tasks.inputs import is_named, take

        if is_named(self.calibration_inputs):
            return take(self.calibration_inputs, batch)
        return torch.zeros((batch, *self.input_shape[1:]))


def top1_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float((outputs.argmax(dim=-1) == targets).float().mean())


def evaluate(task: Task, model: torch.nn.Module, *, batch_size: int = 512) -> float:
    """The task metric of ``model`` on the task's evaluation data. NaN if the model produces
    non-finite outputs (the caller records that as a failed measurement)."""
    import torch

    from autoquant.tasks.inputs import batches, run_model

    model.eval()
    with torch.no_grad():
        out = torch.cat([run_model(model, b) for b in batches(task.eval_inputs, batch_size)])
    if not torch.isfinite(out).all():
        return math.nan
    return float(task.metric(out, task.eval_targets))
