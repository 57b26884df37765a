"""Assemble a quantized UNet from the FP model and the weight / activation artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from pipeline.infra.fingerprint import check_same_model
from pipeline.infra.storage import ArtifactError, read_tensors
from pipeline.models.diffusion import load_fp_model
from pipeline.quant.artifacts import load_act_tensors, load_weight_tensors
from pipeline.quant.layers import QuantLayer
from pipeline.quant.model import QuantSpec, quantize


class QuantizedUNet(NamedTuple):
    """A UNet with quantized layers, its training scheduler, the layers by name, and the artifacts'
    headers ("weights", "act")."""

    unet: torch.nn.Module
    scheduler: object
    layers: dict[str, QuantLayer]
    headers: dict


def load_quantized_unet(
    fp_dir: Path, weights_path: Path, act_path: Path | None, fp_hash: str, steps: int, a_bits: int | None = None
) -> QuantizedUNet:
    """FP UNet with the stored integer weights (and, given ``act_path``, the per-step activation
    parameters for ``steps`` sampling steps) loaded; both artifacts must come from the model whose
    hash is ``fp_hash``. ``a_bits`` is needed only when there is no ``act_path`` yet (activation
    calibration builds the quantizers it is about to fill)."""
    unet, scheduler = load_fp_model(fp_dir)
    weights, w_header = read_tensors(weights_path)
    check_same_model(w_header, fp_hash, str(weights_path))
    act, a_header = (None, {}) if act_path is None else read_tensors(act_path)
    if act is not None:
        check_same_model(a_header, fp_hash, str(act_path))
        if a_header["steps"] != steps:
            raise ArtifactError(
                f"{act_path} holds activation parameters for {a_header['steps']} sampling steps, but the sampler "
                f"runs {steps} (diffusion.steps); rebuild it by rerunning the stages from dump on"
            )
        a_bits = a_header["a_bits"]
    spec = QuantSpec(w_bits=w_header["w_bits"], a_bits=a_bits, num_steps=steps, split=w_header["split"])
    layers = quantize(unet, spec)
    with torch.no_grad():
        load_weight_tensors(layers, weights, str(weights_path))
        if act is not None:
            load_act_tensors(layers, act, str(act_path))
    return QuantizedUNet(unet, scheduler, layers, {"weights": w_header, "act": a_header})
