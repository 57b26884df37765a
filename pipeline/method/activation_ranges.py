"""Activation calibration on the weight-quantized network: per-step ranges (EMA of min / max per step
index), or one MSE-searched range per layer shared by every step (Q-Diffusion, arXiv 2302.04304)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import zarr
from tqdm import tqdm

from pipeline.calibration.capture import observing
from pipeline.calibration.dump import step_records
from pipeline.infra.device import to_device
from pipeline.quant.layers import QuantLayer
from pipeline.quant.model import calibrating, quantization, set_step
from pipeline.quant.quantizers import affine_params, fake_quantize, part_extrema

RATIO_CHUNK_ELEMENTS = 1 << 23  # quantized copies of a layer input held at once by the shared-range search


@torch.no_grad()
def calibrate_activations(
    unet: nn.Module,
    layers: dict[str, QuantLayer],
    calib: zarr.Group,
    records: int,
    batch_size: int,
    momentum: float,
    device: torch.device,
    after_step: Callable[[int, tuple[torch.Tensor, ...]], None] | None = None,
    seed: int | None = None,
) -> None:
    """For each step index s: min/max on the first batch of step-s records, then an EMA over the
    remaining batches, every layer quantizing with its current estimate while later layers observe.
    ``after_step(s, inputs)`` runs once step s's ranges are final (PTS voting hooks in there), with
    the step's records ``inputs`` = (x, t) or (x, t, cond). ``unet`` may be a Denoiser. With ``seed``
    the records are a seeded draw of each step's, in random order (see :func:`step_records`)."""
    steps = calib.attrs["steps"]
    for layer in layers.values():
        layer.act_quantizer.momentum = momentum
        layer.quantize_acts = True
    for s in tqdm(range(steps), desc="calibrate activations"):
        set_step(unet, s)
        inputs = tuple(to_device(v, device) for v in step_records(calib, s, records, seed))
        with calibrating(layers.values()):
            for start in range(0, len(inputs[0]), batch_size):
                unet(*(v[start : start + batch_size] for v in inputs))
        for name, layer in layers.items():
            aq = layer.act_quantizer
            if not (torch.isfinite(aq.running_min[s]).all() and torch.isfinite(aq.running_max[s]).all()):
                raise FloatingPointError(
                    f"activation calibration: the input range of {name} is not finite (NaN or Inf) at step {s}"
                )
        if after_step is not None:
            after_step(s, inputs)


def _run_every_step(
    unet: nn.Module,
    calib: zarr.Group,
    records: int,
    batch_size: int,
    device: torch.device,
    desc: str,
    after_step: Callable[[int], None] | None = None,
    seed: int | None = None,
) -> None:
    """``records`` records of every step (the first, or a draw by ``seed``) through ``unet`` in batches
    of ``batch_size``, the step index set first; ``after_step(s)`` runs once step s's records are through."""
    for s in tqdm(range(calib.attrs["steps"]), desc=desc):
        set_step(unet, s)
        inputs = tuple(to_device(v, device) for v in step_records(calib, s, records, seed))
        for start in range(0, len(inputs[0]), batch_size):
            unet(*(v[start : start + batch_size] for v in inputs))
        if after_step is not None:
            after_step(s)


def _scaled_inputs(layers: dict[str, QuantLayer], observe: Callable[[str, torch.Tensor], None]):
    """``observe(name, x / γ)`` on every call of every layer, x / γ being the tensor its act quantizer sees."""
    return observing(layers, lambda name, layer, args, _: observe(name, layer.scale_input(args[0])), before=True)


@torch.no_grad()
def calibrate_shared_activations(
    unet: nn.Module,
    layers: dict[str, QuantLayer],
    calib: zarr.Group,
    records: int,
    batch_size: int,
    grid: int,
    device: torch.device,
    seed: int | None = None,
) -> None:
    """One (scale, zero point) per layer and part for all steps, as Q-Diffusion has: the range
    ``[lo r, hi r]`` minimising the summed squared error ``sum (x - Q(x))^2`` over ``records`` records
    of every step (the first, or a draw by ``seed``), among the clipping ratios ``r = 1 - 0.01 i``
    (i < ``grid``), where lo and hi are the part's min and max over those records. Q-Diffusion
    initialises this shared step block by block during its reconstruction; here every layer is
    initialised in one go from the inputs it gets with full-precision activations, so no layer's range
    depends on how earlier layers were quantized.

    1. Pass 1: min and max of every layer's input x / γ per part, activations in full precision
       (the weights as the caller set them).
    2. Pass 2, the same records: per layer, part and ratio, the summed squared error of fake-quantizing
       x / γ with that ratio's range. Vectorised over channels, parts and ratios, the ratios in chunks of
       at most ``RATIO_CHUNK_ELEMENTS`` quantized values: all ``grid`` copies of a large input at once
       would cost ``grid`` times its memory.
    3. Every step slot gets the best range's scale and zero point, PTS exponents 0, running min / max
       the clipped range; the layers then quantize their activations. ``unet`` may be a Denoiser."""
    # 1. min / max per part, over all steps
    ranges = {}
    for name, layer in layers.items():
        aq = layer.act_quantizer
        ranges[name] = (
            aq.running_min.new_full((aq.num_parts,), float("inf")),
            aq.running_min.new_full((aq.num_parts,), float("-inf")),
        )

    def extrema(name: str, x: torch.Tensor) -> None:
        aq = layers[name].act_quantizer
        lo, hi = part_extrema(x, aq.parts, aq.num_parts, layers[name].channel_dim)
        torch.minimum(ranges[name][0], lo, out=ranges[name][0])
        torch.maximum(ranges[name][1], hi, out=ranges[name][1])

    def check_finite(s: int) -> None:
        for name, (lo, hi) in ranges.items():
            if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
                raise FloatingPointError(
                    f"activation calibration: the input range of {name} is not finite (NaN or Inf) at step {s}"
                )

    with quantization(layers.values(), acts=False), _scaled_inputs(layers, extrema):
        _run_every_step(unet, calib, records, batch_size, device, "shared activation ranges (1/2)", check_finite, seed)

    # 2. squared error per (ratio, part) of every candidate range
    candidates, errors = {}, {}
    for name, layer in layers.items():
        aq = layer.act_quantizer
        ratios = 1.0 - 0.01 * torch.arange(grid, dtype=aq.scale.dtype, device=aq.scale.device)  # (G,)
        lo = ranges[name][0] * ratios[:, None]  # (G, P)
        hi = ranges[name][1] * ratios[:, None]
        candidates[name] = (lo, hi, *affine_params(lo, hi, aq.bits))
        errors[name] = torch.zeros(grid, aq.num_parts, dtype=torch.float64, device=lo.device)

    def squared_errors(name: str, x: torch.Tensor) -> None:
        layer = layers[name]
        aq = layer.act_quantizer
        _, _, scale, zero_point = candidates[name]
        channel_dim = layer.channel_dim % x.ndim + 1  # of x with a leading ratio dimension
        others = tuple(d for d in range(1, x.ndim + 1) if d != channel_dim)
        shape = [1] * (x.ndim + 1)
        shape[channel_dim] = -1
        chunk = max(1, RATIO_CHUNK_ELEMENTS // x.numel())
        for start in range(0, grid, chunk):
            ratios = slice(start, min(start + chunk, grid))
            shape[0] = ratios.stop - ratios.start
            x_hat = fake_quantize(
                x.unsqueeze(0), scale[ratios, aq.parts].view(shape), zero_point[ratios, aq.parts].view(shape), aq.bits
            )
            channel_errors = x_hat.sub_(x).square_().sum(others)  # (ratios, C)
            errors[name][ratios].index_add_(1, aq.parts, channel_errors.double())

    with quantization(layers.values(), acts=False), _scaled_inputs(layers, squared_errors):
        _run_every_step(unet, calib, records, batch_size, device, "shared activation ranges (2/2)", seed=seed)

    # 3. the best candidate per part, in every step slot (argmin: a tie goes to the least clipping)
    for name, layer in layers.items():
        aq = layer.act_quantizer
        best = errors[name].argmin(0)  # (P,)
        part = torch.arange(aq.num_parts, device=best.device)
        lo, hi, scale, zero_point = (t[best, part] for t in candidates[name])
        aq.scale[:], aq.zero_point[:] = scale, zero_point
        aq.running_min[:], aq.running_max[:] = lo, hi
        aq.exponent.zero_()
        aq.calibrated[:] = True
        layer.quantize_acts = True
