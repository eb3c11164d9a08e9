"""Simulated quantization in torch."""

from autoquant.quant.apply import Calibration, apply, calibrate
from autoquant.quant.fake import (
    ActivationParams,
    QuantParams,
    fake_quantize_activation,
    fake_quantize_weight,
    int_range,
    quantize_weight,
)

__all__ = [
    "ActivationParams",
    "Calibration",
    "QuantParams",
    "apply",
    "calibrate",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "int_range",
    "quantize_weight",
]
