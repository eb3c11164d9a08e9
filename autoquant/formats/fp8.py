"""fp8 weights: float8 E4M3 (``float8_e4m3fn``) codes with float32 scales.

Each output channel (or the whole tensor) is scaled so that its largest magnitude maps to 448,
the largest finite E4M3 value, and rounded to the nearest E4M3 value (torch's cast, ties to
even): ``w ≈ float(q) * scale``. Symmetric only: float codes need no zero point.

Labels: ``wf8cs`` (per output channel) and ``wf8ts`` (per tensor), then the activations as for
every format (``wf8cs-a32``, ``wf8cs-a16``). The ``f8`` after ``w`` cannot be read as an integer
width or as a float16/float32 label. A space asks for it by label in a rule's ``choices``::

    rules:
      - match: {kind: [linear]}
        choices: [f32-a32, wf8cs-a32, w8cs-a32, w4g32s-a32]

Stored: one byte per weight and a float32 scale per channel (or one). Exported as a
``FLOAT8E4M3FN`` initializer and an opset-19+ ``DequantizeLinear`` (per-channel: axis 0 of
Conv ``W[O,I,kh,kw]`` / Gemm ``W[N,K]``), which ONNX Runtime's CPU provider dequantizes on
every call: the numbers are exactly the simulation's. No backend has an fp8 kernel family
(``fp8_weight_only``), so latency profiles exclude it with that reason.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from autoquant.formats.base import ChoiceLike, LayerLike, WeightExport, WeightFormat

if TYPE_CHECKING:
    import numpy as np
    import torch

E4M3_MAX = 448.0
_EPS = 1e-12
_LABEL = re.compile(r"^wf8(?P<gran>[tc])s$")


class Fp8E4M3Weights(WeightFormat):
    name = "fp8e4m3"
    bits = 8
    export_form = "dequantize"
    label_form = "wf8<t|c>s (fp8 e4m3 weights per tensor or channel)"
    label_example = "wf8cs"

    def weight_label(self, choice: ChoiceLike) -> str:
        gran = {"per_tensor": "t", "per_channel": "c"}.get(choice.granularity)
        gran = gran or f"g{choice.group_size}"  # excluded, but named in the exclusion
        return f"wf8{gran}{'s' if choice.symmetric else 'a'}"

    def parse_weight_label(self, text: str) -> dict[str, Any] | None:
        match = _LABEL.match(text)
        if match is None:
            return None
        granularity = "per_tensor" if match["gran"] == "t" else "per_channel"
        return {"weight_bits": 8, "weight_format": self.name, "granularity": granularity}

    def why_invalid(self, layer: LayerLike, choice: ChoiceLike) -> str | None:
        if choice.act_bits == 8:
            return "fp8 weights with int8 activations have no kernel (integer kernels take both)"
        if choice.granularity not in ("per_tensor", "per_channel"):
            return "fp8 weights take per_tensor or per_channel scales"
        if not choice.symmetric:
            return "fp8 weights are symmetric (E4M3 codes have no zero point)"
        return None

    def _codes(self, w: torch.Tensor, choice: ChoiceLike) -> tuple[torch.Tensor, torch.Tensor]:
        """(E4M3 codes, float32 scale broadcasting against ``w``)."""
        import torch

        w = w.detach().float()
        dims = (
            tuple(range(w.dim()))
            if choice.granularity == "per_tensor"
            else tuple(range(1, w.dim()))
        )
        amax = w.abs().amax(dim=dims, keepdim=True)
        scale = torch.where(amax > _EPS, amax / E4M3_MAX, torch.ones_like(amax))
        q = torch.clamp(w / scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return q, scale

    def fake_quantize(self, w: torch.Tensor, choice: ChoiceLike) -> torch.Tensor:
        q, scale = self._codes(w, choice)
        return (q.float() * scale).to(w.dtype)

    def kernel_family(self, choice: ChoiceLike) -> str:
        return "fp8_weight_only"

    def export_weight(self, w: np.ndarray, choice: ChoiceLike) -> WeightExport:
        import ml_dtypes
        import torch

        q, scale = self._codes(torch.from_numpy(w), choice)
        codes = q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
        per_channel = choice.granularity == "per_channel"
        s = scale.numpy().astype("float32").reshape(-1 if per_channel else ())
        return WeightExport(codes, s, None, 0 if per_channel else None, "fp8-dq", 8)
