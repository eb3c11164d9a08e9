"""Profile a task's layers on a device: measure what the latency table lacks, reuse the rest.

``profile_layers`` is the compute step (it returns a ``ProfileResult``); the command renders it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from autoquant.errors import UserError
from autoquant.hw.backend import LatencyBackend
from autoquant.hw.table import LatencyTable
from autoquant.hw.timing import KernelTiming
from autoquant.space.searchspace import why_invalid
from autoquant.space.values import LayerInfo, QuantChoice

DEFAULT_CHOICES = (
    "f32-a32",
    "f16-a32",
    "w8cs-a32",
    "w8cs-a8",
    "w4cs-a8",
    "w4cs-a32",
    "w4g32s-a32",
    "w2cs-a32",
)
def parse_label(label: str) -> QuantChoice:
    """``QuantChoice.from_label`` for the command line: a bad label is a one-line UserError."""
    try:
        return QuantChoice.from_label(label)
    except ValueError:
        raise UserError(
            f"bad value {label!r}: not a choice label; allowed: f32-a32, f16-a16/-a32, or "
            "w<2|3|4|8><t|c|g<size>><s|a>-a<8|16|32> such as w4g32s-a32",
            key="--choices",
        ) from None


@dataclass(frozen=True)
class LayerTiming:
    layer: LayerInfo
    choice: QuantChoice
    timing: KernelTiming
    reused: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer.name,
            "choice": self.choice.label,
            "reused": self.reused,
            **self.timing.to_dict(),
        }


@dataclass(frozen=True)
class ProfileResult:
    profile: str
    fingerprint: dict[str, Any]
    fingerprint_hash: str
    table_path: str
    entries: tuple[LayerTiming, ...]
    elapsed_s: float

    def count(self, *, status: str | None = None, reused: bool | None = None) -> int:
        return sum(
            1
            for e in self.entries
            if (status is None or e.timing.status == status)
            and (reused is None or e.reused == reused)
        )

    @property
    def measured_now(self) -> int:
        """Kernels built and run by this call (measured or failed, excluded not counted)."""
        return sum(1 for e in self.entries if not e.reused and e.timing.status != "excluded")

    def lookup(self) -> dict[tuple[str, str], KernelTiming]:
        return {(e.layer.name, e.choice.label): e.timing for e in self.entries}

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "fingerprint": self.fingerprint,
            "fingerprint_hash": self.fingerprint_hash,
            "table": self.table_path,
            "elapsed_s": self.elapsed_s,
            "counts": {
                "measured_now": self.measured_now,
                "reused": self.count(reused=True),
                "failed": self.count(status="failed"),
                "excluded": self.count(status="excluded"),
            },
            "entries": [e.to_dict() for e in self.entries],
        }


def profile_layers(
    backend: LatencyBackend,
    work: Iterable[tuple[LayerInfo, Iterable[QuantChoice]]],
    table: LatencyTable,
    *,
    retry_failed: bool = False,
    on_result: Callable[[LayerTiming], None] | None = None,
) -> ProfileResult:
    """Measure every (layer, choice) the table does not have for this backend's fingerprint.

    Choices invalid for a layer (``why_invalid``) or without a kernel on the device are
    ``excluded`` with the reason (never stored, never timed). Failed timings are stored and
    reused unless ``retry_failed``.
    """
    start = time.monotonic()
    fingerprint = backend.fingerprint()
    fp_hash = backend.fingerprint_hash()
    table.remember_fingerprint(fp_hash, fingerprint)
    measure_settings = backend.profile.spec.measure.model_dump()
    rounds = backend.profile.spec.measure.rounds
    entries: list[LayerTiming] = []
    for layer, choices in work:
        for choice in choices:
            reason = why_invalid(layer, choice) or backend.exclusion(layer, choice)
            if reason is not None:
                entry = LayerTiming(layer, choice, KernelTiming.excluded(reason), reused=False)
            else:
                found = table.get(fp_hash, layer, choice)
                if found.hit and (found.timing.ok or not retry_failed):  # type: ignore[union-attr]
                    entry = LayerTiming(layer, choice, found.timing, reused=True)  # type: ignore[arg-type]
                else:
                    timing = backend.measure(layer, choice)
                    if timing.status != "excluded":  # kept now; more rounds replace it
                        table.put(fp_hash, layer, choice, timing, measure=measure_settings)
                    entry = LayerTiming(layer, choice, timing, reused=False)
            entries.append(entry)
            if on_result is not None:
                on_result(entry)
    if rounds > 1:
        entries = _more_rounds(backend, entries, rounds, table, fp_hash, measure_settings)
    return ProfileResult(
        backend.profile.name,
        fingerprint,
        fp_hash,
        str(table.path),
        tuple(entries),
        time.monotonic() - start,
    )


def _more_rounds(
    backend: LatencyBackend,
    entries: list[LayerTiming],
    rounds: int,
    table: LatencyTable,
    fp_hash: str,
    measure_settings: dict[str, Any],
) -> list[LayerTiming]:
    """Time the kernels measured now ``rounds - 1`` more times, interleaved (every kernel once
    per round), and store them with all their samples. A kernel timed during a busy spell gets
    more chances to show its own speed, and the rounds are spread over the whole profiling time
    instead of one moment. Backends whose ``retime`` gives nothing keep their single round."""
    fresh = [i for i, e in enumerate(entries) if not e.reused and e.timing.ok]
    extra: dict[int, list[float]] = {i: [] for i in fresh}
    for _ in range(rounds - 1):
        for i in fresh:
            try:
                samples = backend.retime(entries[i].layer, entries[i].choice)
            except Exception:  # a device lost now keeps the first round's timing
                samples = None
            extra[i].extend(samples or [])
    out = list(entries)
    for i in fresh:
        e = entries[i]
        t = e.timing
        timing = KernelTiming.from_samples(
            t.impl,
            [s / 1e6 for s in t.samples_us] + extra[i],
            build_s=t.build_s,
            measure_s=t.measure_s,
            details={**t.details, "rounds": 1 + len(extra[i]) // max(1, len(t.samples_us))},
        )
        table.put(fp_hash, e.layer, e.choice, timing, measure=measure_settings)
        out[i] = LayerTiming(e.layer, e.choice, timing, reused=False)
    return out
