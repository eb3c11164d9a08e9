"""Exact, config-determined costs: stored bytes, mean bits, bit-operations.

These are computed, not measured: they follow from the config and the layer shapes alone, so
their source is ``exact``. Storage follows the export format: the weight and its quantization
parameters as its weight format stores them (``autoquant.formats``: integer weights packed at
their bit width, float32 scales, zero points of asymmetric ones packed alike), float32 biases,
and the parameters the activation format stores (static int8: one float32 scale and one uint8
zero point for the layer's input and one pair for its output; dynamic int8: none, they are
computed at run time). BOPs count dynamic int8 activations as 8 bits, like static ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoquant import formats
from autoquant.space.values import LayerInfo, QuantChoice, QuantConfig


def n_scales(layer: LayerInfo, choice: QuantChoice) -> int:
    return formats.weight_format(choice).n_scales(layer, choice)


def layer_weight_bytes(layer: LayerInfo, choice: QuantChoice) -> int:
    """Bytes of the layer's weight, its quantization parameters and its bias."""
    bias = layer.out_features * 4 if layer.has_bias else 0
    weight = formats.weight_format(choice).weight_bytes(layer, choice)
    return weight + bias + formats.act_format(choice).qparam_bytes


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
