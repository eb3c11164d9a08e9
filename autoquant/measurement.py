"""``Measurement``: one config's figures, each with where it came from.

A failure to measure is a figure whose source is ``failed`` with a reason, never an exception.
A measured figure may carry its uncertainty on the evaluation set as an ``Interval``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Source = Literal["measured", "predicted", "exact", "failed"]


@dataclass(frozen=True)
class Interval:
    """A confidence interval of a measured figure: where the figure could lie on another draw
    of an evaluation set of the same size.

    Attributes:
        lo, hi: the bounds, ``lo <= hi``.
        level: the confidence level (0.95: the 2.5th and 97.5th percentiles).
        samples: how many evaluation samples the figure was measured on.
        resamples: how many bootstrap resamples the bounds come from.
    """

    lo: float
    hi: float
    level: float = 0.95
    samples: int = 0
    resamples: int = 0

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    def to_dict(self) -> dict[str, Any]:
        return {
            "lo": self.lo,
            "hi": self.hi,
            "level": self.level,
            "samples": self.samples,
            "resamples": self.resamples,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Interval:
        return cls(
            float(data["lo"]),
            float(data["hi"]),
            float(data.get("level", 0.95)),
            int(data.get("samples", 0)),
            int(data.get("resamples", 0)),
        )


@dataclass(frozen=True)
class Figure:
    """One figure and where it came from. ``interval`` (measured figures only, optional) is its
    uncertainty on the evaluation set; figures recorded before intervals existed have none."""

    value: float
    source: Source
    reason: str | None = None
    interval: Interval | None = None

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
        if self.interval is not None:
            out["interval"] = self.interval.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Figure:
        """Reads what ``to_dict`` writes, and records written before ``interval`` existed."""
        value = data.get("value")
        interval = data.get("interval")
        return cls(
            math.nan if value is None else float(value),
            data["source"],
            data.get("reason"),
            Interval.from_dict(interval) if isinstance(interval, dict) else None,
        )


@dataclass(frozen=True)
class Measurement:
    """Figures by name: ``accuracy``, ``size_bytes``, ``mean_weight_bits``, ``bops``, (with a
    hardware profile) ``latency_ms@<profile>``, and ``accuracy_drop``: the float32 model's
    accuracy minus this config's on the same samples, whose interval is paired (the same
    bootstrap resamples for both), so the drop is within noise when it contains 0."""

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
