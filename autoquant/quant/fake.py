"""Fake quantization of weights and activations in torch.

The integer grid, scales, zero points and rounding here are the ones the ONNX exporter writes,
so an exported graph computes what the search measured. Integers are signed: a ``b``-bit value
lies in ``[-2^(b-1), 2^(b-1)-1]``; asymmetric weights add an integer zero point in that range.
Rounding is round-half-to-even (``torch.round``), as ONNX ``QuantizeLinear`` does.
Activations use uint8 ``[0, 255]`` with a zero point, per tensor: calibrated once (static), or
computed from each sample's own range at run time (dynamic, ``fake_quantize_dynamic``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autoquant.space.values import QuantChoice

_EPS = 1e-12


@dataclass(frozen=True)
class QuantParams:
    """Integer weight and the parameters to dequantize it: ``w ≈ (q - zero_point) * scale``.

    ``scale`` and ``zero_point`` broadcast against the weight (per-tensor: shape ``[1,...]``;
    per-channel: ``[O, 1, ...]``; per-group: ``[O, I/B, 1, ...]`` broadcast over block members
    after reshaping to ``[O, I/B, B, ...]``).
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    group_size: int | None = None

    def dequantize(self) -> torch.Tensor:
        if self.group_size is None:
            return (self.q - self.zero_point) * self.scale
        grouped = _grouped(self.q, self.group_size)
        out = (grouped - self.zero_point.unsqueeze(2)) * self.scale.unsqueeze(2)
        return out.reshape(self.q.shape)


def int_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[O, I, *k]`` → ``[O, I/B, B, *k]``: blocks of ``B`` along axis 1."""
    o, i = w.shape[:2]
    return w.reshape(o, i // group_size, group_size, *w.shape[2:])


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    qmin, qmax = int_range(bits)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = torch.where(amax > _EPS, amax / qmax, torch.ones_like(amax))
        zero = torch.zeros_like(scale)
    else:
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        span = hi - lo
        scale = torch.where(span > _EPS, span / (qmax - qmin), torch.ones_like(span))
        zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero


def quantize_weight(w: torch.Tensor, choice: QuantChoice) -> QuantParams:
    """Quantize a weight in torch layout (``[O, I]`` or ``[O, I, kh, kw]``) as ``choice`` says."""
    if not choice.weight_is_int:
        raise ValueError(f"{choice.label} is not an integer weight format")
    w = w.detach().float()
    bits = choice.weight_bits
    qmin, qmax = int_range(bits)
    group = None
    if choice.granularity == "per_tensor":
        reduce_dims = tuple(range(w.dim()))
        view = w
    elif choice.granularity == "per_channel":
        reduce_dims = tuple(range(1, w.dim()))
        view = w
    else:
        assert choice.group_size is not None
        group = choice.group_size
        view = _grouped(w, group)
        reduce_dims = (2,)
    lo = view.amin(dim=reduce_dims, keepdim=True)
    hi = view.amax(dim=reduce_dims, keepdim=True)
    scale, zero = _scale_zero(lo, hi, bits, choice.symmetric)
    q = torch.clamp(torch.round(view / scale) + zero, qmin, qmax)
    if group is not None:
        return QuantParams(q.reshape(w.shape), scale.squeeze(2), zero.squeeze(2), bits, group)
    return QuantParams(q, scale, zero, bits)


def fake_quantize_weight(w: torch.Tensor, choice: QuantChoice) -> torch.Tensor:
    """The weight the quantized layer computes with, in float32."""
    if choice.weight_bits == 32:
        return w.detach().clone()
    if choice.weight_bits == 16:
        return w.detach().half().float()
    return quantize_weight(w, choice).dequantize().to(w.dtype)


def runs_integer_kernel(choice: QuantChoice) -> bool:
    """True when the layer's weight and activations are both int8 with per-tensor or per-channel
    weight scales and static activation ranges: the form ONNX Runtime fuses into integer kernels
    (QLinearConv, QGemm, QLinearMatMul). Such a layer also has its bias stored as int32 (see
    ``quantize_bias``). Dynamic activations (``act_dynamic``) run integer kernels too
    (DynamicQuantizeMatMul) but keep a float32 bias, added after the int32 result is scaled:
    False for them."""
    return (
        choice.weight_bits == 8
        and choice.act_static_int8
        and choice.granularity in ("per_tensor", "per_channel")
    )


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
