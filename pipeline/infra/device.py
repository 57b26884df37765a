"""Device helpers: the ``device`` param, the numerics every CUDA run uses, host-to-device copies that
overlap with GPU work, the one way results leave the device, and the ``autocast`` param."""

from __future__ import annotations

import contextlib
import os

import torch


def resolve_device(name: str) -> torch.device:
    """The torch device of the ``device`` param (auto | cpu | cuda); a CUDA device gets
    :func:`pin_cuda_numerics` before anything runs on it."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but no CUDA device is available")
    if name == "cuda":
        pin_cuda_numerics()
    return torch.device(name)


def pin_cuda_numerics() -> None:
    """The numerics of every CUDA run (docs/gpu.md):

    * float32 stays float32: torch defaults convolutions to TF32 on Ampere and later, which rounds
      their inputs to a 10-bit mantissa, so a fake-quantized activation (a code times its step) would
      leave its grid and every result would differ from the CPU's; matmuls are pinned the same way;
    * deterministic kernels (``index_add_``, ``scatter_add_`` and cuDNN's weight gradients have
      deterministic versions under this flag), so a resumed run ends as an uninterrupted one; an op
      with no deterministic version warns instead of failing, and that warning voids the claim;
    * cuBLAS's fixed workspace, which its deterministic mode requires (read when its handle is made,
      so before the first matmul)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.benchmark = False  # the autotuner may pick another algorithm, another sum order, per run
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def cuda_numerics() -> str:
    """The GPU a process ran on and its numerics, for provenance (empty where CUDA was never used)."""
    if not torch.cuda.is_initialized():
        return ""
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    conv, matmul = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    return (
        f"GPU {torch.cuda.get_device_name(index)} (sm {major}.{minor}, CUDA {torch.version.cuda}); "
        f"conv fp32 {conv}, matmul fp32 {matmul}, deterministic {torch.are_deterministic_algorithms_enabled()}"
    )


AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``. On CUDA the copy goes through pinned host memory and does not block
    the host, so reading the next batch from a store overlaps with the GPU's work on this one."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached on the host: the one way a result leaves the device (on CUDA it waits for the
    GPU, so loops call it at their end or every so many iterations, never per batch). The meta device
    carries shapes only (the tests' device harness, the resource predictions): its host copy is zeros."""
    if tensor.device.type == "meta":
        return torch.zeros(tensor.shape, dtype=tensor.dtype)
    return tensor.detach().cpu()


def first_true(flags: torch.Tensor) -> int | None:
    """The index of the first True of the 1-D ``flags``, None if there is none: one wait for the GPU."""
    found = host(flags).nonzero()
    return int(found[0]) if len(found) else None


def first_nonfinite(values: torch.Tensor) -> int | None:
    """The first row of ``values`` (along its first dimension) holding a NaN or an Inf, None if every value
    is finite."""
    bad = ~torch.isfinite(values.detach())
    return first_true(bad.flatten(1).any(1) if values.dim() > 1 else bad)


CHECK_EVERY = 100  # iterations between checks of a training loop's losses for NaN / Inf (each waits for the device)


def nonfinite_loss(losses: torch.Tensor, i: int) -> tuple[int, float] | None:
    """At every ``CHECK_EVERY``-th iteration ``i`` and at the last of ``losses`` (one per iteration, filled
    up to ``i``): (the first iteration whose loss is NaN or Inf, that loss), or None."""
    if (i + 1) % CHECK_EVERY and i + 1 < len(losses):
        return None
    bad = first_nonfinite(losses[: i + 1])
    return None if bad is None else (bad, float(host(losses[bad])))


def autocast(device: torch.device, mode: str):
    """``torch.autocast`` for the ``autocast`` param (none | bf16 | fp16) on ``device``'s type: convolutions
    and matmuls run in the reduced type, so fake-quantized values leave their grid (docs/gpu.md)."""
    if mode not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown autocast mode {mode!r}; allowed: {', '.join(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[mode]
    if dtype is None:  # nothing to switch: also where torch.autocast knows no such device (meta)
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
