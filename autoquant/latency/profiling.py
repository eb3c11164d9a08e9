"""Profile a task's layers on a device: measure what the latency table lacks, reuse the rest.

``profile_layers`` is the compute step (it returns a ``ProfileResult``); the command renders it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from autoquant import formats
from autoquant.backends.contract import DeviceUnreachable, LatencyBackend
from autoquant.errors import UserError
from autoquant.latency.table import LatencyTable, layer_signature
from autoquant.measure.interleave import visit_rounds, visits_per_round
from autoquant.measure.timing import KernelTiming
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
            f"bad value {label!r}: not a choice label; allowed: {formats.label_help()}, such as "
            "w4g32s-a32",
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
    status: Callable[[str], None] | None = None,
) -> ProfileResult:
    """Measure every (layer, choice) the table does not have for this backend's fingerprint.

    Choices invalid for a layer (``why_invalid``) or without a kernel on the device are
    ``excluded`` with the reason (never stored, never timed). Failed timings are stored and
    reused unless ``retry_failed``. A device that cannot be reached (asked once, before the
    first kernel measured) is ``DeviceUnreachable`` for the whole batch, and nothing is stored
    for it: that failure belongs to the device's address, not to the kernels.
    """
    start = time.monotonic()
    fingerprint = backend.fingerprint()
    fp_hash = backend.fingerprint_hash()
    table.remember_fingerprint(fp_hash, fingerprint)
    measure_settings = backend.profile.spec.measure.model_dump()
    rounds = backend.profile.spec.measure.rounds
    entries: list[LayerTiming] = []
    asked_device = False
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
                    if not asked_device:  # once per batch, and only when it has work to do
                        asked_device = True
                        problem = backend.device_problem()
                        if problem is not None:
                            raise DeviceUnreachable(backend.profile, problem)
                    timing = backend.measure(layer, choice)
                    if timing.device_unreachable:  # says nothing of the kernel: not stored
                        done = sum(1 for e in entries if not e.reused and e.timing.ok)
                        raise DeviceUnreachable(backend.profile, str(timing.error), measured=done)
                    if timing.status != "excluded":  # kept now; more rounds replace it
                        table.put(fp_hash, layer, choice, timing, measure=measure_settings)
                    entry = LayerTiming(layer, choice, timing, reused=False)
            entries.append(entry)
            if on_result is not None:
                on_result(entry)
    if rounds > 1:
        entries = _more_rounds(
            backend, entries, rounds, table, fp_hash=fp_hash, measure_settings=measure_settings, status=status
        )
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
    *,
    fp_hash: str,
    measure_settings: dict[str, Any],
    status: Callable[[str], None] | None = None,
) -> list[LayerTiming]:
    """Time the kernels measured now ``rounds - 1`` more rounds as interleaved visits
    (``interleave``: every kernel once per cycle, all of them at the same moments), and store
    them with all their samples. A kernel that would have been timed during a busy spell shares
    it with all the others, and the rounds are spread over the whole profiling time instead of
    one moment. Backends without a ``kernel_visitor`` keep their single round; a kernel whose
    device is lost now keeps the samples it has."""
    m = backend.profile.spec.measure
    visitors = {}
    for i, e in enumerate(entries):
        if not e.reused and e.timing.ok:
            visitor = backend.kernel_visitor(e.layer, e.choice, m.visit_ms / 1000.0)
            if visitor is not None:
                visitors[i] = visitor
    visits = visits_per_round(m.repeat, m.min_repeat_ms, m.visit_ms)

    def progress(r: int, v: int) -> None:
        if status is not None:
            status(
                f"timing {len(visitors)} kernels: round {r + 2}/{rounds}, visit {v + 1}/{visits}"
            )

    extra = visit_rounds(visitors, rounds=rounds - 1, visits=visits, progress=progress)
    out = list(entries)
    for i, per_round in extra.items():
        per_round = [rnd for rnd in per_round if rnd]
        e = entries[i]
        t = e.timing
        timing = KernelTiming.from_samples(
            t.impl,
            [s / 1e6 for s in t.samples_us] + [x for rnd in per_round for x in rnd],
            build_s=t.build_s,
            measure_s=t.measure_s,
            details={**t.details, "rounds": 1 + len(per_round), "visits_per_round": visits},
        )
        table.put(fp_hash, e.layer, e.choice, timing, measure=measure_settings)
        out[i] = LayerTiming(e.layer, e.choice, timing, reused=False)
    # A layer equal to one measured now (same signature: ResNet blocks, transformer layers)
    # was read back from the table after that layer's first round: it gets all its rounds too.
    refreshed = {(layer_signature(out[i].layer), out[i].choice.label): out[i].timing for i in extra}
    for i, e in enumerate(out):
        timing = refreshed.get((layer_signature(e.layer), e.choice.label))
        if e.reused and timing is not None:
            out[i] = LayerTiming(e.layer, e.choice, timing, reused=True)
    return out
