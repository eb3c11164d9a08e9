"""Exact, config-determined costs: stored bytes, mean bits, bit-operations.

These are computed, not measured: they follow from the config and the layer shapes alone, so
their source is ``exact``. Storage follows the export format: integer weights packed at their
bit width, float32 scales, zero points (asymmetric only) packed at the weight's bit width, float32
biases, and for static int8 activations one float32 scale and one uint8 zero point for the
layer's input and one pair for its output (dynamic int8 activations store none: their parameters
are computed at run time). BOPs count dynamic int8 activations as 8 bits, like static ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autoquant.space.values import LayerInfo, QuantChoice, QuantConfig

SCALE_BYTES = 4
FLOAT_BYTES = {16: 2, 32: 4}
ACT_QPARAM_BYTES = 2 * (SCALE_BYTES + 1)


def n_scales(layer: LayerInfo, choice: QuantChoice) -> int:
    if not choice.weight_is_int:
        return 0
    if choice.granularity == "per_tensor":
        return 1
    if choice.granularity == "per_channel":
        return layer.out_features
    assert choice.group_size is not None
    return layer.out_features * (layer.reduction_dim // choice.group_size) * layer.kernel_elems


def layer_weight_bytes(layer: LayerInfo, choice: QuantChoice) -> int:
    """Bytes of the layer's weight, its quantization parameters and its bias."""
    bias = layer.out_features * 4 if layer.has_bias else 0
    if not choice.weight_is_int:
        weight = layer.weight_numel * FLOAT_BYTES[choice.weight_bits]
    else:
        scales = n_scales(layer, choice)
        weight = math.ceil(layer.weight_numel * choice.weight_bits / 8) + scales * SCALE_BYTES
        if not choice.symmetric:
            weight += math.ceil(scales * choice.weight_bits / 8)
    act = ACT_QPARAM_BYTES if choice.act_static_int8 else 0
    return weight + bias + act


@dataclass(frozen=True)
class ConfigCost:
    size_bytes: int
    mean_weight_bits: float
    bops: int


def config_cost(
    layers: tuple[LayerInfo, ...], config: QuantConfig, *, other_param_bytes: int = 0
) -> ConfigCost:
    """Size of the whole model (``other_param_bytes`` covers parameters outside quantizable
    layers, kept in float32), parameter-weighted mean weight bits, and BOPs per sample
    (MACs x weight bits x activation bits)."""
    mapping = config.as_mapping()
    size = other_param_bytes
    bit_weighted = 0
    numel = 0
    bops = 0
    for layer in layers:
        choice = mapping[layer.name]
        size += layer_weight_bytes(layer, choice)
        bit_weighted += layer.weight_numel * choice.weight_bits
        numel += layer.weight_numel
        bops += layer.macs * choice.weight_bits * choice.act_bits
    return ConfigCost(size_bytes=size, mean_weight_bits=bit_weighted / max(numel, 1), bops=bops)
