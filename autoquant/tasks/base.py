"""The task contract: a model, calibration data, evaluation data and a metric."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
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
        calibration_inputs: a tensor of model inputs (first axis = samples) used to calibrate
            activation ranges. A few hundred samples are plenty.
        eval_inputs, eval_targets: held-out data the metric is measured on.
        metric: ``metric(outputs, targets) -> float``, higher is better (accuracy in [0, 1]).
        input_shape: the shape of one batch-1 input, e.g. ``(1, 1, 8, 8)``.
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


def top1_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float((outputs.argmax(dim=-1) == targets).float().mean())


def evaluate(task: Task, model: torch.nn.Module, *, batch_size: int = 512) -> float:
    """The task metric of ``model`` on the task's evaluation data. NaN if the model produces
    non-finite outputs (the caller records that as a failed measurement)."""
    import torch

    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(task.eval_inputs), batch_size):
            outputs.append(model(task.eval_inputs[start : start + batch_size]))
    out = torch.cat(outputs)
    if not torch.isfinite(out).all():
        return math.nan
    return float(task.metric(out, task.eval_targets))
