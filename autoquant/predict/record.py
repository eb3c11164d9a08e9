"""The ``predicted`` user attribute the guided sampler sets on each trial it proposes.

JSON text: ``{"accuracy": {"mean", "std", "q10", "q90", "source": "predicted"} | null,
"acquisition": "optimistic_hvi" | "epsilon_gap" | "sensitivity_prior", "score", "kappa",
"round", "n_train"}``: what the predictor said about the config before it was measured.
"""

from __future__ import annotations

import json
from typing import Any

PREDICTED_ATTR = "predicted"


def predicted_columns(attr: str | None) -> dict[str, Any]:
    """The ``predicted`` user attribute of a trial as flat table columns (``None`` where the
    trial carries no prediction): ``accuracy_predicted`` (ensemble mean), ``_std``, ``_q10``,
    ``_q90`` and ``acquisition``."""
    record = json.loads(attr) if attr else {}
    accuracy = record.get("accuracy") or {}
    return {
        "accuracy_predicted": accuracy.get("mean"),
        "accuracy_predicted_std": accuracy.get("std"),
        "accuracy_predicted_q10": accuracy.get("q10"),
        "accuracy_predicted_q90": accuracy.get("q90"),
        "acquisition": record.get("acquisition"),
    }
