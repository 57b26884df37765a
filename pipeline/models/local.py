"""Local diffusers folders: find the parts of a model, import them into the pipeline's layout, load them.

Two layouts are accepted (nothing is ever fetched from a hub):

* a **pipeline folder**: ``unet/`` and ``scheduler/`` subfolders (``model_index.json`` optional), plus,
  where the model has them, an autoencoder (``vqvae/`` as LDMPipeline saves it, or ``vae/`` as Stable
  Diffusion does), ``text_encoder/`` and ``tokenizer/``, or ``class_embedding/embeddings.safetensors``
  (a class-to-context table that cross-attention reads, as LDM cin256-v2's ``ClassEmbedder``;
  :mod:`pipeline.models.compvis` writes it);
* a **bare UNet folder**: the UNet's ``config.json`` and weights, with a ``scheduler_config.json``
  next to them (or in ``scheduler/``).

:func:`import_model` rewrites either into the pipeline layout with ``save_pretrained`` (the
autoencoder always in ``vae/``), so every stage reads one layout and one weights format.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import DDIMScheduler

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
AUTOENCODER_CLASSES = ("VQModel", "AutoencoderKL")
AUTOENCODER_DIRS = ("vae", "vqvae")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
CLASS_EMBEDDING = "class_embedding/embeddings.safetensors"
# not a diffusers key (diffusers keeps it through from_config and save_pretrained): the attention heads of each
# level, for a UNet2DModel whose head width differs between levels, which its single attention_head_dim cannot say
HEADS_PER_LEVEL = "attention_heads_per_level"


@dataclass(frozen=True)
class Layout:
    """Where each part of a model lives; None for the parts the model does not have."""

    unet: Path
    scheduler: Path  # the scheduler_config.json file
    autoencoder: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    class_embedding: Path | None = None  # the (classes + null, context width) table's safetensors file


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS)


def find_layout(folder: str | Path) -> Layout:
    """The parts of the diffusers model in ``folder``; errors name the missing file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder")
    if (folder / "unet").is_dir():
        unet, scheduler = folder / "unet", folder / "scheduler" / "scheduler_config.json"
    elif (folder / "config.json").exists():
        unet = folder
        candidates = [folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json"]
        scheduler = next((c for c in candidates if c.exists()), candidates[0])
    else:
        raise FileNotFoundError(
            f"{folder} is not a diffusers model folder: it has neither unet/ (pipeline layout) nor config.json "
            "(bare UNet)"
        )
    if not (unet / "config.json").exists():
        raise FileNotFoundError(f"{unet} has no config.json: not a diffusers UNet folder")
    name = _read_config(unet / "config.json").get("_class_name")
    if name not in UNET_CLASSES:
        raise ValueError(f"{unet}/config.json is a {name}; supported: {', '.join(UNET_CLASSES)}")
    if not _has_weights(unet):
        raise FileNotFoundError(f"{unet} has no weights (*.safetensors or *.bin)")
    if not scheduler.exists():
        raise FileNotFoundError(f"{folder} has no scheduler config ({scheduler.relative_to(folder)})")
    autoencoder = next(
        (folder / d for d in AUTOENCODER_DIRS if unet != folder and (folder / d / "config.json").exists()), None
    )
    if autoencoder is not None:
        kind = _read_config(autoencoder / "config.json").get("_class_name")
        if kind not in AUTOENCODER_CLASSES:
            raise ValueError(
                f"{autoencoder}/config.json is a {kind}; supported autoencoders: {', '.join(AUTOENCODER_CLASSES)}"
            )
    text_encoder, tokenizer = (folder / "text_encoder", folder / "tokenizer") if unet != folder else (None, None)
    if text_encoder is not None and not text_encoder.is_dir():
        text_encoder = tokenizer = None
    elif text_encoder is not None and not tokenizer.is_dir():
        raise FileNotFoundError(f"{folder} has text_encoder/ but no tokenizer/")
    table = folder / CLASS_EMBEDDING
    class_embedding = table if unet != folder and table.is_file() else None
    if name == "UNet2DConditionModel" and text_encoder is None and class_embedding is None:
        raise FileNotFoundError(
            f"{unet} is a UNet2DConditionModel (cross-attention): {folder} needs text_encoder/ and tokenizer/ "
            f"(or {CLASS_EMBEDDING} for a class-conditional model)"
        )
    return Layout(unet, scheduler, autoencoder, text_encoder, tokenizer, class_embedding)


def diffusers_class(name: str) -> type:
    """A diffusers class by name, imported on first use: importing diffusers costs seconds, and the
    stages that only read a folder's layout (metrics, report) never build a model."""
    import diffusers

    return getattr(diffusers, name)


def unet_class(layout: Layout) -> type:
    return diffusers_class(_read_config(layout.unet / "config.json")["_class_name"])


def set_heads_per_level(unet: torch.nn.Module) -> torch.nn.Module:
    """``unet`` with each level's attention split into the heads its config's HEADS_PER_LEVEL lists, where it
    lists them (CompVis LDM-8 LSUN-Churches: 8 heads at every width); the mid block is the deepest level's.
    Weights and shapes do not change: only how the attention's channels are cut into heads."""
    heads = unet.config.get(HEADS_PER_LEVEL)
    if heads is None:
        return unet
    from diffusers.models.attention_processor import Attention

    levels = [*zip(unet.down_blocks, heads), (unet.mid_block, heads[-1]), *zip(unet.up_blocks, reversed(heads))]
    for block, count in levels:
        for attention in (m for m in block.modules() if isinstance(m, Attention)):
            attention.heads = attention.sliceable_head_dim = count
            attention.scale = (attention.inner_dim // count) ** -0.5
    return unet


def unet_skeleton_from(folder: str | Path) -> torch.nn.Module:
    """The UNet of a local folder without weights (meta device): its layer names and shapes."""
    layout = find_layout(folder)
    with torch.device("meta"):
        return set_heads_per_level(unet_class(layout).from_config(_read_config(layout.unet / "config.json")))


def load_unet(layout: Layout) -> torch.nn.Module:
    unet = unet_class(layout).from_pretrained(layout.unet, low_cpu_mem_usage=False)
    return set_heads_per_level(unet).eval().requires_grad_(False)


def load_scheduler(layout: Layout) -> DDIMScheduler:
    """The model's noise schedule as a DDIM scheduler. Any diffusers scheduler config (DDPM, DDIM,
    PNDM, ...) carries the schedule; reading it straight into DDIM keeps DDIM-only keys such as Stable
    Diffusion's ``set_alpha_to_one: false`` that a DDPM scheduler would drop."""
    return diffusers_class("DDIMScheduler").from_config(_read_config(layout.scheduler))


def load_autoencoder(layout: Layout) -> torch.nn.Module | None:
    if layout.autoencoder is None:
        return None
    kind = _read_config(layout.autoencoder / "config.json")["_class_name"]
    return (
        diffusers_class(kind).from_pretrained(layout.autoencoder, low_cpu_mem_usage=False).eval().requires_grad_(False)
    )


def load_text_encoder(layout: Layout):
    """(CLIP text encoder, tokenizer), or (None, None) for a model without text conditioning."""
    if layout.text_encoder is None:
        return None, None
    from transformers import CLIPTextModel, CLIPTokenizer  # only text-to-image models need transformers

    encoder = CLIPTextModel.from_pretrained(layout.text_encoder).eval().requires_grad_(False)
    return encoder, CLIPTokenizer.from_pretrained(layout.tokenizer)


def load_class_embedding(layout: Layout) -> torch.Tensor | None:
    """The class-to-context table (classes + 1, width), its last row the null class; None without one."""
    if layout.class_embedding is None:
        return None
    from safetensors.torch import load_file

    return load_file(layout.class_embedding)["weight"]


def import_model(source: str | Path, target: str | Path) -> Layout:
    """Copy the model in ``source`` (either layout) into ``target`` in the pipeline layout."""
    layout = find_layout(source)
    target = Path(target)
    load_unet(layout).save_pretrained(target / "unet")
    scheduler = target / "scheduler"
    scheduler.mkdir(parents=True, exist_ok=True)
    (scheduler / "scheduler_config.json").write_text(layout.scheduler.read_text())
    if (autoencoder := load_autoencoder(layout)) is not None:
        autoencoder.save_pretrained(target / "vae")
    encoder, tokenizer = load_text_encoder(layout)
    if encoder is not None:
        encoder.save_pretrained(target / "text_encoder")
        tokenizer.save_pretrained(target / "tokenizer")
    if layout.class_embedding is not None:
        (target / CLASS_EMBEDDING).parent.mkdir(parents=True, exist_ok=True)
        (target / CLASS_EMBEDDING).write_bytes(layout.class_embedding.read_bytes())
    return find_layout(target)
