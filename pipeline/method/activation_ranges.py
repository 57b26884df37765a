"""Per-step activation calibration on the weight-quantized network."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import zarr
from tqdm import tqdm

from pipeline.calibration.dump import step_records
from pipeline.infra.device import to_device
from pipeline.quant.layers import QuantLayer
from pipeline.quant.model import calibrating, set_step


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
) -> None:
    """For each step index s: min/max on the first batch of step-s records, then an EMA over the
    remaining batches, every layer quantizing with its current estimate while later layers observe.
    ``after_step(s, inputs)`` runs once step s's ranges are final (PTS voting hooks in there), with
    the step's records ``inputs`` = (x, t) or (x, t, cond). ``unet`` may be a Denoiser."""
    steps = calib.attrs["steps"]
    for layer in layers.values():
        layer.act_quantizer.momentum = momentum
        layer.quantize_acts = True
    for s in tqdm(range(steps), desc="calibrate activations"):
        set_step(unet, s)
        inputs = tuple(to_device(v, device) for v in step_records(calib, s, records))
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
