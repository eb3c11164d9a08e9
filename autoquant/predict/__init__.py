"""Accuracy prediction: per-layer sensitivity, config features, the XGBoost predictor with
uncertainty, and its quality figures. xgboost and torch load lazily, on first use."""

from autoquant.predict.features import FeatureEncoder
from autoquant.predict.model import AccuracyPredictor, Prediction
from autoquant.predict.quality import Quality, quality
from autoquant.predict.record import predicted_columns
from autoquant.predict.sensitivity import LayerSensitivity, compute_sensitivity, load_or_compute

__all__ = [
    "AccuracyPredictor",
    "FeatureEncoder",
    "LayerSensitivity",
    "Prediction",
    "Quality",
    "compute_sensitivity",
    "load_or_compute",
    "predicted_columns",
    "quality",
]
