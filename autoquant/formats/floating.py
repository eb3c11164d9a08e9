"""Float weights: float32 (the weight as trained) and float16."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

from autoquant.formats.base import ChoiceLike, KernelClass, LayerLike, WeightFormat

if TYPE_CHECKING:
    import torch

_LABEL = re.compile(r"^f(?P<bits>16|32)$")


class _FloatWeights(WeightFormat):
    default_for_bits: ClassVar[bool] = True
    scaled: ClassVar[bool] = False
    label_form = ""  # both float formats share one form, given by Float32Weights

    def weight_label(self, choice: ChoiceLike) -> str:
        return f"f{self.bits}"

    def parse_weight_label(self, text: str) -> dict[str, Any] | None:
        match = _LABEL.match(text)
        if match is None or int(match["bits"]) != self.bits:
            return None
        return {"weight_bits": self.bits}

    def why_invalid(self, layer: LayerLike, choice: ChoiceLike) -> str | None:
        if choice.act_bits == 8:
            return "int8 activations need integer weights (integer kernels take both)"
        return None

    def weight_bytes(self, layer: LayerLike, choice: ChoiceLike) -> int:
        return layer.weight_numel * self.bits // 8

    def kernel_family(self, choice: ChoiceLike) -> str:
        return f"fp{self.bits}"

    def kernel_class(self, choice: ChoiceLike) -> KernelClass:
        return "float"


class Float32Weights(_FloatWeights):
    name = "float32"
    bits = 32
    quantizes = False
    export_form = "float32"
    label_form = "f<16|32> (float weights)"
    label_example = "f32"

    def why_invalid(self, layer: LayerLike, choice: ChoiceLike) -> str | None:
        reason = super().why_invalid(layer, choice)
        if reason is None and choice.act_bits == 16:
            return "float16 activations with float32 weights have no deployable kernel"
        return reason

    def fake_quantize(self, w: torch.Tensor, choice: ChoiceLike) -> torch.Tensor:
        return w.detach().clone()


class Float16Weights(_FloatWeights):
    name = "float16"
    bits = 16
    export_form = "float16"
    label_example = "f16"

    def fake_quantize(self, w: torch.Tensor, choice: ChoiceLike) -> torch.Tensor:
        return w.detach().half().float()
