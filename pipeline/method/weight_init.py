"""Weight quantization: MSE-searched scales, then nearest rounding or AdaRound's learned rounding
(:mod:`pipeline.method.adaround`): the weights phase the recon stage and the API run (docs/method.md §4)."""

from __future__ import annotations

import copy
import time
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import zarr

from pipeline.calibration.capture import Budget
from pipeline.calibration.dump import random_records
from pipeline.config import Config
from pipeline.infra.checkpoint import Checkpoints
from pipeline.infra.device import to_device
from pipeline.infra.workers import one_thread_on_cpu
from pipeline.method.adaround import AdaRoundSettings, adaround
from pipeline.method.weighting import make_weighting
from pipeline.methods import METHODS
from pipeline.models.denoiser import Denoiser
from pipeline.quant.artifacts import load_gamma
from pipeline.quant.layers import QuantLayer
from pipeline.quant.model import QuantSpec, quantize


@torch.no_grad()
def init_weight_quantizers(layers: dict[str, QuantLayer], grid: int, p: float) -> None:
    """Search every layer's weight scales on ``W · diag(γ)`` and switch weight quantization on."""
    for layer in layers.values():
        layer.weight_quantizer.init_params(layer.scaled_weight(), grid, p)
        layer.quantize_weights = True


class Reconstructed(NamedTuple):
    """The weight-quantized copy of the FP UNet, its quantized layers by name, and the phase's report."""

    unet: nn.Module
    layers: dict[str, QuantLayer]
    report: dict


@one_thread_on_cpu  # the recon stage runs its quantization seeds side by side in worker processes instead
def reconstruct_weights(
    cfg: Config,
    name: str,
    seed: int,
    fp: Denoiser,
    gammas: dict[str, torch.Tensor],
    calib: zarr.Group | None,
    *,
    device: torch.device,
    checkpoints: Checkpoints | None = None,
    gamma_source: str = "gamma",
) -> Reconstructed:
    """Weights of entry ``name`` (docs/method.md §4): γ (``{"<layer>.gamma": γ}``, read from
    ``gamma_source``) folded in, scales searched, then AdaRound block by block on records drawn by
    ``seed`` (``calib`` is needed only for a method with AdaRound) or rounding to nearest. On the CPU on
    one intra-op thread, so the bytes do not depend on the core count."""
    quant, recon = cfg.quant, cfg.recon
    variant = cfg.weights_variant(name)
    method = METHODS[variant.method]
    q_unet = copy.deepcopy(fp.unet)
    layers = quantize(q_unet, QuantSpec(w_bits=variant.w_bits, split=method.split))
    load_gamma(layers, gammas, gamma_source)
    q_unet.to(device)  # before the weight-scale search: its 80 clipping ratios per layer are the device's work
    init_weight_quantizers(layers, quant.weight_clip_grid, quant.weight_clip_p)
    report = {}
    if method.adaround:
        records, step = random_records(calib, recon.records, seed)
        weighting = None
        if recon.weighting == "method":
            steps = calib.attrs["steps"]
            weighting = partial(make_weighting, method.weighting, steps, cfg.les.focal_r, cfg.les.focal_momentum)
        settings = AdaRoundSettings(
            iters=recon.iters,
            lr=recon.learning_rate,
            batch_size=recon.batch_size,
            reg_lambda=recon.reg_lambda,
            beta_start=recon.beta_start,
            beta_end=recon.beta_end,
            warmup=recon.warmup,
            seed=seed,
            precision=cfg.autocast,
        )
        start = time.perf_counter()
        inputs = tuple(to_device(v, device) for v in records)
        units = adaround(
            fp.with_unet(q_unet).to(device),
            fp.to(device),
            inputs,
            settings,
            make_weighting=weighting,
            steps=to_device(step, device),
            checkpoints=checkpoints,
            budget=Budget.from_config(cfg.capture),
            capture_batch=cfg.capture.batch_size,
        )
        report.update(seconds=round(time.perf_counter() - start, 1), units=units)
        report["mean_loss_before"] = sum(u["before"] for u in units.values()) / len(units)
        report["mean_loss_after"] = sum(u["after"] for u in units.values()) / len(units)
    return Reconstructed(q_unet, layers, report)
