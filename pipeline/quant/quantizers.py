"""Uniform affine (asymmetric) quantizers.

``q = clamp(round(x / scale) + zero_point, 0, 2^bits - 1)``, ``x_hat = (q - zero_point) * scale``.
Weights: one (scale, zero point) per output channel and input-channel part (split quantization).
Activations: one (scale, zero point) per sampling step index and part, refined per input channel by a
power-of-two exponent k (PTS): channel c at step s uses ``scale[s, part(c)] * 2^-k[s, c]``.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class _RoundSTE(torch.autograd.Function):
    """One rounding kernel forward and the gradient passed through backward; the textbook
    ``(x.round() - x).detach() + x`` costs two more passes over ``x`` each way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.round()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return _RoundSTE.apply(x)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, ste: bool = False, inplace: bool = False
) -> torch.Tensor:
    """``(clamp(round(x / scale) + zp, 0, L) - zp) * scale`` with L = 2^bits - 1.

    With ``ste`` the rounding passes the gradient straight through, and the zero point is left out of
    the graph: it is a rounded value, so its gradient is 0 anyway. The clamp stays a clamp to the
    numbers 0 and L: at the bounds it gives no gradient, where a clamp to tensor bounds would split it.

    Without ``ste`` the same numbers come from ``min(max(r, -zp), L - zp) * scale`` (r = round(x / scale)
    and zp are integers far inside float32's exact range), every step in place on one buffer: on CPU
    a fresh output costs more than the arithmetic, and maximum/minimum with ``out=`` are several times
    faster than ``clamp`` to tensor bounds. ``inplace`` lets it overwrite ``x`` (a caller's temporary)."""
    levels = 2**bits - 1
    if ste:
        zero_point = zero_point.detach()
        return ((round_ste(x / scale) + zero_point).clamp(0, levels) - zero_point) * scale
    q = (x.div_(scale) if inplace else x / scale).round_()
    if q.requires_grad:  # autograd cannot trace ``out=``: the same bounds, on new tensors
        q = torch.minimum(torch.maximum(q, -zero_point), levels - zero_point)
    else:
        torch.maximum(q, -zero_point, out=q)
        torch.minimum(q, levels - zero_point, out=q)
    return q.mul_(scale)


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering ``[min(lo, 0), max(hi, 0)]``; a zero range gets a tiny
    scale instead of dividing by zero."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    zero_point = torch.round(-lo / scale)
    return scale, zero_point


def channel_extrema(x: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` over everything but ``channel_dim``: two (C,) tensors."""
    others = tuple(d for d in range(x.ndim) if d != channel_dim % x.ndim)  # reduce in place: no transposed copy of x
    return x.amin(others), x.amax(others)


def reduce_parts(
    lo: torch.Tensor, hi: torch.Tensor, parts: torch.Tensor, num_parts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel extrema (channels on the last dimension) to extrema per part of channels."""
    index = parts.expand_as(lo)
    inf = torch.full((*lo.shape[:-1], num_parts), float("inf"), dtype=lo.dtype, device=lo.device)
    return inf.scatter_reduce(-1, index, lo, "amin"), (-inf).scatter_reduce(-1, index, hi, "amax")


def part_extrema(
    x: torch.Tensor, parts: torch.Tensor, num_parts: int, channel_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` over everything but ``channel_dim``, then reduced per part of channels."""
    return reduce_parts(*channel_extrema(x, channel_dim), parts, num_parts)


def weight_channel_extrema(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max per (output channel, input channel): two (C_out, C_in) tensors."""
    flat = weight.reshape(weight.shape[0], weight.shape[1], -1)
    return flat.amin(2), flat.amax(2)


def weight_part_extrema(weight: torch.Tensor, parts: torch.Tensor, num_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max per (output channel, input-channel part): two (C_out, num_parts) tensors."""
    return reduce_parts(*weight_channel_extrema(weight), parts, num_parts)


def search_weight_params(
    weight: torch.Tensor, parts: torch.Tensor, num_parts: int, bits: int, grid: int, p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (output channel, part) scale and zero point minimising ``sum |w - Q(w)|^p`` over clipping
    ratios ``1 - 0.01 i`` applied to min and max. Vectorised over channels; loops over the grid only.

    Returns tensors of shape (C_out, num_parts)."""
    flat = weight.reshape(weight.shape[0], weight.shape[1], -1)  # (C_out, C_in, k)
    lo, hi = weight_part_extrema(weight, parts, num_parts)
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_zp = affine_params(lo, hi, bits)
    for i in range(grid):
        ratio = 1.0 - 0.01 * i
        scale, zp = affine_params(lo * ratio, hi * ratio, bits)
        w_hat = fake_quantize(flat, scale[:, parts, None], zp[:, parts, None], bits)
        err = (flat - w_hat).abs().pow(p).sum(2)  # (C_out, C_in)
        err = torch.zeros_like(lo).index_add_(1, parts, err)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def _input_channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C_out, C_in) per-channel params -> broadcastable against a weight of ``ndim`` dims."""
    return t.view(*t.shape, *([1] * (ndim - 2)))


class WeightQuantizer(nn.Module):
    """Per-output-channel asymmetric quantizer, with separate parameters per input-channel part.

    ``rounding`` holds AdaRound's learned offsets when present; otherwise rounding is nearest."""

    def __init__(self, weight_shape: torch.Size, parts: torch.Tensor, num_parts: int, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.num_parts = num_parts
        self.register_buffer("parts", parts.clone())
        self.register_buffer("scale", torch.ones(weight_shape[0], num_parts))
        self.register_buffer("zero_point", torch.zeros(weight_shape[0], num_parts))
        self.rounding: nn.Module | None = None

    def init_params(self, weight: torch.Tensor, grid: int, p: float) -> None:
        scale, zp = search_weight_params(weight.detach(), self.parts, self.num_parts, self.bits, grid, p)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)

    def channel_params(self, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            _input_channel_view(self.scale[:, self.parts], ndim),
            _input_channel_view(self.zero_point[:, self.parts], ndim),
        )

    def to_integer(self, weight: torch.Tensor) -> torch.Tensor:
        scale, zp = self.channel_params(weight.ndim)
        if self.rounding is not None:
            base = torch.floor(weight / scale) + self.rounding.hard_offset()
        else:
            base = torch.round(weight / scale)
        return (base + zp).clamp(0, 2**self.bits - 1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale, zp = self.channel_params(weight.ndim)
        if self.rounding is not None and self.rounding.soft:
            q = torch.floor(weight / scale) + self.rounding.soft_offset()
            return ((q + zp).clamp(0, 2**self.bits - 1) - zp) * scale
        return (self.to_integer(weight) - zp) * scale


class ActQuantizer(nn.Module):
    """Per-tensor (per part) asymmetric activation quantizer with one parameter set per step index.

    In calibration mode each call folds its input's min/max into an EMA for the current step and
    re-derives that step's parameters before quantizing, so layers later in the network calibrate on
    the outputs of already-quantized earlier layers."""

    def __init__(self, num_channels: int, parts: torch.Tensor, num_parts: int, bits: int, num_steps: int) -> None:
        super().__init__()
        self.bits = bits
        self.num_parts = num_parts
        self.register_buffer("parts", parts.clone())
        self.register_buffer("scale", torch.ones(num_steps, num_parts))
        self.register_buffer("zero_point", torch.zeros(num_steps, num_parts))
        self.register_buffer("exponent", torch.zeros(num_steps, num_channels, dtype=torch.int8))
        self.register_buffer("running_min", torch.zeros(num_steps, num_parts))
        self.register_buffer("running_max", torch.zeros(num_steps, num_parts))
        self.register_buffer("calibrated", torch.zeros(num_steps, dtype=torch.bool))
        self.step = 0
        self.calibrating = False
        self.momentum = 0.95
        self.learned_scale: torch.Tensor | None = None  # (parts,): a step being learned, for every step index

    def observe(self, x: torch.Tensor, channel_dim: int) -> None:
        lo, hi = part_extrema(x.detach(), self.parts, self.num_parts, channel_dim)
        s = self.step
        # where, not an `if` on the flag: a Python branch on a device tensor waits for the GPU at every call
        seen = self.calibrated[s]
        lo = torch.where(seen, self.momentum * self.running_min[s] + (1 - self.momentum) * lo, lo)
        hi = torch.where(seen, self.momentum * self.running_max[s] + (1 - self.momentum) * hi, hi)
        self.running_min[s], self.running_max[s] = lo, hi
        self.calibrated[s] = True
        self.scale[s], self.zero_point[s] = affine_params(lo, hi, self.bits)

    def channel_params(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel step size (PTS refinement applied) and zero point at ``step``."""
        base = self.scale[step] if self.learned_scale is None else self.learned_scale
        scale = base[self.parts] * torch.exp2(-self.exponent[step].float())
        return scale, self.zero_point[step, self.parts]

    def forward(self, x: torch.Tensor, channel_dim: int, ste: bool = False, inplace: bool = False) -> torch.Tensor:
        """Fake-quantize ``x``; ``inplace`` lets it overwrite ``x`` (see :func:`fake_quantize`). A step
        being learned takes its gradient through the rounding (straight through)."""
        if self.calibrating:
            self.observe(x, channel_dim)
        scale, zp = self.channel_params(self.step)
        shape = [1] * x.ndim
        shape[channel_dim] = -1
        ste = ste or self.learned_scale is not None
        return fake_quantize(x, scale.view(shape), zp.view(shape), self.bits, ste=ste, inplace=inplace)
