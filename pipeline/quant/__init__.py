"""Quantizer objects, the quantized-layer wrapper and the ``quantize(model, spec)`` entry point."""

from pipeline.quant.layers import QuantLayer
from pipeline.quant.model import (
    QuantSpec,
    calibrating,
    quant_layers,
    quantizable_layers,
    quantization,
    quantize,
    set_step,
)

__all__ = [
    "QuantLayer",
    "QuantSpec",
    "quant_layers",
    "quantizable_layers",
    "quantize",
    "quantization",
    "calibrating",
    "set_step",
]
