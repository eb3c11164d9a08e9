"""The small typed values that every stage passes around: layers, choices, configs."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from autoquant import formats
from autoquant.records import record_data

LayerKind = Literal["linear", "conv"]
Granularity = Literal["per_tensor", "per_channel", "per_group"]

ACT_BITS = (8, 16, 32)
GRANULARITIES: tuple[Granularity, ...] = ("per_tensor", "per_channel", "per_group")

CONFIG_FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer as discovered from the model.

    ``weight_shape`` is torch's layout: ``[out, in]`` for linear, ``[out, in/groups, kh, kw]`` for
    conv. ``input_shape``/``output_shape`` include the batch dimension of the probe (1). ``macs``
    are multiply-accumulates for one sample.
    """

    name: str
    kind: LayerKind
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    macs: int
    params: int
    has_bias: bool
    index: int = 0

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def reduction_dim(self) -> int:
        """Size of axis 1 of the weight: the axis per-group quantization blocks run along."""
        return self.weight_shape[1]

    @property
    def weight_numel(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def kernel_elems(self) -> int:
        return math.prod(self.weight_shape[2:]) if len(self.weight_shape) > 2 else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "weight_shape": list(self.weight_shape),
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "macs": self.macs,
            "params": self.params,
            "has_bias": self.has_bias,
            "index": self.index,
        }


@dataclass(frozen=True, order=True)
class QuantChoice:
    """What one layer gets.

    The weight format is ``weight_format`` when set (a format registered by name, such as
    ``fp8e4m3``), else the one ``weight_bits`` names (2/3/4/8 integer, 16 float16, 32 float32
    unquantized): ``autoquant.formats`` owns what each one means.
    ``act_bits`` 8 is asymmetric per-tensor uint8 with calibrated ranges on the layer's input and
    output; 16 rounds activations to float16; 32 leaves them alone. ``act_dynamic`` (only with
    ``act_bits`` 8) makes the int8 activations dynamic instead: the layer's input is quantized
    at run time from its own min/max (ONNX Runtime's ``DynamicQuantizeLinear``, one range per
    sample) and the output stays float. Granularity and symmetry only mean something for
    integer weights; float choices are normalised to per-tensor, symmetric. Per-group blocks run
    along weight axis 1 (the input/reduction axis) with ``group_size`` elements each.

    ``act_dynamic`` is written to ``to_dict`` only when true, and ``weight_format`` only when it
    is not the one ``weight_bits`` names (it is normalised to empty then), so every choice that
    existed before them keeps its dict and every config its hash.
    """

    weight_bits: int = 32
    act_bits: int = 32
    granularity: Granularity = "per_tensor"
    group_size: int | None = None
    symmetric: bool = True
    act_dynamic: bool = False
    weight_format: str = ""

    def __post_init__(self) -> None:
        fmt = formats.resolve(self.weight_bits, self.weight_format)
        if fmt.default_for_bits and self.weight_format:
            object.__setattr__(self, "weight_format", "")
        if self.act_dynamic and self.act_bits != 8:
            raise ValueError(
                f"act_dynamic needs act_bits 8, got act_bits {self.act_bits}: dynamic activations "
                "are uint8"
            )

    @property
    def act_static_int8(self) -> bool:
        """int8 activations with calibrated ranges on the input and output (not dynamic)."""
        return self.act_bits == 8 and not self.act_dynamic

    @property
    def weight_is_int(self) -> bool:
        return formats.weight_format(self).integer

    @property
    def is_fp32(self) -> bool:
        """Neither the weight nor the activations are quantized."""
        return not formats.weight_format(self).quantizes and not formats.act_format(self).quantizes

    @property
    def label(self) -> str:
        """A short, unique, human-readable name: ``w4g32a-a8`` = 4-bit, groups of 32, asymmetric,
        int8 activations; ``w8cs-a8d`` = 8-bit per-channel symmetric, dynamic int8 activations.
        The weight format writes the part before the dash."""
        weight = formats.weight_format(self).weight_label(self)
        return f"{weight}-{formats.act_format(self).label}"

    @classmethod
    def from_label(cls, label: str) -> QuantChoice:
        """The inverse of ``label``: ``w4g32s-a32``, ``w8cs-a8``, ``w8cs-a8d``, ``f16-a32``...
        ValueError if ``label`` is not one."""
        fields = formats.parse_label(label.strip())
        if fields is None:
            raise ValueError(f"not a choice label: {label!r}")
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "granularity": self.granularity,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
        }
        if self.act_dynamic:  # absent otherwise: the dicts (and hashes) of older choices stand
            out["act_dynamic"] = True
        if self.weight_format:  # likewise: only formats that weight_bits alone does not name
            out["weight_format"] = self.weight_format
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantChoice:
        return cls(
            weight_bits=int(data["weight_bits"]),
            act_bits=int(data["act_bits"]),
            granularity=data["granularity"],
            group_size=None if data.get("group_size") is None else int(data["group_size"]),
            symmetric=bool(data["symmetric"]),
            act_dynamic=bool(data.get("act_dynamic", False)),
            weight_format=str(data.get("weight_format", "")),
        )


FP32 = QuantChoice()


@dataclass(frozen=True)
class QuantConfig:
    """Layer name → ``QuantChoice`` for every quantizable layer, with a stable hash."""

    choices: tuple[tuple[str, QuantChoice], ...] = field(default_factory=tuple)

    @classmethod
    def from_mapping(cls, mapping: dict[str, QuantChoice]) -> QuantConfig:
        return cls(tuple(mapping.items()))

    def as_mapping(self) -> dict[str, QuantChoice]:
        return dict(self.choices)

    def __getitem__(self, layer: str) -> QuantChoice:
        return self.as_mapping()[layer]

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.choices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": "QuantConfig",
            "_version": CONFIG_FORMAT_VERSION,
            "_data": {name: choice.to_dict() for name, choice in self.choices},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        body = record_data(data, "QuantConfig", CONFIG_FORMAT_VERSION)
        return cls(tuple((n, QuantChoice.from_dict(c)) for n, c in body.items()))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        return cls.from_dict(json.loads(text))

    @property
    def hash(self) -> str:
        """Stable across runs and processes: the layer order does not change it."""
        canonical = json.dumps(
            {n: c.to_dict() for n, c in sorted(self.choices)}, sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @classmethod
    def uniform(cls, layers: list[LayerInfo] | tuple[LayerInfo, ...], choice: QuantChoice):
        return cls(tuple((layer.name, choice) for layer in layers))
