"""CompVis checkpoints (``latent-diffusion``, ``stable-diffusion``) read offline into the pipeline's layout.

The DMQ paper quantizes the CompVis ``.ckpt`` files its README downloads; :func:`import_checkpoint`
rewrites one of them, once, into the pipeline folder that :mod:`pipeline.models.local` reads (``unet/``,
``vae/``, ``scheduler/``, and ``text_encoder/`` + ``tokenizer/`` or ``class_embedding/``), so every stage
keeps one layout. Families (their published configs are :data:`PUBLISHED`; an original YAML
``configs/latent-diffusion/*.yaml`` / ``v1-inference.yaml`` given with the checkpoint takes precedence):

* LDM-4 LSUN-Bedrooms: unconditional ``UNet2DModel`` on 64x64x3 latents, VQ-f4 ``VQModel``;
* LDM-8 LSUN-Churches: unconditional ``UNet2DModel`` on 32x32x4 latents with ResBlock down- and up-sampling
  and scale-shift norm, KL-f8 ``AutoencoderKL``; its 8 heads at every width are the UNet config's
  ``attention_heads_per_level`` (:func:`pipeline.models.local.set_heads_per_level`), since diffusers'
  ``attention_head_dim`` is one head width for all levels;
* LDM-4 ImageNet (cin256-v2): ``UNet2DConditionModel`` whose cross-attention reads one token, the
  class's row of the ``ClassEmbedder`` table (row 1000 is the null class of classifier-free guidance);
* Stable Diffusion v1.x: ``UNet2DConditionModel``, KL-f8 ``AutoencoderKL``, CLIP ViT-L/14 text encoder
  and its tokenizer, built from OpenAI's BPE vocabulary (``bpe_simple_vocab_16e6.txt.gz``, shipped by
  ``open-clip-torch``), since the ``.ckpt`` holds no vocabulary and nothing is downloaded.

SD 2.x (v-prediction, OpenCLIP) and SDXL are refused by name.

Weights are read with ``torch.load(weights_only=True)`` (or safetensors): a pickle that would build
anything but tensors and plain containers is refused, never executed. Key mappings are diffusers'
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``) with
configs built here; the self-attention of the unconditional UNet (``AttentionBlock``, a fused ``qkv``)
and the ResBlock down- and up-samplers, which diffusers' converter does not map, are mapped here.
tests/test_compvis.py checks every family against outputs of the original code.

One key beyond the original configs is read from ``model.params``: ``norm_num_groups`` (default 32, the
GroupNorm group count the original code hard-codes), which the tiny test fixtures set to stay small.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import pickle
import re
import zipfile
from pathlib import Path

import torch
import yaml

from pipeline.infra.storage import ArtifactError
from pipeline.models.local import HEADS_PER_LEVEL, Layout, diffusers_class, find_layout, set_heads_per_level

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
CLASS_TABLE_KEY = "cond_stage_model.embedding.weight"
CLIP_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
# a ResBlock (in_layers, ...) after an up level's first module: its up-sampler in resblock_updown UNets
UPSAMPLING_RESBLOCK = re.compile(r"(model\.diffusion_model\.output_blocks\.(\d+)\.[12])\.(in|emb|out)_layers\.")
CLIP_HEAD_WIDTH = 64  # CLIP's text transformer: heads = width / 64 (12 for ViT-L/14's 768)


def _vq_f4(n_embed: int = 8192) -> dict:
    return {
        "target": "ldm.models.autoencoder.VQModelInterface",
        "params": {
            "embed_dim": 3,
            "n_embed": n_embed,
            "ddconfig": {"z_channels": 3, "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4]}
            | {"num_res_blocks": 2, "resolution": 256, "double_z": False},
        },
    }


def _kl_f8() -> dict:
    return {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {
            "embed_dim": 4,
            "ddconfig": {"z_channels": 4, "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4]}
            | {"num_res_blocks": 2, "resolution": 256, "double_z": True},
        },
    }


# ``model.params`` of the original configs (the numbers of configs/latent-diffusion/*.yaml and
# configs/stable-diffusion/v1-inference.yaml), for a checkpoint imported without its YAML
PUBLISHED = {
    "ldm4-lsun-bedrooms": {
        "linear_start": 0.0015,
        "linear_end": 0.0195,
        "timesteps": 1000,
        "image_size": 64,
        "channels": 3,
        "unet_config": {
            "params": {"in_channels": 3, "out_channels": 3, "model_channels": 224, "attention_resolutions": [8, 4, 2]}
            | {"num_res_blocks": 2, "channel_mult": [1, 2, 3, 4], "num_head_channels": 32}
        },
        "first_stage_config": _vq_f4(),
        "cond_stage_config": "__is_unconditional__",
    },
    "ldm8-lsun-churches": {
        "linear_start": 0.0015,
        "linear_end": 0.0155,
        "timesteps": 1000,
        "image_size": 32,
        "channels": 4,
        "scale_by_std": True,
        "unet_config": {
            "params": {
                "in_channels": 4,
                "out_channels": 4,
                "model_channels": 192,
                "attention_resolutions": [1, 2, 4, 8],
            }
            | {"num_res_blocks": 2, "channel_mult": [1, 2, 2, 4, 4], "num_heads": 8, "use_scale_shift_norm": True}
            | {"resblock_updown": True}
        },
        "first_stage_config": _kl_f8(),
        "cond_stage_config": "__is_unconditional__",
    },
    "ldm4-cin256-v2": {
        "linear_start": 0.0015,
        "linear_end": 0.0195,
        "timesteps": 1000,
        "image_size": 64,
        "channels": 3,
        "conditioning_key": "crossattn",
        "unet_config": {
            "params": {"in_channels": 3, "out_channels": 3, "model_channels": 192, "attention_resolutions": [8, 4, 2]}
            | {"num_res_blocks": 2, "channel_mult": [1, 2, 3, 5], "num_heads": 1, "use_spatial_transformer": True}
            | {"transformer_depth": 1, "context_dim": 512}
        },
        "first_stage_config": _vq_f4(),
        "cond_stage_config": {
            "target": "ldm.modules.encoders.modules.ClassEmbedder",
            "params": {"n_classes": 1001, "embed_dim": 512},
        },
    },
    "sd-v1": {
        "linear_start": 0.00085,
        "linear_end": 0.012,
        "timesteps": 1000,
        "image_size": 64,
        "channels": 4,
        "conditioning_key": "crossattn",
        "scale_factor": 0.18215,
        "unet_config": {
            "params": {"in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1]}
            | {"num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8, "use_spatial_transformer": True}
            | {"transformer_depth": 1, "context_dim": 768}
        },
        "first_stage_config": _kl_f8(),
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
    },
}
CONDITIONING = {"__is_unconditional__": None, "ClassEmbedder": "class", "FrozenCLIPEmbedder": "text"}


# --- reading files --------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.ckpt`` (its ``state_dict`` when it is a Lightning checkpoint) or ``.safetensors``
    file. Pickles are read with ``weights_only=True``: one that would build other objects is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            data = load_file(path)
        except Exception as error:  # safetensors raises its own error types for a damaged header
            raise ArtifactError(f"{path} is not a readable safetensors file ({error})") from None
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            # torch names the global it refused; the wording differs between the zip and legacy formats
            found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(error))
            if found is None:  # not a pickle torch can read at all (a text file, a damaged one)
                reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
                raise ArtifactError(
                    f"{path} is not a readable PyTorch checkpoint (truncated, or another format): "
                    + (reason.group(1) if reason else str(error))[:200]
                ) from None
            raise ArtifactError(
                f"{path} is a pickle that would run code to load ({found.group(1)}); "
                "refused: only tensors are read (torch.load weights_only=True). If you trust the file, re-save its "
                "state_dict with torch.save(torch.load(f, weights_only=False)['state_dict'], out) and import that"
            ) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as error:
            raise ArtifactError(
                f"{path} is not a readable PyTorch checkpoint (truncated, or another format): {str(error)[:200]}"
            ) from None
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    tensors = {k: v for k, v in (state or {}).items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ArtifactError(f"{path} holds no tensors (found {type(data).__name__}): not a model checkpoint")
    return tensors


def read_original_config(path: str | Path) -> dict:
    """``model.params`` of an original CompVis YAML config (plain YAML: no OmegaConf interpolation is used)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        params = yaml.safe_load(path.read_text())["model"]["params"]
    except (yaml.YAMLError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a CompVis config (expected model.params): {error}") from None
    return params


# --- what the checkpoint is -----------------------------------------------------------------------


def detect_family(state: dict, path: Path) -> str:
    """The family of a CompVis checkpoint from its keys and shapes, or an error naming what was found."""
    if any(k.startswith(("conditioner.embedders.", "model.diffusion_model.label_emb.0.0")) for k in state):
        raise ArtifactError(f"{path} is an SDXL checkpoint (conditioner.embedders / label_emb): not supported")
    if any(k.startswith("cond_stage_model.model.") for k in state):
        raise ArtifactError(
            f"{path} is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder, cond_stage_model.model.*): not "
            "supported (SD 2.x's 768 models predict v, not ε); supported: SD v1.x, LDM-4 bedrooms, LDM-8 churches, "
            "LDM-4 cin256-v2"
        )
    if not any(k.startswith(UNET_PREFIX) for k in state):
        what = "a first-stage autoencoder" if "decoder.conv_in.weight" in state else "no CompVis UNet"
        raise ArtifactError(f"{path} holds {what} (no {UNET_PREFIX}* keys): not a latent diffusion checkpoint")
    if CLIP_PREFIX + "text_model.embeddings.token_embedding.weight" in state:
        return "sd-v1"
    if CLASS_TABLE_KEY in state:
        return "ldm4-cin256-v2"
    conv_in = tuple(state[UNET_PREFIX + "input_blocks.0.0.weight"].shape[:2])
    known = {(224, 3): "ldm4-lsun-bedrooms", (192, 4): "ldm8-lsun-churches"}
    if conv_in not in known:
        raise ArtifactError(
            f"{path}: an unconditional UNet with {conv_in[0]} channels on {conv_in[1]}-channel latents matches no "
            "published family; pass its original YAML config"
        )
    return known[conv_in]


def check_supported(params: dict, source: str) -> str | None:
    """The conditioning of a supported model (None, "class" or "text"); an error for the others."""
    unet = (params.get("unet_config") or {}).get("params")
    if unet is None:
        raise ArtifactError(f"{source}: no unet_config (SDXL and later use network_config): not supported")
    if params.get("parameterization", "eps") != "eps":
        raise ArtifactError(
            f"{source}: parameterization {params['parameterization']!r} (SD 2.x 768-v predicts v): only ε-prediction "
            "models are supported"
        )
    if unet.get("use_linear_in_transformer") or unet.get("context_dim") == 1024:
        raise ArtifactError(f"{source}: a Stable Diffusion 2.x UNet (OpenCLIP context 1024): not supported")
    if unet.get("use_new_attention_order") or unet.get("num_heads_upsample", -1) not in (-1, unet.get("num_heads")):
        raise ArtifactError(
            f"{source}: a UNet with use_new_attention_order or its own num_heads_upsample: not supported (no "
            "published family has them)"
        )
    cond = params.get("cond_stage_config", "__is_unconditional__")
    name = cond if isinstance(cond, str) else cond.get("target", "").rsplit(".", 1)[-1]
    if name not in CONDITIONING:
        raise ArtifactError(f"{source}: conditioning {name!r} is not supported; supported: {', '.join(CONDITIONING)}")
    return CONDITIONING[name]


# --- diffusers configs ----------------------------------------------------------------------------


def unet_config(params: dict) -> tuple[str, dict]:
    """The diffusers UNet class and config of an ``openaimodel.UNetModel``'s params."""
    p = params["unet_config"]["params"]
    widths = [p["model_channels"] * m for m in p["channel_mult"]]
    attends = [2**level in p["attention_resolutions"] for level in range(len(widths))]
    common = dict(
        sample_size=params.get("image_size", p.get("image_size")),
        in_channels=p["in_channels"],
        out_channels=p["out_channels"],
        block_out_channels=widths,
        layers_per_block=p["num_res_blocks"],
        norm_num_groups=params.get("norm_num_groups", 32),
    )
    # the original's heads: num_head_channels wide where it is set (it takes precedence), else num_heads at every width
    heads, head_width = p.get("num_heads", -1), p.get("num_head_channels", -1)
    per_level = [w // head_width if head_width != -1 else heads for w in widths]
    if p.get("use_spatial_transformer"):
        # diffusers' UNet2DConditionModel reads attention_head_dim as the number of heads
        return "UNet2DConditionModel", common | dict(
            down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
            up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
            cross_attention_dim=p["context_dim"],
            attention_head_dim=per_level[0] if len(set(per_level)) == 1 else per_level,
            transformer_layers_per_block=p.get("transformer_depth", 1),
        )
    head_widths = [w // h for w, h in zip(widths, per_level)]
    updown, scale_shift = p.get("resblock_updown", False), p.get("use_scale_shift_norm", False)
    # the blocks without attention: with resblock_updown, a ResBlock samples their level as the attention blocks'
    plain_down = "ResnetDownsampleBlock2D" if updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if updown else "UpBlock2D"
    config = common | dict(
        down_block_types=["AttnDownBlock2D" if a else plain_down for a in attends],
        up_block_types=["AttnUpBlock2D" if a else plain_up for a in reversed(attends)],
        attention_head_dim=math.gcd(*head_widths),  # divides every level's width; the heads per level set the rest
        add_attention=True,
        downsample_type="resnet" if updown else "conv",
        upsample_type="resnet" if updown else "conv",
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        # under scale_shift diffusers gives the mid block's attention a GroupNorm only when told its groups
        attn_norm_num_groups=common["norm_num_groups"] if scale_shift else None,
    )
    return "UNet2DModel", config | ({HEADS_PER_LEVEL: per_level} if len(set(head_widths)) > 1 else {})


def first_stage_config(params: dict, scale_factor: float) -> tuple[str, dict]:
    """The diffusers autoencoder class and config of the first stage; ``scale_factor`` multiplies latents."""
    stage = params["first_stage_config"]
    dd = stage["params"]["ddconfig"]
    widths = [dd["ch"] * m for m in dd["ch_mult"]]
    config = dict(
        in_channels=dd["in_channels"],
        out_channels=dd["out_ch"],
        down_block_types=["DownEncoderBlock2D"] * len(widths),
        up_block_types=["UpDecoderBlock2D"] * len(widths),
        block_out_channels=widths,
        layers_per_block=dd["num_res_blocks"],
        latent_channels=dd["z_channels"],
        norm_num_groups=params.get("norm_num_groups", 32),
        sample_size=dd.get("resolution", 256),
        scaling_factor=scale_factor,
    )
    if "VQModel" in stage["target"]:
        return "VQModel", config | dict(
            num_vq_embeddings=stage["params"]["n_embed"], vq_embed_dim=stage["params"]["embed_dim"]
        )
    return "AutoencoderKL", config


def scheduler_config(params: dict) -> dict:
    """DDIM on the checkpoint's β schedule, as CompVis' DDIM sampler steps it: LDM's "linear" schedule
    (linspace of √β, squared) is diffusers' ``scaled_linear``; the first timestep is 1 (steps_offset) and the
    last step's previous ᾱ is ᾱ_0 (set_alpha_to_one false)."""
    if params.get("beta_schedule", "linear") != "linear":
        raise ArtifactError(f"β schedule {params['beta_schedule']!r}: only CompVis' 'linear' is supported")
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": params.get("timesteps", 1000),
        "beta_schedule": "scaled_linear",
        "beta_start": params.get("linear_start", 1e-4),
        "beta_end": params.get("linear_end", 2e-2),
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }


def check_schedule(state: dict, params: dict, source: str) -> None:
    """The checkpoint's own ``betas`` buffer (LatentDiffusion stores its schedule) must be the schedule the
    config describes: a model trained on another schedule would be sampled wrongly without a word."""
    if "betas" not in state:
        return
    config = scheduler_config(params)
    steps = config["num_train_timesteps"]
    expected = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, steps, dtype=torch.float64) ** 2
    stored = state["betas"].double()
    if stored.shape != expected.shape or not torch.allclose(stored, expected, rtol=1e-5, atol=1e-9):
        raise ArtifactError(
            f"{source}: its β schedule (betas: {len(stored)} steps, {stored[0]:.6g} … {stored[-1]:.6g}) is not the "
            f"config's linear schedule ({steps} steps, {config['beta_start']:.6g} … {config['beta_end']:.6g}): pass "
            "the model's original YAML config"
        )


# --- weights --------------------------------------------------------------------------------------


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _split_fused_attention(weights: dict, config: dict) -> dict:
    """``openaimodel.AttentionBlock`` keys (norm, fused 1-D conv qkv, proj_out) as diffusers' Attention.
    Its legacy QKV order is per head: the 3C rows are (heads, q/k/v, head width)."""
    heads_by_width = dict(zip(config["block_out_channels"], config.get(HEADS_PER_LEVEL, [])))  # a level's heads
    out = {}
    for key, value in weights.items():
        match = re.fullmatch(r"(.*attentions\.\d+)\.(norm|qkv|proj_out)\.(weight|bias)", key)
        if match is None:
            out[key] = value
            continue
        block, part, kind = match.groups()
        if part == "norm":
            out[f"{block}.group_norm.{kind}"] = value
        elif part == "proj_out":
            out[f"{block}.to_out.0.{kind}"] = value.reshape(value.shape[0], -1) if kind == "weight" else value
        else:
            channels = value.shape[0] // 3
            heads = heads_by_width.get(channels, channels // config["attention_head_dim"])
            rows = value.reshape(heads, 3, -1, *value.shape[1:])  # (heads, q/k/v, head width, [C, 1])
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                part_value = rows[:, i].reshape(-1, *value.shape[1:])
                out[f"{block}.{name}.{kind}"] = (
                    part_value.reshape(part_value.shape[0], -1) if kind == "weight" else part_value
                )
    return out


def convert_unet(state: dict, name: str, config: dict) -> dict:
    """Diffusers UNet weights from ``model.diffusion_model.*``: the weights the original sampling scripts run
    (``model_ema.*``, where a checkpoint has them, is what ``ema_scope`` would swap in; they are not read).

    ``resblock_updown`` UNets (LDM-8 churches) close a down level with a ResBlock, which diffusers' converter
    takes for one more resnet of the level, and open an up level with one after the level's attention or
    resnet (``output_blocks.N.1`` / ``.2``), which it would take for an attention: both are moved here."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, update_unet_resnet_ldm_to_diffusers

    upsamplers = {key: found for key in state if (found := UPSAMPLING_RESBLOCK.match(key))}
    weights = convert_ldm_unet_checkpoint({k: v for k, v in state.items() if k not in upsamplers}, config)
    per_level = config["layers_per_block"] + 1
    for key, found in upsamplers.items():
        level = f"up_blocks.{int(found.group(2)) // per_level}.upsamplers.0"
        update_unet_resnet_ldm_to_diffusers([key], weights, state, {"old": found.group(1), "new": level})
    closing_resnet = re.compile(rf"(down_blocks\.\d+)\.resnets\.{config['layers_per_block']}\.")
    weights = {closing_resnet.sub(r"\1.downsamplers.0.", k): v for k, v in weights.items()}
    return _split_fused_attention(weights, config) if name == "UNet2DModel" else weights


def convert_first_stage(first_stage: dict, name: str, config: dict) -> dict:
    """Diffusers autoencoder weights from first-stage keys without prefix (``encoder.*``, ``decoder.*``, ...)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    weights = convert_ldm_vae_checkpoint({FIRST_STAGE_PREFIX + k: v for k, v in first_stage.items()}, config)
    if name == "VQModel":
        weights["quantize.embedding.weight"] = first_stage["quantize.embedding.weight"]
    return weights


def _load(model: torch.nn.Module, weights: dict, source: str, ignore: tuple[str, ...] = ()) -> torch.nn.Module:
    """``weights`` into ``model``; every parameter must come from the checkpoint and every converted key fit,
    or the error names the file and the keys."""
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # a shape that does not fit
        raise ArtifactError(f"{source} does not fit its {type(model).__name__}: {str(error)[:600]}") from None
    unexpected = [k for k in unexpected if not k.endswith(ignore)] if ignore else unexpected
    if missing or unexpected:
        raise ArtifactError(
            f"{source} does not fit its {type(model).__name__}: missing {missing[:5]}"
            + (f" (+{len(missing) - 5})" if len(missing) > 5 else "")
            + f", unexpected {unexpected[:5]}"
        )
    return model.eval().requires_grad_(False)


def build_unet(state: dict, params: dict, source: str, device: str = "cpu") -> torch.nn.Module:
    """The diffusers UNet of a CompVis state dict (``model.diffusion_model.*``); on the meta device for a
    check of the key mapping without weights."""
    name, config = unet_config(params)
    with torch.device(device):
        unet = set_heads_per_level(diffusers_class(name).from_config(config))
    return _load(unet, convert_unet(state, name, config), source)


def build_first_stage(
    first_stage: dict, params: dict, scale_factor: float, source: str, device: str = "cpu"
) -> torch.nn.Module:
    """The diffusers autoencoder of first-stage weights (keys without ``first_stage_model.``)."""
    name, config = first_stage_config(params, scale_factor)
    with torch.device(device):
        model = diffusers_class(name).from_config(config)
    return _load(model, convert_first_stage(first_stage, name, config), source)


# --- CLIP text encoder and tokenizer --------------------------------------------------------------


def build_text_encoder(state: dict, source: str, device: str = "cpu"):
    """The CLIP text transformer of ``FrozenCLIPEmbedder`` (transformers' CLIPTextModel), its config read
    off the weights' shapes."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    weights = convert_ldm_clip_checkpoint(state)
    tokens = weights["text_model.embeddings.token_embedding.weight"]
    layers = {int(m.group(1)) for k in weights if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    config = CLIPTextConfig(
        vocab_size=tokens.shape[0],
        hidden_size=tokens.shape[1],
        intermediate_size=weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(layers),
        num_attention_heads=max(1, tokens.shape[1] // CLIP_HEAD_WIDTH),
        max_position_embeddings=weights["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu",
    )
    with torch.device(device):
        model = CLIPTextModel(config)
    if "text_model.embeddings.token_embedding.weight" not in model.state_dict():
        # transformers 5 dropped the text_model. level that SD's checkpoints (saved with transformers 4) have
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    return _load(model, weights, source, ignore=("position_ids",))


def clip_vocabulary(path: str | Path | None = None) -> Path:
    """OpenAI CLIP's BPE file: ``path``, or the copy open-clip-torch installs (found without importing it:
    its package imports timm)."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"CLIP vocabulary {path} not found")
        return Path(path)
    spec = importlib.util.find_spec("open_clip")
    found = [Path(p) / CLIP_VOCAB for p in (spec.submodule_search_locations or [])] if spec else []
    if not any(p.is_file() for p in found):
        raise FileNotFoundError(
            f"Stable Diffusion's tokenizer needs CLIP's BPE vocabulary {CLIP_VOCAB}, which the .ckpt does not hold: "
            "install it with `pip install --no-deps open-clip-torch` or pass its path (--clip-vocab)"
        )
    return next(p for p in found if p.is_file())


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map of bytes to printable characters (the BPE's base alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def save_clip_tokenizer(vocabulary: Path, folder: Path, max_length: int = 77):
    """A transformers CLIPTokenizer with OpenAI CLIP's vocabulary and merges, as SD v1's FrozenCLIPEmbedder
    uses it (77 tokens, padded with <|endoftext|>), written to ``folder``."""
    from transformers import CLIPTokenizer

    merges = gzip.open(vocabulary).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    base = list(_bytes_to_unicode().values())
    tokens = [*base, *(b + "</w>" for b in base), *("".join(m.split()) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length, pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


# --- the import -----------------------------------------------------------------------------------


def import_checkpoint(
    checkpoint: str | Path,
    target: str | Path,
    *,
    first_stage: str | Path | None = None,
    config: str | Path | None = None,
    clip_vocab: str | Path | None = None,
) -> Layout:
    """Write the CompVis ``checkpoint`` into ``target`` in the pipeline layout; return its layout.

    ``first_stage``: the autoencoder's own checkpoint (``models/first_stage_models/vq-f4/model.ckpt``), for
    a checkpoint without ``first_stage_model.*`` keys; ``config``: the original YAML (else the family's
    published config); ``clip_vocab``: CLIP's BPE file for SD (else open-clip-torch's copy)."""
    checkpoint, target = Path(checkpoint), Path(target)
    state = read_state_dict(checkpoint)
    family = detect_family(state, checkpoint) if config is None else None
    params = read_original_config(config) if config is not None else PUBLISHED[family]
    conditioning = check_supported(params, str(config or f"{checkpoint} ({family})"))
    check_schedule(state, params, str(checkpoint))
    stage = _strip(state, FIRST_STAGE_PREFIX)
    stage_source = checkpoint
    if not stage:
        if first_stage is None:
            raise ArtifactError(
                f"{checkpoint} holds no first stage (first_stage_model.*): pass the autoencoder's checkpoint as "
                "first_stage (e.g. models/first_stage_models/vq-f4/model.ckpt)"
            )
        stage, stage_source = read_state_dict(first_stage), Path(first_stage)
        stage = _strip(stage, FIRST_STAGE_PREFIX) or stage
    latent = params["unet_config"]["params"]["in_channels"]
    if "quant_conv.weight" not in stage or "decoder.conv_in.weight" not in stage:
        raise ArtifactError(f"{stage_source} holds no CompVis first-stage autoencoder (quant_conv, decoder.*)")
    if stage["decoder.conv_in.weight"].shape[1] != latent:
        raise ArtifactError(
            f"{stage_source}: its first stage has {stage['decoder.conv_in.weight'].shape[1]}-channel latents, "
            f"the UNet of {checkpoint} takes {latent}: not this model's autoencoder"
        )
    # scale_by_std models store the fitted factor as a buffer; the others take the config's (default 1)
    scale = float(state["scale_factor"]) if "scale_factor" in state else params.get("scale_factor", 1.0)
    unet = build_unet(state, params, str(checkpoint))
    autoencoder = build_first_stage(stage, params, scale, str(stage_source))
    unet.save_pretrained(target / "unet")
    autoencoder.save_pretrained(target / "vae")
    (target / "scheduler").mkdir(parents=True, exist_ok=True)
    (target / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(params), indent=2))
    if conditioning == "text":
        build_text_encoder(state, str(checkpoint)).save_pretrained(target / "text_encoder")
        save_clip_tokenizer(clip_vocabulary(clip_vocab), target / "tokenizer")
    elif conditioning == "class":
        from safetensors.torch import save_file

        (target / "class_embedding").mkdir(parents=True, exist_ok=True)
        save_file(
            {"weight": state[CLASS_TABLE_KEY].contiguous()}, target / "class_embedding" / "embeddings.safetensors"
        )
    return find_layout(target)
