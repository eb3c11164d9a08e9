"""Interleaved short visits: time several loaded kernels or whole models at the same moments.

On a shared machine the speed of the whole CPU moves from one tenth of a second to the next
(on a shared VM, two 60 ms windows of the same model can differ by several percent) and in
spells of seconds. Timing one thing for 600 ms, then the next, lets each catch its own spell, and the
comparison between them (what a ranking of configs rests on) inherits all of it. Here every
round is cut into short visits of about ``measure.visit_ms``; each cycle visits every timed thing
once, so all of them sample the machine at the same moments and a spell moves them together.
``benchmarks/visit_noise.py`` measures a config's ratio to float32 both ways side by side.

A visitor is a callable that runs one visit and returns its mean seconds per call; one that
raises leaves the cycle (a lost device, a timeout) and the caller hears which and why.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

# In every backend's fingerprint: timings taken as 200 ms samples in whole rounds (before)
# and as interleaved visits differ by several percent, and are never mixed in one table.
TIMING_METHOD = "interleaved-visits"


def visits_per_round(repeat: int, min_repeat_ms: float, visit_ms: float) -> int:
    """How many visits make one round: a round lasts what ``repeat`` samples of
    ``min_repeat_ms`` did, cut into visits of ``visit_ms``."""
    return max(1, round(repeat * min_repeat_ms / visit_ms))


def visit_rounds(
    visitors: Mapping[K, Callable[[], float]],
    *,
    rounds: int,
    visits: int,
    on_failure: Callable[[K, BaseException], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[K, list[list[float]]]:
    """``samples[key][round]``: the seconds per call of each of ``visits`` visits in each of
    ``rounds`` rounds, every key visited once per cycle in the mapping's order. A key whose
    visitor raises leaves the cycle with the samples it has, and ``on_failure(key, exc)`` is
    told. ``progress(round, visit)`` (both from 0) is called at the start of each cycle."""
    active = dict(visitors)
    samples: dict[K, list[list[float]]] = {key: [[] for _ in range(rounds)] for key in active}
    for r in range(rounds):
        for v in range(visits):
            if not active:
                return samples
            if progress is not None:
                progress(r, v)
            for key in list(active):
                try:
                    samples[key][r].append(active[key]())
                except Exception as exc:  # a device fault is data: this key leaves the cycle
                    del active[key]
                    if on_failure is not None:
                        on_failure(key, exc)
    return samples
