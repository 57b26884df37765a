"""Portable quantized checkpoint: one safetensors file that, with the FP model folder it was made
from, is all that sampling needs (no DVC repository, no calibration data).

Contents, keyed ``<module.path>.<field>`` like the pipeline's artifacts:

* ``weight_packed`` (4-bit and narrower weights, two per byte: low nibble first) or ``weight_int``
  (wider weights, one uint8 each); integer weights of ``W · diag(γ)``;
* ``weight_scale``, ``weight_zero_point`` (per output channel and split part), ``gamma`` (LES);
* ``act_scale``, ``act_zero_point`` (per sampling step and part), ``pts_exponent`` (per step and
  input channel), for the layers and, where the attention matmuls are quantized, their inputs.

The JSON header holds the format, bit-widths, step count, the packed weights' shapes, the parameters
the checkpoint was made with, and a hash of the FP UNet's weights, checked when the checkpoint is
loaded so that it cannot be applied to another model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.infra.fingerprint import check_same_model, tensors_hash
from pipeline.infra.storage import ArtifactError, read_tensors, write_tensors
from pipeline.models.diffusion import load_fp_model
from pipeline.models.quantized import QuantizedUNet, build_quantized
from pipeline.quant import QuantSpec

FORMAT = "dmq-quantized-checkpoint/1"
PACKED, INTEGER = "weight_packed", "weight_int"


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 15] (any shape) to bytes, two per byte (the first value in the low nibble);
    an odd count is padded with a zero."""
    flat = values.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 values of ``shape``."""
    count = torch.Size(shape).numel()
    return torch.stack([packed & 0xF, packed >> 4], 1).reshape(-1)[:count].reshape(shape)


def unet_hash(unet: torch.nn.Module) -> str:
    """Hash of the FP UNet's weights as loaded, independent of the file format they came in."""
    return tensors_hash(unet.state_dict())


def export_checkpoint(
    path: str | Path,
    weights_path: str | Path,
    act_path: str | Path,
    model_folder: str | Path,
    model_hash: str,
    config: dict,
) -> dict:
    """Write the checkpoint from the pipeline's weight and activation artifacts (both made from the
    model in ``model_folder``, whose file hash is ``model_hash``); return its header."""
    weights, w_header = read_tensors(weights_path)
    act, a_header = read_tensors(act_path)
    check_same_model(w_header, model_hash, str(weights_path))
    check_same_model(a_header, model_hash, str(act_path))
    unet, _ = load_fp_model(model_folder)
    description = {
        "model_hash": model_hash,
        "unet_hash": unet_hash(unet),
        "w_bits": w_header["w_bits"],
        "a_bits": a_header["a_bits"],
        "steps": a_header["steps"],
        "split": w_header["split"],
        "method": a_header.get("method"),
        "attention": a_header.get("attention"),
        "config": config,
    }
    return write_checkpoint(path, weights, act, description)


DESCRIPTION = ("model_hash", "unet_hash", "w_bits", "a_bits", "steps", "split", "method", "attention", "config")


def write_checkpoint(
    path: str | Path, weights: dict[str, torch.Tensor], act: dict[str, torch.Tensor], description: dict
) -> dict:
    """Write the checkpoint of the weight tensors and activation tensors (the pipeline's artifact keys)
    with the header fields of :data:`DESCRIPTION`; narrow integer weights are packed. Return the header."""
    missing = [key for key in DESCRIPTION if key not in description]
    if missing:
        raise ValueError(f"a checkpoint header needs {', '.join(missing)}")
    tensors, shapes = {}, {}
    for key, value in {**weights, **act}.items():
        name, _, field = key.rpartition(".")
        if field == INTEGER and description["w_bits"] <= 4:
            tensors[f"{name}.{PACKED}"] = pack_nibbles(value.cpu())
            shapes[name] = list(value.shape)
        else:
            tensors[key] = value.cpu()
    header = {"format": FORMAT, **{key: description[key] for key in DESCRIPTION}, "packed_shapes": shapes}
    write_tensors(path, tensors, header)
    return header


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(weight tensors, activation tensors, header), with packed weights unpacked to ``weight_int``."""
    tensors, header = read_tensors(path)
    if header.get("format") != FORMAT:
        raise ArtifactError(
            f"{path} is not a quantized checkpoint of this pipeline (format {header.get('format')!r}, expected "
            f"{FORMAT!r})"
        )
    weights, act = {}, {}
    for key, value in tensors.items():
        name, _, field = key.rpartition(".")
        if field == PACKED:
            weights[f"{name}.{INTEGER}"] = unpack_nibbles(value, tuple(header["packed_shapes"][name]))
        else:
            (act if field.startswith(("act_", "pts_")) else weights)[key] = value
    return weights, act, header


def load_checkpoint(path: str | Path, model_folder: str | Path) -> QuantizedUNet:
    """The quantized UNet of a checkpoint on the FP model in ``model_folder`` (either local layout):
    its ``headers`` are the checkpoint's header. A model other than the one exported from is refused."""
    weights, act, header = read_checkpoint(path)
    unet, scheduler = load_fp_model(model_folder)
    found = unet_hash(unet)
    if found != header["unet_hash"]:
        raise ArtifactError(
            f"{path} was exported for another model: its UNet weights hash to {header['unet_hash']}, the UNet in "
            f"{model_folder} to {found}; pass the model folder the checkpoint was made from"
        )
    spec = QuantSpec(w_bits=header["w_bits"], a_bits=header["a_bits"], num_steps=header["steps"], split=header["split"])
    layers = build_quantized(unet, spec, header.get("attention"), weights, act, str(path), str(path))
    return QuantizedUNet(unet, scheduler, layers, header)
