"""Tiny randomly initialised models of the four supported classes, saved with ``save_pretrained``.

A few channels, 8x8 UNet inputs, one block of each kind: just enough structure for every code path
(ResNet blocks with 1x1 shortcuts, self-attention, cross-attention transformer blocks, up-block
concatenations, class embeddings, VQ / KL autoencoders, a CLIP text encoder and tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel, VQModel

KINDS = ("pixel", "latent", "class", "text")
PROMPTS = ["a red cat", "a blue dog on a hill", "an old tree", "two green birds"]


# the tiny CLIP text transformer of the text-to-image model and of the CLIP-score model
TINY_TEXT = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


def _unet2d(in_channels: int, **extra) -> UNet2DModel:
    return UNet2DModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        **extra,
    )


def text_unet() -> UNet2DConditionModel:
    """The text-to-image model's UNet: a cross-attention down and up block, 16-dim text features."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )


def _autoencoder(cls, latent_channels: int, **extra):
    """One down / up step: 8x8 latents decode to 16x16 images."""
    return cls(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
        **extra,
    )


def _tokenizer(folder: Path, max_length: int):
    """A CLIP BPE tokenizer over single letters (no merges): enough to turn prompts into ids."""
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {
        token: i
        for i, token in enumerate(["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters)])
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length), len(
        vocab
    )


def save_tiny_model(kind: str, folder: Path) -> Path:
    """Save a tiny model of ``kind`` (one of :data:`KINDS`) into ``folder``; return the folder.

    pixel: a bare UNet folder (config.json + scheduler_config.json); the others: pipeline layout with
    model_index.json (latent: VQModel in vqvae/ as LDMPipeline saves it; text: Stable Diffusion's)."""
    torch.manual_seed(KINDS.index(kind))  # distinct weights per class, the same on every run
    folder.mkdir(parents=True, exist_ok=True)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    if kind == "pixel":
        _unet2d(3).save_pretrained(folder)
        scheduler.save_config(folder)
        return folder
    index = {"_class_name": "DiffusionPipeline", "_diffusers_version": "0.42.1"}
    if kind == "latent":
        _unet2d(3).save_pretrained(folder / "unet")
        _autoencoder(VQModel, 3, num_vq_embeddings=16, vq_embed_dim=3).save_pretrained(folder / "vqvae")
        index.update(unet=["diffusers", "UNet2DModel"], vqvae=["diffusers", "VQModel"])
    elif kind == "class":
        _unet2d(3, num_class_embeds=5).save_pretrained(folder / "unet")  # four classes and the null class
        index.update(unet=["diffusers", "UNet2DModel"])
    elif kind == "text":
        from transformers import CLIPTextConfig, CLIPTextModel

        tokenizer, vocab_size = _tokenizer(folder / "tokenizer", max_length=16)
        tokenizer.save_pretrained(folder / "tokenizer")
        CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **TINY_TEXT)).save_pretrained(folder / "text_encoder")
        text_unet().save_pretrained(folder / "unet")
        _autoencoder(AutoencoderKL, 4).save_pretrained(folder / "vae")
        # Stable Diffusion's schedule and DDIM keys
        scheduler = DDIMScheduler(
            num_train_timesteps=1000,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        index.update(
            unet=["diffusers", "UNet2DConditionModel"],
            vae=["diffusers", "AutoencoderKL"],
            text_encoder=["transformers", "CLIPTextModel"],
            tokenizer=["transformers", "CLIPTokenizer"],
        )
    else:
        raise ValueError(f"unknown kind {kind!r}")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def save_tiny_clip(folder: Path) -> Path:
    """A tiny random transformers CLIPModel with its processor (the letter tokenizer above and a 32x32
    image processor), saved with ``save_pretrained`` as eval.clip_model reads it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(14)  # a model whose cosines on the test images take both signs
    tokenizer, vocab_size = _tokenizer(folder / "vocab", max_length=16)
    text = dict(vocab_size=vocab_size, **TINY_TEXT)
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_prompts(path: Path) -> Path:
    path.write_text("\n".join(PROMPTS) + "\n")
    return path
