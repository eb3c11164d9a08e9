"""The task contract: a model, calibration data, evaluation data and a metric; and how a model
is evaluated on it, with the metric's uncertainty on the evaluation set (a seeded bootstrap)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from autoquant.measurement import Interval

# The accuracy interval: a 95% percentile interval over this many bootstrap resamples of the
# evaluation samples, drawn from a generator seeded with BOOTSTRAP_SEED (every config of a run
# gets the same resamples, so two configs' intervals are paired).
BOOTSTRAP_RESAMPLES = 200
BOOTSTRAP_SEED = 0
INTERVAL_LEVEL = 0.95


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
            is then called as ``model(**inputs)``; see ``autoquant.model_inputs``. A few hundred
            samples are plenty.
        eval_inputs, eval_targets: held-out data the metric is measured on (same kind of inputs
            as ``calibration_inputs``).
        metric: ``metric(outputs, targets) -> float``, higher is better (accuracy in [0, 1]).
        input_shape: the shape of one batch-1 input, e.g. ``(1, 1, 8, 8)``; for named inputs,
            the shape of the first one (``(1, seq)``).
        sample_scores: optional, ``sample_scores(outputs, targets) -> tensor [N]``: the
            per-sample terms whose mean is ``metric`` (top-1 accuracy has them built in). With
            them the accuracy interval resamples these scores; without, it recomputes ``metric``
            on resampled outputs and targets, which is right for a mean over independent samples
            but not for a metric computed over the whole set (nearest neighbours among the eval
            samples: a resample puts duplicates in the collection), where this field is needed.
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
    sample_scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def example_inputs(self, batch: int = 1):
        """A probe batch for tracing and export: zeros of ``input_shape`` for one tensor (as
        layer discovery always used), the first ``batch`` calibration samples for named inputs
        (token ids of zeros would not be a sentence)."""
        import torch

        from autoquant.model_inputs import is_named, take

        if is_named(self.calibration_inputs):
            return take(self.calibration_inputs, batch)
        return torch.zeros((batch, *self.input_shape[1:]))


def top1_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float((outputs.argmax(dim=-1) == targets).float().mean())


def top1_correct(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample, 1.0 where the top-1 class is the target: ``top1_accuracy``'s terms."""
    return (outputs.argmax(dim=-1) == targets).double()


# Per-sample forms of the built-in metrics, used when a task gives no ``sample_scores``.
SAMPLE_SCORES: dict[Callable[..., float], Callable[..., Any]] = {top1_accuracy: top1_correct}


def eval_outputs(task: Task, model: torch.nn.Module, *, batch_size: int = 512) -> torch.Tensor:
    """``model``'s outputs on the task's evaluation data, batch by batch, in eval mode."""
    import torch

    from autoquant.model_inputs import batches, run_model

    model.eval()
    with torch.no_grad():
        return torch.cat([run_model(model, b) for b in batches(task.eval_inputs, batch_size)])


def all_finite(outputs: torch.Tensor) -> bool:
    import torch

    return bool(torch.isfinite(outputs).all())


def evaluate(task: Task, model: torch.nn.Module, *, batch_size: int = 512) -> float:
    """The task metric of ``model`` on the task's evaluation data. NaN if the model produces
    non-finite outputs (the caller records that as a failed measurement)."""
    out = eval_outputs(task, model, batch_size=batch_size)
    if not all_finite(out):
        return math.nan
    return float(task.metric(out, task.eval_targets))


def eval_sample_count(task: Task) -> int:
    from autoquant.model_inputs import sample_count

    return sample_count(task.eval_inputs)


def with_eval_samples(
    task: Task, samples: int | None, *, file: str = "spec", key: str = "evaluation.eval_samples"
) -> Task:
    """``task`` evaluated on its first ``samples`` held-out samples; ``None``: all of them.

    Asking for more samples than the task has is a ``UserError`` rather than a silent clamp: the
    spec would otherwise claim a precision its figures do not have."""
    import dataclasses

    from autoquant.errors import UserError
    from autoquant.model_inputs import take

    have = eval_sample_count(task)
    if samples is None or samples == have:
        return task
    if samples > have:
        raise UserError(
            f"bad value {samples}: task {task.name!r} has {have} evaluation samples; "
            f"allowed: 1 to {have}, or null for all of them",
            file=file,
            key=key,
        )
    return dataclasses.replace(
        task,
        eval_inputs=take(task.eval_inputs, samples),
        eval_targets=take(task.eval_targets, samples),
    )


def bootstrap_indices(
    samples: int, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> torch.Tensor:
    """``[resamples, samples]`` sample indices drawn with replacement by a seeded generator.
    The same for every config of a run: that is what pairs two configs' resampled figures."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, samples, (resamples, samples), generator=generator)


def _select(data: Any, index: torch.Tensor) -> Any:
    from autoquant.model_inputs import is_named

    if is_named(data):
        return {name: t[index] for name, t in data.items()}
    return data[index]


def _builtin_sample_scores(metric: Callable[..., float]) -> Callable[..., Any] | None:
    try:
        return SAMPLE_SCORES.get(metric)
    except TypeError:  # an unhashable callable object is no built-in metric
        return None


def resampled_metric(task: Task, outputs: torch.Tensor, indices: torch.Tensor) -> np.ndarray:
    """The task metric on each resample (row of ``indices``) of the evaluation samples, from
    outputs already computed: the mean of the per-sample scores where the metric has them
    (``Task.sample_scores`` or ``SAMPLE_SCORES``), else one ``metric`` call per resample."""
    import numpy as np

    scores_fn = task.sample_scores or _builtin_sample_scores(task.metric)
    if scores_fn is not None:
        scores = scores_fn(outputs, task.eval_targets).detach().double().cpu()
        return scores[indices].mean(dim=1).numpy()
    targets = task.eval_targets
    return np.array(
        [float(task.metric(_select(outputs, row), _select(targets, row))) for row in indices]
    )


def percentile_interval(
    resampled: np.ndarray, *, samples: int, level: float = INTERVAL_LEVEL
) -> Interval | None:
    """The percentile interval of bootstrap values at ``level``; None if any is not finite."""
    import numpy as np

    from autoquant.measurement import Interval

    values = np.asarray(resampled, dtype=float)
    if values.size == 0 or not np.isfinite(values).all():
        return None
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(values, [tail, 1.0 - tail])
    return Interval(float(lo), float(hi), level, samples, int(values.size))
