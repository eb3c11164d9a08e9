"""Layers, choices, configs and the search space."""

from autoquant.space.cost import ConfigCost, config_cost, layer_weight_bytes
from autoquant.space.searchspace import Exclusion, LayerSpace, SearchSpace, build_space, why_invalid
from autoquant.space.values import FP32, LayerInfo, QuantChoice, QuantConfig

__all__ = [
    "FP32",
    "ConfigCost",
    "Exclusion",
    "LayerInfo",
    "LayerSpace",
    "QuantChoice",
    "QuantConfig",
    "SearchSpace",
    "build_space",
    "config_cost",
    "layer_weight_bytes",
    "why_invalid",
]
