"""Device helpers: the ``device`` param, host-to-device copies that overlap with GPU work, and the
``autocast`` param."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """The torch device of the ``device`` param (auto | cpu | cuda)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but no CUDA device is available")
    return torch.device(name)


AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``. On CUDA the copy goes through pinned host memory and does not block
    the host, so reading the next batch from a store overlaps with the GPU's work on this one."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def autocast(device: torch.device, mode: str):
    """``torch.autocast`` for the ``autocast`` param (none | bf16 | fp16) on ``device``'s type."""
    if mode not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown autocast mode {mode!r}; allowed: {', '.join(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[mode]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
