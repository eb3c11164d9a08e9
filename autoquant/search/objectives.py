"""Search objectives: which figure of a ``Measurement`` each optimizes, and in which direction.

Latency objectives (one per hardware profile) are named ``latency@<profile>`` and optimize the
figure ``latency_ms@<profile>`` (milliseconds, predicted by the profile's latency model). A spec
lists ``latency`` once; ``prepare()`` expands it into one ``latency@<profile>`` per profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LATENCY = "latency"
LATENCY_PREFIX = "latency@"
LATENCY_FIGURE_PREFIX = "latency_ms@"


@dataclass(frozen=True)
class Objective:
    name: str
    figure: str
    direction: Literal["maximize", "minimize"]
    unit: str


OBJECTIVES: dict[str, Objective] = {
    "accuracy": Objective("accuracy", "accuracy", "maximize", "fraction"),
    "size": Objective("size", "size_bytes", "minimize", "bytes"),
}


def latency_figure(profile: str) -> str:
    """The ``Measurement`` figure that holds a config's latency on ``profile``."""
    return f"{LATENCY_FIGURE_PREFIX}{profile}"


def latency_objective(profile: str) -> Objective:
    return Objective(f"{LATENCY_PREFIX}{profile}", latency_figure(profile), "minimize", "ms, predicted")


def objective_named(name: str) -> Objective | None:
    """The objective of a (resolved) name: a static one or ``latency@<profile>``; else None."""
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    if name.startswith(LATENCY_PREFIX) and len(name) > len(LATENCY_PREFIX):
        return latency_objective(name[len(LATENCY_PREFIX) :])
    return None


def expand_objectives(names: list[str], profiles: list[str]) -> list[str]:
    """Replace ``latency`` by one ``latency@<profile>`` per profile, in place of the first."""
    out: list[str] = []
    for name in names:
        if name == LATENCY:
            out.extend(f"{LATENCY_PREFIX}{p}" for p in profiles)
        else:
            out.append(name)
    return out


def objectives_for(names: list[str]) -> tuple[Objective, ...]:
    out = []
    for name in names:
        objective = objective_named(name)
        if objective is None:
            raise KeyError(name)
        out.append(objective)
    return tuple(out)
