"""Model inputs: one tensor, or several named tensors (token ids + attention mask).

A task's ``calibration_inputs`` and ``eval_inputs`` are either a single tensor (first axis =
samples) or a mapping ``name -> tensor`` whose tensors share the first axis; a model given a
mapping is called with keyword arguments (``model(**inputs)``), in the mapping's order, which is
also the order of the exported ONNX graph's inputs. Integer dtypes (token ids) are kept as they
are: only floating-point inputs are ever cast.

Every stage that feeds a model goes through these functions, so a new kind of input changes one
module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import numpy as np
    import torch

Inputs = Union["torch.Tensor", Mapping[str, "torch.Tensor"]]


def is_named(inputs: Any) -> bool:
    return isinstance(inputs, Mapping)


def sample_count(inputs: Inputs) -> int:
    """Number of samples (the first axis, shared by every named input)."""
    if is_named(inputs):
        return len(next(iter(inputs.values())))
    return len(inputs)


def take(inputs: Inputs, start: int, stop: int | None = None) -> Inputs:
    """Samples ``[start, stop)`` (``take(x, n)`` = the first ``n``), same kind as ``inputs``."""
    if stop is None:
        start, stop = 0, start
    if is_named(inputs):
        return {name: t[start:stop] for name, t in inputs.items()}
    return inputs[start:stop]


def batches(inputs: Inputs, batch_size: int) -> Iterator[Inputs]:
    for start in range(0, sample_count(inputs), batch_size):
        yield take(inputs, start, start + batch_size)


def run_model(model: Any, inputs: Inputs) -> torch.Tensor:
    """``model(inputs)`` or ``model(**inputs)``."""
    if is_named(inputs):
        return model(**inputs)
    return model(inputs)


def input_names(inputs: Inputs, default: str = "input") -> tuple[str, ...]:
    """The graph input names: the mapping's keys, or ``default`` for one tensor."""
    return tuple(inputs) if is_named(inputs) else (default,)


def as_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """The tensors in graph-input order (what ``torch.onnx.export`` takes as ``args``)."""
    return tuple(inputs.values()) if is_named(inputs) else (inputs,)


def to_feeds(inputs: Inputs, default: str = "input") -> dict[str, np.ndarray]:
    """An ONNX Runtime feed dict: float inputs as float32, integer ones as int64."""
    import torch

    feeds = {}
    for name, tensor in zip(input_names(inputs, default), as_tuple(inputs)):
        t = tensor.detach().cpu()
        t = t.float() if t.is_floating_point() else t.to(torch.int64)
        feeds[name] = t.numpy()
    return feeds


def fingerprint_bytes(inputs: Inputs) -> bytes:
    """The inputs' contents as bytes, for cache keys."""
    return b"".join(
        name.encode() + t.detach().cpu().contiguous().numpy().tobytes()
        for name, t in zip(input_names(inputs), as_tuple(inputs))
    )


def shapes(inputs: Inputs) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in zip(input_names(inputs), as_tuple(inputs))}
