"""Assemble a quantized UNet from the FP model and the weight / activation artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from pipeline.infra.fingerprint import check_same_model
from pipeline.infra.storage import ArtifactError, read_tensors
from pipeline.models.diffusion import load_fp_model
from pipeline.quant.artifacts import load_act_tensors, load_weight_tensors
from pipeline.quant.attention import quantize_attention
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
    fp_dir: Path,
    weights_path: Path,
    act_path: Path | None,
    fp_hash: str,
    steps: int,
    a_bits: int | None = None,
    softmax_bits: int | None = None,
) -> QuantizedUNet:
    """FP UNet with the stored integer weights (and, given ``act_path``, the per-step activation
    parameters for ``steps`` sampling steps) loaded; both artifacts must come from the model whose
    hash is ``fp_hash``. ``a_bits`` (and ``softmax_bits`` for quantized attention matmuls) are needed
    only when there is no ``act_path`` yet (activation calibration builds the quantizers it is about to
    fill); the activation artifact's header says them otherwise."""
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
        a_bits, softmax_bits = a_header["a_bits"], a_header.get("attention")
    spec = QuantSpec(w_bits=w_header["w_bits"], a_bits=a_bits, num_steps=steps, split=w_header["split"])
    layers = build_quantized(unet, spec, softmax_bits, weights, act, str(weights_path), str(act_path))
    return QuantizedUNet(unet, scheduler, layers, {"weights": w_header, "act": a_header})


def build_quantized(
    unet: torch.nn.Module,
    spec: QuantSpec,
    softmax_bits: int | None,
    weights: dict[str, torch.Tensor],
    act: dict[str, torch.Tensor] | None,
    weights_source: str,
    act_source: str,
) -> dict[str, QuantLayer]:
    """Quantize ``unet`` in place (its attention matmuls too when ``softmax_bits`` is set) and load the
    weight tensors and, given ``act``, the activation tensors, the matmul inputs' among them; return the
    quantized layers by name (the matmul inputs: :func:`~pipeline.quant.attention.matmul_inputs`)."""
    layers = quantize(unet, spec)
    inputs = {} if softmax_bits is None else quantize_attention(unet, spec.a_bits, softmax_bits, spec.num_steps)
    with torch.no_grad():
        load_weight_tensors(layers, weights, weights_source)
        if act is not None:
            load_act_tensors({**layers, **inputs}, act, act_source)
    return layers
