"""Integer weights: 2, 3, 4 and 8 bits, per tensor, per output channel or in groups.

The grid, scales, zero points and rounding are the ones the ONNX exporter writes, so an
exported graph computes what the search measured. Integers are signed: a ``b``-bit value lies
in ``[-2^(b-1), 2^(b-1)-1]``; asymmetric weights add an integer zero point in that range.
Rounding is round-half-to-even (``torch.round``), as ONNX ``QuantizeLinear`` does. Per-group
blocks run along weight axis 1 (the input/reduction axis) with ``group_size`` elements each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from autoquant.formats.base import ChoiceLike, KernelClass, LayerLike, WeightFormat

if TYPE_CHECKING:
    import torch

_EPS = 1e-12
_LABEL = re.compile(r"^w(?P<bits>[2348])(?P<gran>t|c|g\d+)(?P<sym>[sa])$")


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
    import torch

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


def quantize_weight(w: torch.Tensor, choice: ChoiceLike) -> QuantParams:
    """Quantize a weight in torch layout (``[O, I]`` or ``[O, I, kh, kw]``) as ``choice`` says."""
    import torch

    from autoquant.formats.base import weight_format

    fmt = weight_format(choice)
    if not fmt.integer:
        raise ValueError(f"{fmt.name} is not an integer weight format")
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


class IntWeights(WeightFormat):
    """``bits``-bit signed integer weights with float32 scales (and zero points if asymmetric)."""

    default_for_bits: ClassVar[bool] = True
    integer: ClassVar[bool] = True
    export_form = "integer"
    label_form = "w<bits 2|3|4|8><t per tensor|c per channel|g<group size>><s|a>"
    label_example = "w4g32s"

    def __init__(self, bits: int) -> None:
        self.bits = bits  # type: ignore[misc]
        self.name = f"int{bits}"  # type: ignore[misc]

    def weight_label(self, choice: ChoiceLike) -> str:
        gran = {"per_tensor": "t", "per_channel": "c"}.get(choice.granularity)
        if gran is None:
            gran = f"g{choice.group_size}"
        return f"w{self.bits}{gran}{'s' if choice.symmetric else 'a'}"

    def parse_weight_label(self, text: str) -> dict[str, Any] | None:
        match = _LABEL.match(text)
        if match is None or int(match["bits"]) != self.bits:
            return None
        gran = match["gran"]
        granularity = {"t": "per_tensor", "c": "per_channel"}.get(gran, "per_group")
        return {
            "weight_bits": self.bits,
            "granularity": granularity,
            "group_size": int(gran[1:]) if granularity == "per_group" else None,
            "symmetric": match["sym"] == "s",
        }

    def why_invalid(self, layer: LayerLike, choice: ChoiceLike) -> str | None:
        if choice.act_dynamic:
            reason = self._why_not_dynamic(layer, choice)
            if reason is not None:
                return reason
        if choice.granularity == "per_group":
            size = choice.group_size
            dim = layer.reduction_dim
            if size is None:
                return "per_group needs a group size"
            if dim % size:
                return f"group size {size} does not divide the input dimension {dim}"
            if dim // size * layer.kernel_elems <= 1:
                return (
                    f"group size {size} covers the whole input dimension {dim}: same as per_channel"
                )
        return None

    def _why_not_dynamic(self, layer: LayerLike, choice: ChoiceLike) -> str | None:
        """Dynamic int8 activations run as ONNX Runtime's DynamicQuantizeLinear ->
        MatMulInteger (fused into DynamicQuantizeMatMul): int8 weights with one scale per
        tensor or per output column and no weight zero point, on a MatMul."""
        if layer.kind != "linear":
            return (
                "dynamic int8 activations only on linear layers: ONNX Runtime runs a dynamic conv "
                "as unfused ConvInteger + casts, several times slower than float32"
            )
        if self.bits != 8:
            return "dynamic int8 activations need 8-bit integer weights (MatMulInteger takes int8)"
        if choice.granularity not in ("per_tensor", "per_channel"):
            return "dynamic int8 activations need per_tensor or per_channel weight scales"
        if not choice.symmetric:
            return "dynamic int8 activations need symmetric weights (no weight zero point)"
        return None

    def fake_quantize(self, w: torch.Tensor, choice: ChoiceLike) -> torch.Tensor:
        return quantize_weight(w, choice).dequantize().to(w.dtype)

    def weight_bytes(self, layer: LayerLike, choice: ChoiceLike) -> int:
        """Codes packed at their bit width, float32 scales, zero points (asymmetric only)
        packed at the weight's bit width."""
        weight = super().weight_bytes(layer, choice)
        if not choice.symmetric:
            weight += -(-self.n_scales(layer, choice) * self.bits // 8)
        return weight

    def kernel_family(self, choice: ChoiceLike) -> str:
        if choice.act_dynamic:
            return "w8a8_dynamic"
        if choice.act_bits == 8:
            return "w8a8" if self.bits == 8 else "wNa8"
        return "weight_only"

    def kernel_class(self, choice: ChoiceLike) -> KernelClass:
        return "integer" if choice.act_bits == 8 else "weight_only"

    def runs_integer_kernel(self, choice: ChoiceLike) -> bool:
        """Dynamic activations (``act_dynamic``) run integer kernels too (DynamicQuantizeMatMul)
        but keep a float32 bias, added after the int32 result is scaled: False for them."""
        return (
            self.bits == 8
            and choice.act_bits == 8
            and not choice.act_dynamic
            and choice.granularity in ("per_tensor", "per_channel")
        )
