"""Quantized state as flat tensor dicts (safetensors): integer weights, scales, zero points, γ,
per-step activation parameters and PTS exponents, keyed ``<module.path>.<field>``."""

from __future__ import annotations

import torch

from pipeline.quant.layers import QuantLayer


def _integer_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else torch.int32


def weight_tensors(layers: dict[str, QuantLayer]) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in layers.items():
        wq = layer.weight_quantizer
        out[f"{name}.weight_int"] = layer.integer_weight().to(_integer_dtype(wq.bits))
        out[f"{name}.weight_scale"] = wq.scale
        out[f"{name}.weight_zero_point"] = wq.zero_point
        out[f"{name}.gamma"] = layer.gamma
    return out


def act_tensors(layers: dict[str, QuantLayer]) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in layers.items():
        aq = layer.act_quantizer
        out[f"{name}.act_scale"] = aq.scale
        out[f"{name}.act_zero_point"] = aq.zero_point
        out[f"{name}.pts_exponent"] = aq.exponent
    return out


def _take(tensors: dict[str, torch.Tensor], key: str, like: torch.Tensor, source: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{source}: missing tensor {key!r}; the artifact was made for another model or config")
    value = tensors[key]
    if value.shape != like.shape:
        raise ValueError(f"{source}: {key!r} has shape {tuple(value.shape)}, the model needs {tuple(like.shape)}")
    return value.to(like.device)


@torch.no_grad()
def load_weight_tensors(layers: dict[str, QuantLayer], tensors: dict[str, torch.Tensor], source: str) -> None:
    for name, layer in layers.items():
        wq = layer.weight_quantizer
        wq.scale.copy_(_take(tensors, f"{name}.weight_scale", wq.scale, source))
        wq.zero_point.copy_(_take(tensors, f"{name}.weight_zero_point", wq.zero_point, source))
        layer.gamma.copy_(_take(tensors, f"{name}.gamma", layer.gamma, source))
        layer.load_integer_weight(_take(tensors, f"{name}.weight_int", layer.module.weight, source))
        layer.quantize_weights = True


@torch.no_grad()
def load_act_tensors(layers: dict[str, QuantLayer], tensors: dict[str, torch.Tensor], source: str) -> None:
    for name, layer in layers.items():
        aq = layer.act_quantizer
        aq.scale.copy_(_take(tensors, f"{name}.act_scale", aq.scale, source))
        aq.zero_point.copy_(_take(tensors, f"{name}.act_zero_point", aq.zero_point, source))
        aq.exponent.copy_(_take(tensors, f"{name}.pts_exponent", aq.exponent, source))
        layer.quantize_acts = True


@torch.no_grad()
def load_gamma(layers: dict[str, QuantLayer], tensors: dict[str, torch.Tensor], source: str) -> None:
    for name, layer in layers.items():
        layer.gamma.copy_(_take(tensors, f"{name}.gamma", layer.gamma, source))
