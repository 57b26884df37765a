"""Weight quantization: MSE-searched scales, then nearest rounding (AdaRound lives in adaround.py)."""

from __future__ import annotations

import torch

from pipeline.quant.layers import QuantLayer


@torch.no_grad()
def init_weight_quantizers(layers: dict[str, QuantLayer], grid: int, p: float) -> None:
    """Search every layer's weight scales on ``W · diag(γ)`` and switch weight quantization on."""
    for layer in layers.values():
        layer.weight_quantizer.init_params(layer.scaled_weight(), grid, p)
        layer.quantize_weights = True
