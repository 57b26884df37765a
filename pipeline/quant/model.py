"""``quantize(model, spec)``: swap the quantizable layers of a diffusers UNet for :class:`QuantLayer`.

Placement (DESIGN.md §2): every Conv2d / Linear is quantized except the time-embedding MLP, each
ResNet block's ``time_emb_proj``, ``conv_in`` and ``conv_out`` (and class / additional embeddings).
Attention score/value matmuls are functional ops, not modules, so they stay in full precision.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch.nn as nn

from pipeline.quant.layers import QuantLayer

FULL_PRECISION_PATTERNS = (
    "conv_in",
    "conv_out",
    "time_embedding.*",
    "*time_emb_proj",
    "class_embedding*",
    "add_embedding.*",
    "encoder_hid_proj*",
)


@dataclass(frozen=True)
class QuantSpec:
    w_bits: int
    a_bits: int | None = None  # None: activations stay in full precision (weight-only stages)
    num_steps: int = 1
    split: bool = True


def _keeps_full_precision(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in FULL_PRECISION_PATTERNS)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Conv2d / Linear modules that ``quantize`` would wrap, by module path, in execution order
    of the UNet's definition."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not _keeps_full_precision(name)
    }


def concat_splits(model: nn.Module) -> dict[str, int]:
    """Channel index where ``concat(h, skip)`` switches from ``h`` to ``skip``, for the first conv and
    the shortcut of every decoder ResNet block. ``h`` comes from the previous ResNet (or the mid block
    for the first one); upsamplers keep the channel count."""
    if not hasattr(model, "up_blocks"):
        return {}
    h_channels = model.mid_block.resnets[-1].out_channels
    splits = {}
    for b, block in enumerate(model.up_blocks):
        for r, resnet in enumerate(block.resnets):
            for layer in ("conv1", "conv_shortcut"):
                if getattr(resnet, layer, None) is not None:
                    splits[f"up_blocks.{b}.resnets.{r}.{layer}"] = h_channels
            h_channels = resnet.out_channels
    return splits


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize(model: nn.Module, spec: QuantSpec) -> dict[str, QuantLayer]:
    """Wrap the quantizable layers in place (quantizers start disabled); return them by name."""
    splits = concat_splits(model) if spec.split else {}
    wrapped = {}
    for name, module in quantizable_layers(model).items():
        layer = QuantLayer(module, spec.w_bits, spec.a_bits, spec.num_steps, splits.get(name))
        _set_submodule(model, name, layer)
        wrapped[name] = layer
    return wrapped


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}


def set_step(model: nn.Module, step: int) -> None:
    """Select step ``step``'s activation parameters in every QuantLayer, and in every other module that
    declares ``selects_step`` (the integer backend's layers)."""
    for module in model.modules():
        if isinstance(module, QuantLayer):
            module.act_quantizer.step = step
        elif getattr(module, "selects_step", False):
            module.step = step


def set_quant_state(model: nn.Module, weights: bool, acts: bool) -> None:
    for layer in quant_layers(model).values():
        layer.quantize_weights = weights
        layer.quantize_acts = acts
