"""What a quantization format is, and the registry every other module asks.

A weight format owns everything that follows from it alone: its label, whether it fits a
layer (and the activations beside it), how the search simulates it, its exact stored bytes,
the kernel family a backend needs for it and the form the ONNX export writes. A ``QuantChoice``
names its weight format by ``weight_bits`` (the formats that existed before the registry, one
per bit width: ``default_for_bits``) or by ``weight_format`` (a format registered by name, such
as ``fp8e4m3``); ``weight_format(choice)`` resolves either.

Activation formats (float32, float16, int8 calibrated, int8 dynamic) own their label suffix,
their bits and the quantization parameters they store.

Nothing here imports the rest of autoquant: layers and choices are read by their attributes
(``LayerLike``, ``ChoiceLike``), torch and onnx are imported where a format needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

SCALE_BYTES = 4  # float32 scales, as the export stores them
KernelClass = Literal["float", "weight_only", "integer"]
# How the ONNX export writes a weight: "float32" untouched; "float16" a float16 initializer and
# a Cast; "integer" the integer forms of ``autoquant.onnxgraph.graph`` (QDQ, MatMulNBits, folded,
# DynamicQuantizeMatMul); "dequantize" the stored codes of ``WeightFormat.export_weight`` and
# one ``DequantizeLinear``.
ExportForm = Literal["float32", "float16", "integer", "dequantize"]


class LayerLike(Protocol):
    kind: str
    weight_shape: tuple[int, ...]

    @property
    def out_features(self) -> int: ...
    @property
    def reduction_dim(self) -> int: ...
    @property
    def weight_numel(self) -> int: ...
    @property
    def kernel_elems(self) -> int: ...


class ChoiceLike(Protocol):
    weight_bits: int
    act_bits: int
    granularity: str
    group_size: int | None
    symmetric: bool
    act_dynamic: bool
    weight_format: str


@dataclass(frozen=True)
class WeightExport:
    """A weight as the ONNX graph stores it for one ``DequantizeLinear``: ``q`` (an
    ``onnx.TensorProto``, so any element type ONNX has), ``scale`` (float32), an optional zero
    point, the axis of per-channel scales. ``form`` names it in the export's layer table;
    ``storage_bits`` is the bits per stored weight."""

    q: Any
    scale: np.ndarray
    zero_point: Any | None
    axis: int | None
    form: str
    storage_bits: int


class WeightFormat:
    """One weight format. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    bits: ClassVar[int]  # bits per stored weight: the choice's ``weight_bits``
    # ``weight_bits`` alone names this format (the formats older than the registry, whose
    # choices carry no ``weight_format`` so that their labels and config hashes stand)
    default_for_bits: ClassVar[bool] = False
    integer: ClassVar[bool] = False  # integer codes: integer kernels, int8 activations
    quantizes: ClassVar[bool] = True  # False: the weight as trained (float32)
    scaled: ClassVar[bool] = True  # granularity and symmetry mean something
    export_form: ClassVar[ExportForm] = "dequantize"
    label_form: ClassVar[str]  # how its labels look, for error messages
    label_example: ClassVar[str]

    def weight_label(self, choice: ChoiceLike) -> str:
        """The weight half of the choice's label (before ``-a...``)."""
        raise NotImplementedError

    def parse_weight_label(self, text: str) -> dict[str, Any] | None:
        """The ``QuantChoice`` fields a weight label half names, or None if not this format's."""
        raise NotImplementedError

    def why_invalid(self, layer: LayerLike, choice: ChoiceLike) -> str | None:
        """None if the choice can be applied to the layer and exported; otherwise the reason."""
        return None

    def fake_quantize(self, w: torch.Tensor, choice: ChoiceLike) -> torch.Tensor:
        """The weight the quantized layer computes with, in float32."""
        raise NotImplementedError

    def n_scales(self, layer: LayerLike, choice: ChoiceLike) -> int:
        if not self.scaled:
            return 0
        if choice.granularity == "per_tensor":
            return 1
        if choice.granularity == "per_channel":
            return layer.out_features
        assert choice.group_size is not None
        return layer.out_features * (layer.reduction_dim // choice.group_size) * layer.kernel_elems

    def weight_bytes(self, layer: LayerLike, choice: ChoiceLike) -> int:
        """Exact bytes of the stored weight and its quantization parameters (not the bias)."""
        packed = -(-layer.weight_numel * self.bits // 8)
        return packed + self.n_scales(layer, choice) * SCALE_BYTES

    def kernel_family(self, choice: ChoiceLike) -> str:
        """The kernel a backend needs (``autoquant.hardware.kernels.KernelFormat`` names the ones
        that exist; a profile lists the ones its target runs)."""
        raise NotImplementedError

    def kernel_class(self, choice: ChoiceLike) -> KernelClass:
        """Float, weight-only or integer: the latency model's coarse kind of kernel."""
        return "weight_only"

    def runs_integer_kernel(self, choice: ChoiceLike) -> bool:
        """Weight and activations both int8 with static ranges, per-tensor/channel scales: the
        form ONNX Runtime fuses into integer kernels, with an int32 bias."""
        return False

    def export_weight(self, w: np.ndarray, choice: ChoiceLike) -> WeightExport:
        """The stored weight of a ``"dequantize"`` export form (``w`` in torch layout)."""
        raise NotImplementedError(f"{self.name} has no DequantizeLinear export form")


@dataclass(frozen=True)
class ActFormat:
    """One activation format: ``bits`` 8 is uint8 with a zero point (calibrated per tensor, or
    ``dynamic``: from each call's own range); 16 rounds to float16; 32 leaves them alone."""

    bits: int
    dynamic: bool = False

    @property
    def label(self) -> str:
        return f"a{self.bits}{'d' if self.dynamic else ''}"

    @property
    def quantizes(self) -> bool:
        return self.bits != 32

    @property
    def integer(self) -> bool:
        return self.bits == 8

    @property
    def qparam_bytes(self) -> int:
        """Stored parameters: a float32 scale and a uint8 zero point for the layer's input and
        for its output when calibrated; none when dynamic (computed at run time)."""
        return 2 * (SCALE_BYTES + 1) if self.bits == 8 and not self.dynamic else 0


_WEIGHT: dict[str, WeightFormat] = {}
_BY_BITS: dict[int, WeightFormat] = {}
_ACT: dict[str, ActFormat] = {}


def register(fmt: WeightFormat) -> WeightFormat:
    """Add a weight format. Its name, and for ``default_for_bits`` its bit width, must be new."""
    if fmt.name in _WEIGHT:
        raise ValueError(f"weight format {fmt.name!r} is registered twice")
    if fmt.default_for_bits:
        if fmt.bits in _BY_BITS:
            raise ValueError(f"{fmt.bits}-bit weights already name {_BY_BITS[fmt.bits].name}")
        _BY_BITS[fmt.bits] = fmt
    _WEIGHT[fmt.name] = fmt
    return fmt


def register_act(fmt: ActFormat) -> ActFormat:
    _ACT[fmt.label] = fmt
    return fmt


def weight_formats() -> tuple[WeightFormat, ...]:
    return tuple(_WEIGHT.values())


def by_name(name: str) -> WeightFormat:
    try:
        return _WEIGHT[name]
    except KeyError:
        raise ValueError(f"unknown weight format {name!r}; allowed: {', '.join(_WEIGHT)}") from None


def bits_formats() -> dict[int, WeightFormat]:
    """The formats ``weight_bits`` names alone (a space's ``weight_bits`` values)."""
    return dict(sorted(_BY_BITS.items()))


def resolve(weight_bits: int, weight_format: str = "") -> WeightFormat:
    """The format of ``weight_bits`` and ``weight_format`` (empty: the bits' default format).
    ValueError if there is none, or the named one has other bits."""
    if not weight_format:
        fmt = _BY_BITS.get(weight_bits)
        if fmt is None:
            raise ValueError(
                f"no weight format of {weight_bits} bits; allowed weight_bits: "
                f"{', '.join(map(str, _BY_BITS))}"
            )
        return fmt
    fmt = by_name(weight_format)
    if fmt.bits != weight_bits:
        raise ValueError(f"{fmt.name} weights are {fmt.bits}-bit, not {weight_bits}-bit")
    return fmt


def weight_format(choice: ChoiceLike) -> WeightFormat:
    return resolve(choice.weight_bits, getattr(choice, "weight_format", ""))


def act_format(choice: ChoiceLike) -> ActFormat:
    return _ACT[f"a{choice.act_bits}{'d' if choice.act_dynamic else ''}"]


def parse_label(text: str) -> dict[str, Any] | None:
    """The ``QuantChoice`` fields a label names (``w4g32s-a32``, ``f16-a32``, ``w8cs-a8d``...),
    or None if it is not a label."""
    weight, sep, act = text.partition("-")
    if not sep or act not in _ACT:
        return None
    a = _ACT[act]
    for fmt in _WEIGHT.values():
        fields = fmt.parse_weight_label(weight)
        if fields is not None:
            return {**fields, "act_bits": a.bits, "act_dynamic": a.dynamic}
    return None


def label_help() -> str:
    """Every format's label form, for the message that rejects a label."""
    forms = "; ".join(dict.fromkeys(f.label_form for f in _WEIGHT.values() if f.label_form))
    return f"{forms}; then -a<8|8d|16|32> (a8d: dynamic int8 activations)"
