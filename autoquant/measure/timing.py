"""``KernelTiming``: the result of measuring one per-layer kernel, success or not.

A failed build, a wrong answer, a timeout or a lost device is a ``KernelTiming`` with ``status``
``failed`` and an ``error``; a choice the target has no kernel for is ``excluded`` with the
reason. Nothing here raises for a device fault. Timings are the median of their samples (the
first round's each the mean over enough calls to last ``min_repeat_ms``, the later rounds' each
one short interleaved visit), with the spread beside it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from autoquant.measurement import Figure

Status = Literal["measured", "failed", "excluded"]
UNREACHABLE = "device_unreachable"  # a details key: the failure was reaching the device


@dataclass(frozen=True)
class KernelTiming:
    status: Status
    impl: str = ""
    median_us: float = math.nan
    min_us: float = math.nan
    max_us: float = math.nan
    iqr_us: float = math.nan
    samples_us: tuple[float, ...] = ()
    build_s: float = 0.0
    measure_s: float = 0.0
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_samples(cls, impl: str, samples_s: list[float], **kw: Any) -> KernelTiming:
        us = sorted(s * 1e6 for s in samples_s)
        q = statistics.quantiles(us, n=4, method="inclusive") if len(us) >= 2 else [us[0]] * 3
        return cls(
            "measured", impl, statistics.median(us), us[0], us[-1], q[2] - q[0], tuple(us), **kw
        )

    @classmethod
    def failed(cls, error: str, impl: str = "", **kw: Any) -> KernelTiming:
        return cls("failed", impl, error=error, **kw)

    @classmethod
    def unreachable(cls, error: str, impl: str = "", **kw: Any) -> KernelTiming:
        """A failure to reach the device at all (no tracker, no server under the key): it says
        nothing about the kernel, so it is never stored (``device_unreachable``)."""
        details = {**kw.pop("details", {}), UNREACHABLE: True}
        return cls("failed", impl, error=error, details=details, **kw)

    @property
    def device_unreachable(self) -> bool:
        return bool(self.details.get(UNREACHABLE))

    @classmethod
    def excluded(cls, reason: str, impl: str = "") -> KernelTiming:
        return cls("excluded", impl, error=reason)

    @property
    def ok(self) -> bool:
        return self.status == "measured"

    def stat_us(self, statistic: str) -> float:
        """``min`` (the fastest repeat) or ``median`` of the repeats, in µs."""
        return self.min_us if statistic == "min" else self.median_us

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return self.iqr_us / self.median_us if self.ok and self.median_us > 0 else math.nan

    def figure(self) -> Figure:
        """Milliseconds, as a ``Figure`` (excluded and failed kernels are failed figures)."""
        if self.ok:
            return Figure(self.median_us / 1000.0, "measured")
        return Figure.failed(f"{self.status}: {self.error}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples_us"] = list(self.samples_us)
        for key in ("median_us", "min_us", "max_us", "iqr_us"):
            if isinstance(data[key], float) and math.isnan(data[key]):
                data[key] = None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KernelTiming:
        kw = dict(data)
        for key in ("median_us", "min_us", "max_us", "iqr_us"):
            kw[key] = math.nan if kw.get(key) is None else float(kw[key])
        kw["samples_us"] = tuple(float(x) for x in kw.get("samples_us", ()))
        if kw.get("status") not in ("measured", "failed", "excluded"):
            raise ValueError(f"unknown status {kw.get('status')!r}")
        return cls(**kw)
