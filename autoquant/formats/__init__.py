"""Quantization formats: one registered class per weight format, and the activation formats.

To add a weight format, subclass ``WeightFormat`` in a module of its own and register an
instance below; everything else (labels, spaces, simulation, sizes, kernels, export) asks the
registry. ``fp8.py`` is the worked example.
"""

from autoquant.formats.base import (
    SCALE_BYTES,
    ActFormat,
    WeightExport,
    WeightFormat,
    act_format,
    bits_formats,
    by_name,
    label_help,
    parse_label,
    register,
    register_act,
    resolve,
    weight_format,
    weight_formats,
)
from autoquant.formats.floating import Float16Weights, Float32Weights
from autoquant.formats.fp8 import Fp8E4M3Weights
from autoquant.formats.integer import IntWeights

for _bits in (2, 3, 4, 8):
    register(IntWeights(_bits))
register(Float16Weights())
register(Float32Weights())
register(Fp8E4M3Weights())
for _act in (ActFormat(8), ActFormat(8, dynamic=True), ActFormat(16), ActFormat(32)):
    register_act(_act)

__all__ = [
    "SCALE_BYTES",
    "ActFormat",
    "WeightExport",
    "WeightFormat",
    "act_format",
    "bits_formats",
    "by_name",
    "label_help",
    "parse_label",
    "register",
    "register_act",
    "resolve",
    "weight_format",
    "weight_formats",
]
