"""Quantized state as flat tensor dicts (safetensors): integer weights, scales, zero points, γ,
per-step activation parameters and PTS exponents, keyed ``<module.path>.<field>``."""

from __future__ import annotations

import torch

from pipeline.quant.layers import QuantLayer

# field name in the artifact -> (quantizer attribute of QuantLayer or None for the layer, buffer)
WEIGHT_FIELDS = {
    "weight_scale": ("weight_quantizer", "scale"),
    "weight_zero_point": ("weight_quantizer", "zero_point"),
    "gamma": (None, "gamma"),
}
ACT_FIELDS = {
    "act_scale": ("act_quantizer", "scale"),
    "act_zero_point": ("act_quantizer", "zero_point"),
    "pts_exponent": ("act_quantizer", "exponent"),
}


def _buffer(layer: QuantLayer, owner: str | None, attribute: str) -> torch.Tensor:
    return getattr(getattr(layer, owner) if owner else layer, attribute)


def _collect(layers: dict[str, QuantLayer], fields: dict) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{field}": _buffer(layer, *where) for name, layer in layers.items() for field, where in fields.items()
    }


def weight_tensors(layers: dict[str, QuantLayer]) -> dict[str, torch.Tensor]:
    out = _collect(layers, WEIGHT_FIELDS)
    for name, layer in layers.items():
        dtype = torch.uint8 if layer.weight_quantizer.bits <= 8 else torch.int32
        out[f"{name}.weight_int"] = layer.integer_weight().to(dtype)
    return out


def act_tensors(layers: dict[str, QuantLayer]) -> dict[str, torch.Tensor]:
    return _collect(layers, ACT_FIELDS)


def _take(tensors: dict[str, torch.Tensor], key: str, like: torch.Tensor, source: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{source}: missing tensor {key!r}; the artifact was made for another model or config")
    value = tensors[key]
    if value.shape != like.shape:
        raise ValueError(f"{source}: {key!r} has shape {tuple(value.shape)}, the model needs {tuple(like.shape)}")
    return value.to(like.device)


def _refuse_unknown(layers: dict[str, QuantLayer], tensors: dict[str, torch.Tensor], fields, source: str) -> None:
    expected = {f"{name}.{field}" for name in layers for field in fields}
    unknown = sorted(set(tensors) - expected)
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise ValueError(
            f"{source}: tensor {unknown[0]!r}{more} matches no layer of the model; the artifact was made for "
            "another model or config"
        )


@torch.no_grad()
def _load(layers: dict[str, QuantLayer], tensors: dict[str, torch.Tensor], fields: dict, source: str) -> None:
    for name, layer in layers.items():
        for field, where in fields.items():
            buffer = _buffer(layer, *where)
            buffer.copy_(_take(tensors, f"{name}.{field}", buffer, source))


@torch.no_grad()
def load_weight_tensors(layers: dict[str, QuantLayer], tensors: dict[str, torch.Tensor], source: str) -> None:
    _refuse_unknown(layers, tensors, [*WEIGHT_FIELDS, "weight_int"], source)
    _load(layers, tensors, WEIGHT_FIELDS, source)
    for name, layer in layers.items():
        layer.load_integer_weight(_take(tensors, f"{name}.weight_int", layer.module.weight, source))
        layer.quantize_weights = True


@torch.no_grad()
def load_act_tensors(layers: dict[str, QuantLayer], tensors: dict[str, torch.Tensor], source: str) -> None:
    _refuse_unknown(layers, tensors, ACT_FIELDS, source)
    _load(layers, tensors, ACT_FIELDS, source)
    for layer in layers.values():
        layer.quantize_acts = True


def load_gamma(layers: dict[str, QuantLayer], tensors: dict[str, torch.Tensor], source: str) -> None:
    _refuse_unknown(layers, tensors, ["gamma"], source)
    _load(layers, tensors, {"gamma": (None, "gamma")}, source)
