"""Search objectives: which figure of a ``Measurement`` each optimizes, and in which direction.

Latency objectives (one per hardware profile) register here the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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


def objectives_for(names: list[str]) -> tuple[Objective, ...]:
    return tuple(OBJECTIVES[name] for name in names)
