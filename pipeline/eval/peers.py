"""Peer rows: the same FP model quantized by a library a practitioner would reach for instead, so
the table compares DMQ with it on the same model, seeds and metric.

optimum-quanto quantizes every Linear / Conv2d: weights per output channel (int8) or in groups
(int4), activations per tensor with one static scale for all timesteps, calibrated by running the
model on calibration inputs (an exponential moving average of the ranges, quanto's own)."""

from __future__ import annotations

import torch
from tqdm import tqdm

PEER_LIBRARIES = ("optimum-quanto",)
_UNPACK_ON_CUDA = None  # the kernel registration below, held so that it lives as long as the process


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """optimum-quanto's packing undone: each uint8 of ``packed`` holds ``8 / bits`` values, the i-th in bits
    ``[bits·i, bits·(i + 1))``, and the i-th values of all rows come as the i-th block of rows."""
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(8 // bits)]).to(torch.uint8)


def unpack_int4_in_torch() -> None:
    """Give optimum-quanto's ``unpack`` op (its int4 weights' bit unpacking) a CUDA kernel in plain torch
    ops: quanto's own CUDA kernel compiles an nvcc extension at its first call (minutes, or a failure where
    nvcc is missing), while shift-and-mask runs on any device and gives the same integers."""
    global _UNPACK_ON_CUDA
    if _UNPACK_ON_CUDA is None:
        import optimum.quanto  # noqa: F401  (defines the op)

        _UNPACK_ON_CUDA = torch.library.Library("quanto", "IMPL")
        _UNPACK_ON_CUDA.impl("unpack", unpack_bits, "CUDA")


@torch.no_grad()
def quanto_quantize(
    model: torch.nn.Module, w_bits: int, a_bits: int, inputs: tuple[torch.Tensor, ...], batch_size: int
) -> torch.nn.Module:
    """``model`` (a UNet or a Denoiser) quantized in place by optimum-quanto (W4 or W8, A8),
    calibrated on the trajectory records ``inputs`` = (x, t) or (x, t, cond), and frozen (integer weights)."""
    from optimum.quanto import Calibration, freeze, qint4, qint8, quantize

    unpack_int4_in_torch()
    weights = {4: qint4, 8: qint8}[w_bits]
    activations = {8: qint8}[a_bits]
    quantize(model, weights=weights, activations=activations)
    with Calibration(momentum=0.9):
        for start in tqdm(range(0, len(inputs[0]), batch_size), desc="quanto calibration"):
            model(*(v[start : start + batch_size] for v in inputs))
    freeze(model)
    return model
