"""``Measurement``: one config's figures, each with where it came from.

A failure to measure is a figure whose source is ``failed`` with a reason, never an exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Source = Literal["measured", "predicted", "exact", "failed"]


@dataclass(frozen=True)
class Figure:
    value: float
    source: Source
    reason: str | None = None

    @classmethod
    def failed(cls, reason: str) -> Figure:
        return cls(math.nan, "failed", reason)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "value": None if math.isnan(self.value) else self.value,
            "source": self.source,
        }
        if self.reason:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Figure:
        value = data.get("value")
        return cls(math.nan if value is None else float(value), data["source"], data.get("reason"))


@dataclass(frozen=True)
class Measurement:
    """Figures by name: ``accuracy``, ``size_bytes``, ``mean_weight_bits``, ``bops``, and (with a
    hardware profile) ``latency_ms@<profile>``."""

    config_hash: str
    figures: tuple[tuple[str, Figure], ...]
    duration_s: float = 0.0

    def __getitem__(self, name: str) -> Figure:
        for key, figure in self.figures:
            if key == name:
                return figure
        raise KeyError(name)

    def value(self, name: str) -> float:
        return self[name].value

    @property
    def failure(self) -> str | None:
        """The reason of the first failed figure, or None when every figure is good."""
        for name, figure in self.figures:
            if figure.source == "failed":
                return f"{name}: {figure.reason}"
        return None

    def figures_dict(self) -> dict[str, dict[str, Any]]:
        return {name: figure.to_dict() for name, figure in self.figures}
