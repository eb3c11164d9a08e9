"""Quality of accuracy predictions on held-out measured configs.

``quality(predicted, measured, costs)`` → Kendall tau, Spearman rho, MAE, and the recall of the
true front: of the held-out configs on the front of (measured accuracy, exact costs), the fraction
also on the front of (predicted accuracy, exact costs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from autoquant.pareto import non_dominated_mask


@dataclass(frozen=True)
class Quality:
    n: int
    kendall_tau: float
    spearman: float
    mae: float
    front_recall: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quality(
    predicted: np.ndarray,
    measured: np.ndarray,
    costs: np.ndarray | None = None,
    *,
    cost_directions: tuple[str, ...] | None = None,
) -> Quality:
    """``costs[n, k]`` are the exact other objectives (minimized unless ``cost_directions``
    says otherwise); without them ``front_recall`` is None."""
    from scipy.stats import kendalltau, spearmanr

    predicted = np.asarray(predicted, dtype=float)
    measured = np.asarray(measured, dtype=float)
    n = len(measured)
    if n < 2:
        return Quality(n, float("nan"), float("nan"), float("nan"), None)
    if np.ptp(predicted) == 0 or np.ptp(measured) == 0:  # a rank correlation is undefined
        tau = rho = float("nan")
    else:
        tau = float(kendalltau(predicted, measured).statistic)
        rho = float(spearmanr(predicted, measured).statistic)
    mae = float(np.mean(np.abs(predicted - measured)))
    recall = None
    if costs is not None:
        costs = np.asarray(costs, dtype=float).reshape(n, -1)
        dirs = ["maximize", *(cost_directions or ["minimize"] * costs.shape[1])]
        true_front = non_dominated_mask(np.column_stack([measured, costs]), dirs)
        pred_front = non_dominated_mask(np.column_stack([predicted, costs]), dirs)
        recall = float((true_front & pred_front).sum() / max(true_front.sum(), 1))
    return Quality(n, tau, rho, mae, recall)
