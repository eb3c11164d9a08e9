"""Fake quantization of weights and activations in torch.

Weights are simulated by their format (``autoquant.formats``; integer weights: ``quantize_weight``
of ``autoquant.formats.integer``, re-exported here), with the grid, scales and rounding the ONNX
exporter writes, so an exported graph computes what the search measured. Activations use uint8
``[0, 255]`` with a zero point, per tensor: calibrated once (static), or computed from each
sample's own range at run time (dynamic, ``fake_quantize_dynamic``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autoquant import formats
from autoquant.formats.integer import (  # noqa: F401 - re-exported: the simulation in one place
    QuantParams,
    int_range,
    quantize_weight,
)
from autoquant.space.values import QuantChoice

_EPS = 1e-12


def fake_quantize_weight(w: torch.Tensor, choice: QuantChoice) -> torch.Tensor:
    """The weight the quantized layer computes with, in float32 (its weight format says)."""
    return formats.weight_format(choice).fake_quantize(w, choice)


def runs_integer_kernel(choice: QuantChoice) -> bool:
    """True when the layer's weight and activations are both int8 with per-tensor or per-channel
    weight scales and static activation ranges: the form ONNX Runtime fuses into integer kernels
    (QLinearConv, QGemm, QLinearMatMul). Such a layer also has its bias stored as int32 (see
    ``quantize_bias``). Dynamic activations (``act_dynamic``) run integer kernels too
    (DynamicQuantizeMatMul) but keep a float32 bias, added after the int32 result is scaled:
    False for them. The weight format says."""
    return formats.weight_format(choice).runs_integer_kernel(choice)


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def quantize_bias(
    bias: torch.Tensor, input_scale: float, weight_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 bias of an integer-kernel layer: ``(q, scale)`` with ``scale = input_scale *
    weight_scale`` (float32, one per output channel or one in all) and ``q = round(bias /
    scale)``, so that ``q * scale`` is the bias the integer kernel adds to its accumulator."""
    w_scale = weight_scale.detach().float().reshape(-1)
    scale = torch.tensor(input_scale, dtype=torch.float32) * w_scale
    q = torch.clamp(torch.round(bias.detach().float() / scale), INT32_MIN, INT32_MAX)
    return q, scale


@dataclass(frozen=True)
class ActivationParams:
    """uint8 asymmetric per-tensor parameters of one activation tensor."""

    scale: float
    zero_point: int

    @classmethod
    def from_range(cls, lo: float, hi: float) -> ActivationParams:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = (hi - lo) / 255.0 if hi - lo > _EPS else 1.0
        zero = int(min(max(round(-lo / scale), 0), 255))
        # float32 is what the graph stores; keep the simulation on the same number.
        return cls(scale=float(torch.tensor(scale, dtype=torch.float32)), zero_point=zero)


def fake_quantize_activation(x: torch.Tensor, act_bits: int, params: ActivationParams | None):
    if act_bits == 32:
        return x
    if act_bits == 16:
        return x.half().float()
    assert params is not None, "int8 activations need calibrated parameters"
    scale = torch.tensor(params.scale, dtype=x.dtype)
    q = torch.clamp(torch.round(x / scale) + params.zero_point, 0, 255)
    return (q - params.zero_point) * scale


def dynamic_activation_params(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample uint8 parameters of ``x`` as ONNX Runtime's ``DynamicQuantizeLinear`` computes
    them for a tensor it is fed: the range spans ``[min(x, 0), max(x, 0)]``, ``scale = (max -
    min) / 255`` in float32 (1 when the range is empty), ``zero_point = round(-min / scale)``
    clamped to ``[0, 255]``, rounding half to even. One pair per sample (first axis), each of
    shape ``[N, 1, ...]``: a deployment runs one sample per call, and the operator takes the
    range of the whole tensor it gets."""
    flat = x.detach().float().reshape(x.shape[0], -1)
    lo = torch.clamp(flat.amin(dim=1), max=0.0)
    hi = torch.clamp(flat.amax(dim=1), min=0.0)
    span = hi - lo
    scale = torch.where(span == 0, torch.ones_like(span), span / 255.0)
    zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return scale.reshape(shape), zero.reshape(shape)


def fake_quantize_dynamic(x: torch.Tensor) -> torch.Tensor:
    """``x`` through dynamic uint8 quantization, one range per sample (``dynamic_activation_
    params``): ``(clamp(round(x / scale) + zero_point, 0, 255) - zero_point) * scale``."""
    scale, zero = dynamic_activation_params(x)
    q = torch.clamp(torch.round(x.float() / scale) + zero, 0, 255)
    return ((q - zero) * scale).to(x.dtype)
