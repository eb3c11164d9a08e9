"""What a whole-model measurement feeds the model: a shape, or the task's own inputs.

A whole-model timing (``LatencyBackend.measure_model`` / ``prepare_model``, the validation, the
search's latency model) takes either

* a batch-1 input shape ``(1, C, H, W)``: random float32 inputs of it, as always (the values of
  one float tensor move the int8 calibration scales, not the latency); or
* a task's example inputs (``task_inputs``): one tensor, or named tensors (``input_ids``,
  ``attention_mask``...). One *float* tensor is treated like its shape. Named or integer inputs
  are *real* samples, fed as they are and repeated to the batch size: random token ids would not
  be a sentence, and an attention mask's values decide what the model computes.

``ModelInputs.of`` normalises the three forms, so every backend handles them one way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import numpy as np
    import torch

    from autoquant.model_inputs import Inputs
    from autoquant.tasks.base import Task

# Samples a whole-model calibration runs on (fixed-seed random for a float input; the task's
# first calibration samples for named/integer inputs).
CALIBRATION_SAMPLES = 32

# What the hw functions accept as a model's inputs: a batch-1 shape, one tensor, named tensors.
InputsLike = Union[tuple[int, ...], "torch.Tensor", Mapping[str, "torch.Tensor"]]


def task_inputs(task: Task, batch: int = 1) -> Any:
    """The inputs whole-model measurements of ``task`` feed: ``Task.example_inputs`` with enough
    samples for the profile's ``batch`` and for a calibration (an integer single tensor, which
    ``example_inputs`` would give as float zeros, is taken from the calibration samples)."""
    from autoquant.model_inputs import is_named, take

    n = max(batch, CALIBRATION_SAMPLES)
    cal = task.calibration_inputs
    if not is_named(cal) and not cal.is_floating_point():
        return take(cal, n)
    return task.example_inputs(n)


@dataclass(frozen=True)
class ModelInputs:
    """A model's inputs for timing: random float32 of ``shape`` (batch 1), or ``samples``.

    Exactly one of ``shape`` and ``samples`` is set."""

    shape: tuple[int, ...] | None = None
    samples: Any = None  # autoquant.model_inputs.Inputs (first axis = samples)

    @classmethod
    def of(cls, inputs: InputsLike | ModelInputs) -> ModelInputs:
        """Normalise a shape, a tensor or named tensors (see the module text)."""
        if isinstance(inputs, ModelInputs):
            return inputs
        if isinstance(inputs, (tuple, list)) and all(isinstance(d, int) for d in inputs):
            shape = tuple(int(d) for d in inputs)
            if not shape:
                raise ValueError("an input shape needs at least a batch axis")
            return cls(shape=(1, *shape[1:]))
        if isinstance(inputs, Mapping):
            if not inputs:
                raise ValueError("named inputs: the mapping is empty")
            counts = {len(t) for t in inputs.values()}
            if len(counts) != 1 or 0 in counts:
                raise ValueError(
                    f"named inputs must share a non-empty first axis, got {sorted(counts)}"
                )
            return cls(samples=dict(inputs))
        if hasattr(inputs, "is_floating_point") and hasattr(inputs, "shape"):
            if len(inputs) == 0:
                raise ValueError("inputs: no sample")
            if inputs.is_floating_point():
                return cls(shape=(1, *(int(d) for d in inputs.shape[1:])))
            return cls(samples=inputs)
        raise TypeError(
            f"model inputs of type {type(inputs).__name__}; allowed: a batch-1 shape tuple, a "
            "tensor, or a mapping name -> tensor"
        )

    # --- what kind -------------------------------------------------------------------------

    @property
    def is_random(self) -> bool:
        """One float tensor: timed on fixed-seed random values."""
        return self.shape is not None

    @property
    def is_named(self) -> bool:
        from autoquant.model_inputs import is_named

        return is_named(self.samples)

    @property
    def names(self) -> tuple[str, ...]:
        from autoquant.model_inputs import input_names

        return ("input",) if self.is_random else input_names(self.samples)

    @property
    def float_shape(self) -> tuple[int, ...] | None:
        """The batch-1 shape of a single float input; None for named or integer inputs."""
        return self.shape

    def describe(self, batch: int) -> Any:
        """JSON-able shapes at ``batch`` (a list for one tensor, ``{name: list}`` otherwise)."""
        if self.is_random:
            return [batch, *self.shape[1:]]
        from autoquant.model_inputs import is_named, shapes

        per = {name: [batch, *s[1:]] for name, s in shapes(self.samples).items()}
        return per if is_named(self.samples) else next(iter(per.values()))

    def signature(self) -> Any:
        """What a whole model's latency depends on in its inputs, JSON-able: the batch-1 shape
        (a list: the form ``model_signature`` always hashed) or each input's per-sample shape
        and dtype."""
        if self.is_random:
            return list(self.shape)
        from autoquant.model_inputs import as_tuple

        return {
            name: [list(t.shape[1:]), str(t.dtype).removeprefix("torch.")]
            for name, t in zip(self.names, as_tuple(self.samples))
        }

    # --- values ----------------------------------------------------------------------------

    def batch(self, n: int, *, seed: int = 0) -> Inputs:
        """``n`` samples: fixed-seed random float32, or the samples repeated in turn."""
        import torch

        if self.is_random:
            generator = torch.Generator().manual_seed(seed)
            return torch.randn((n, *self.shape[1:]), generator=generator)
        from autoquant.model_inputs import is_named, sample_count

        index = torch.arange(n) % sample_count(self.samples)
        if is_named(self.samples):
            return {name: t[index] for name, t in self.samples.items()}
        return self.samples[index]

    def calibration(self, *, seed: int = 0) -> Inputs:
        """What a whole-model export calibrates on: ``CALIBRATION_SAMPLES`` random samples, or
        the samples given."""
        if self.is_random:
            return self.batch(CALIBRATION_SAMPLES, seed=seed)
        return self.samples

    def export_arg(self) -> Any:
        """What ``export_graph`` traces with: the batch-1 shape (its original form), or one
        sample of the inputs."""
        if self.is_random:
            return tuple(self.shape)
        from autoquant.model_inputs import take

        return take(self.samples, 1)

    def feeds(self, n: int, *, seed: int = 0) -> dict[str, np.ndarray]:
        """An ONNX Runtime feed of ``n`` samples (float32 / int64)."""
        from autoquant.model_inputs import to_feeds

        return to_feeds(self.batch(n, seed=seed))
