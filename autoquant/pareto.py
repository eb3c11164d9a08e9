"""Pareto fronts, hypervolume and picks: pure functions on arrays.

Non-dominated sorting and hypervolume come from Optuna's own implementations (the same code its
multi-objective samplers use); this module adapts them to mixed directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Direction = Literal["maximize", "minimize"]


def to_loss(values: np.ndarray, directions: Sequence[Direction]) -> np.ndarray:
    """Flip maximized objectives so that every column is minimized."""
    values = np.asarray(values, dtype=float).reshape(len(values), len(directions))
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return values * signs


def non_dominated_mask(values: np.ndarray, directions: Sequence[Direction]) -> np.ndarray:
    """True for each row that no other row dominates. Identical rows are all kept."""
    from optuna.study._multi_objective import _is_pareto_front

    loss = to_loss(values, directions)
    if len(loss) == 0:
        return np.zeros(0, dtype=bool)
    return _is_pareto_front(loss, assume_unique_lexsorted=False)


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[Direction]) -> bool:
    la, lb = to_loss(np.array([a]), directions)[0], to_loss(np.array([b]), directions)[0]
    return bool(np.all(la <= lb) and np.any(la < lb))


def hypervolume(
    values: np.ndarray, directions: Sequence[Direction], reference: Sequence[float]
) -> float:
    """Hypervolume dominated by ``values`` up to ``reference`` (given in the objectives' own
    directions). Points that do not dominate the reference add nothing."""
    from optuna._hypervolume import compute_hypervolume

    loss = to_loss(values, directions)
    ref = to_loss(np.array([reference]), directions)[0]
    inside = np.all(loss < ref, axis=1) if len(loss) else np.zeros(0, dtype=bool)
    if not inside.any():
        return 0.0
    return float(compute_hypervolume(loss[inside], ref))


def knee_index(values: np.ndarray, directions: Sequence[Direction]) -> int:
    """Index of the knee: the point closest to the ideal corner after scaling every objective
    to [0, 1] over the given points."""
    loss = to_loss(values, directions)
    lo, hi = loss.min(axis=0), loss.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    scaled = (loss - lo) / span
    return int(np.argmin(np.linalg.norm(scaled, axis=1)))
