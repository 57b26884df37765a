"""Per-step activation calibration on the weight-quantized network."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import zarr
from tqdm import tqdm

from pipeline.accel import to_device
from pipeline.calib import step_records
from pipeline.quant.layers import QuantLayer
from pipeline.quant.model import set_step


@torch.no_grad()
def calibrate_activations(
    unet: nn.Module,
    layers: dict[str, QuantLayer],
    calib: zarr.Group,
    records: int,
    batch_size: int,
    momentum: float,
    device: torch.device,
    after_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> None:
    """For each step index s: min/max on the first batch of step-s records, then an EMA over the
    remaining batches, every layer quantizing with its current estimate while later layers observe.
    ``after_step(s, x, t)`` runs once step s's ranges are final (PTS voting hooks in there)."""
    steps = calib.attrs["steps"]
    for layer in layers.values():
        layer.act_quantizer.momentum = momentum
        layer.quantize_acts = True
    for s in tqdm(range(steps), desc="calibrate activations"):
        set_step(unet, s)
        x, t = step_records(calib, s, records)
        x, t = to_device(x, device), to_device(t, device)
        for layer in layers.values():
            layer.act_quantizer.calibrating = True
        for start in range(0, len(x), batch_size):
            unet(x[start : start + batch_size], t[start : start + batch_size])
        for name, layer in layers.items():
            aq = layer.act_quantizer
            aq.calibrating = False
            if not (torch.isfinite(aq.running_min[s]).all() and torch.isfinite(aq.running_max[s]).all()):
                raise FloatingPointError(f"activation calibration: the input range of {name} is not finite (NaN or Inf) at step {s}")
        if after_step is not None:
            after_step(s, x, t)
