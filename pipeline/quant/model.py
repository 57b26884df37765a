"""``quantize(model, spec)``: swap the quantizable layers of a diffusers UNet for :class:`QuantLayer`.

Placement (docs/method.md#the-quantized-layer): every Conv2d / Linear is quantized except the time-embedding MLP,
each ResNet block's ``time_emb_proj``, ``conv_in`` and ``conv_out`` (and class / additional embeddings).
Attention score/value matmuls are functional ops, not modules, so they stay in full precision.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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
    split: tuple[str, ...] = ("conv_shortcut",)  # decoder layers with one quantizer per half of concat(h, skip)


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


def concat_splits(model: nn.Module, kinds: tuple[str, ...] = ("conv1", "conv_shortcut")) -> dict[str, int]:
    """Channel index where ``concat(h, skip)`` switches from ``h`` to ``skip``, for the layers of
    ``kinds`` (the first conv, the shortcut) of every decoder ResNet block. ``h`` comes from the
    previous ResNet (or the mid block for the first one); upsamplers keep the channel count."""
    if not hasattr(model, "up_blocks"):
        return {}
    h_channels = model.mid_block.resnets[-1].out_channels
    splits = {}
    for b, block in enumerate(model.up_blocks):
        for r, resnet in enumerate(block.resnets):
            for layer in kinds:
                if getattr(resnet, layer, None) is not None:
                    splits[f"up_blocks.{b}.resnets.{r}.{layer}"] = h_channels
            h_channels = resnet.out_channels
    return splits


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize(model: nn.Module, spec: QuantSpec) -> dict[str, QuantLayer]:
    """Wrap the quantizable layers in place (quantizers start disabled); return them by name."""
    splits = concat_splits(model, tuple(spec.split))
    wrapped = {}
    for name, module in quantizable_layers(model).items():
        layer = QuantLayer(module, spec.w_bits, spec.a_bits, spec.num_steps, splits.get(name))
        replace_submodule(model, name, layer)
        wrapped[name] = layer
    return wrapped


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}


def set_step(model: nn.Module, step: int) -> None:
    for layer in quant_layers(model).values():
        layer.act_quantizer.step = step


@contextmanager
def quantization(
    layers: Iterable[QuantLayer], *, weights: bool | None = None, acts: bool | None = None
) -> Iterator[None]:
    """Weight and / or activation quantization switched on or off (None: left as it is) for the
    duration of the block; every layer gets its previous switches back on the way out, exception or not."""
    layers = list(layers)
    before = [(layer.quantize_weights, layer.quantize_acts) for layer in layers]
    try:
        for layer in layers:
            layer.quantize_weights = layer.quantize_weights if weights is None else weights
            layer.quantize_acts = layer.quantize_acts if acts is None else acts
        yield
    finally:
        for layer, (w, a) in zip(layers, before):
            layer.quantize_weights, layer.quantize_acts = w, a


@contextmanager
def calibrating(layers: Iterable[QuantLayer]) -> Iterator[None]:
    """The activation quantizers of ``layers`` track their input ranges (the current step's running
    min / max) for the duration of the block, and stop on the way out, exception or not."""
    quantizers = [layer.act_quantizer for layer in layers]
    before = [q.calibrating for q in quantizers]
    try:
        for q in quantizers:
            q.calibrating = True
        yield
    finally:
        for q, state in zip(quantizers, before):
            q.calibrating = state
