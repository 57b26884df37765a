"""Learned Equivalent Scaling (docs/method.md §2): one γ ∈ R^{C_in}, γ > 0, per quantized layer.

γ = exp(θ), θ = 0 at the start, so γ stays positive without clamping. The loss compares the FP layer
output, captured from the calibration trajectories, with ``Qw(W · diag(γ)) ⊛ Qa(x / γ) + b`` where both quantizers take
their range on the fly (per output channel and part for weights, per tensor and part for activations)
and round straight-through, so the gradient reaches γ through the rounding and through the ranges.

Layers are independent: :func:`learn_all` spreads them over torchrun ranks and, within a rank, over
worker processes. Each layer's batch order comes from a generator seeded by a stable hash of (seed,
layer name), so γ does not depend on the number of ranks or workers or the order in which layers
finish. On CUDA the iteration loop never waits for the GPU: batch indices are drawn up front, the
timestep weighting lives on the device, and the loss is checked for NaN / Inf every
``CHECK_EVERY`` (:mod:`pipeline.infra.device`) iterations, not every one.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import zarr
from tqdm import tqdm

from pipeline.calibration.capture import Budget, execution_order, gather, io_numel, layer_io, windows
from pipeline.calibration.dump import records_by_step, records_per_step
from pipeline.config import Config
from pipeline.infra.checkpoint import Checkpoints
from pipeline.infra.device import first_nonfinite, host, nonfinite_loss, to_device
from pipeline.infra.distributed import SINGLE, World
from pipeline.infra.workers import single_threaded
from pipeline.method.weighting import TimestepWeighting, make_weighting
from pipeline.methods import METHODS
from pipeline.models.denoiser import Denoiser
from pipeline.quant.layers import QuantLayer
from pipeline.quant.model import QuantSpec, quantizable_layers, quantize
from pipeline.quant.quantizers import (
    affine_params,
    channel_extrema,
    fake_quantize,
    reduce_parts,
    weight_channel_extrema,
)


def layer_seed(seed: int, name: str) -> int:
    """Stable across processes and runs (Python's ``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def quantized_output(
    layer: QuantLayer, x: torch.Tensor, gamma: torch.Tensor, weight_extrema: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """``Qw(W · diag(γ)) ⊛ Qa(x / γ) + b`` with on-the-fly min-max ranges and straight-through rounding.

    The ranges are the per-channel extrema of W (``weight_extrema``: :func:`weight_channel_extrema` of the
    layer's weight, which γ's learning leaves unchanged) and of x, multiplied or divided by γ: scaling by a
    positive number keeps the order of floats, so they are the extrema of W · diag(γ) and x / γ to the bit,
    and the gradient reaches γ through C values instead of a backward pass over both full tensors (a min's
    backward compares every element with it)."""
    wq = layer.weight_quantizer
    parts, num_parts = wq.parts, wq.num_parts
    w = layer.scaled_weight(gamma)
    lo, hi = weight_extrema
    scale, zp = affine_params(*reduce_parts(lo * gamma, hi * gamma, parts, num_parts), wq.bits)
    view = (w.shape[0], w.shape[1], *[1] * (w.ndim - 2))
    w_hat = fake_quantize(w, scale[:, parts].view(view), zp[:, parts].view(view), wq.bits, ste=True)

    lo, hi = channel_extrema(x, layer.channel_dim)
    x = layer.scale_input(x, gamma)
    scale, zp = affine_params(*reduce_parts(lo / gamma, hi / gamma, parts, num_parts), layer.act_quantizer.bits)
    shape = [1] * x.ndim
    shape[layer.channel_dim] = -1
    x_hat = fake_quantize(x, scale[parts].view(shape), zp[parts].view(shape), layer.act_quantizer.bits, ste=True)
    return layer.module_forward(x_hat, w_hat)


def per_sample_loss(out: torch.Tensor, target: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Squared error summed over channels, averaged over positions: shape (batch,)."""
    return (out - target).pow(2).sum(channel_dim).reshape(len(out), -1).mean(1)


@torch.no_grad()
def layer_loss(
    layer: QuantLayer, inputs: torch.Tensor, outputs: torch.Tensor, steps: int, gamma: torch.Tensor, batch_size: int
) -> float:
    """Unweighted mean loss over all records, each batch computed on ``gamma``'s device. Activation ranges
    are taken per chunk of one step's records, as the per-step activation quantizers will be, so the
    number does not depend on how steps would be mixed in a batch."""
    per_step, device = len(inputs) // steps, gamma.device
    weight_extrema = weight_channel_extrema(layer.module.weight.detach())
    total = torch.zeros((), dtype=torch.float64, device=device)
    for s in range(steps):
        for a in range(s * per_step, (s + 1) * per_step, batch_size):
            b = min(a + batch_size, (s + 1) * per_step)
            out = quantized_output(layer, inputs[a:b].to(device).float(), gamma, weight_extrema)
            total += per_sample_loss(out, outputs[a:b].to(device).float(), layer.channel_dim).double().sum()
    return float(host(total)) / len(inputs)


def learn_gamma(
    layer: QuantLayer,
    inputs: torch.Tensor,
    outputs: torch.Tensor,
    steps: int,
    weighting: TimestepWeighting,
    *,
    iters: int,
    lr: float,
    batch_size: int,
    seed: int,
    name: str = "layer",
    device: torch.device | None = None,
) -> tuple[torch.Tensor, float, float]:
    """Learn γ for one layer from its FP ``inputs`` / ``outputs`` (record r is at step r // (N / S)) on
    ``device`` (default: the captures'), each batch gathered from wherever the captures lie.

    Returns (γ, loss at γ = 1, loss at the learned γ), both losses over all records. The layer
    itself is not modified."""
    n = len(inputs)
    if n == 0 or n % steps:
        raise ValueError(f"LES on {name}: {n} records do not split into {steps} steps")
    per_step = n // steps
    device = inputs.device if device is None else device
    theta = torch.zeros(layer.gamma.shape, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iters, eta_min=0.0)
    generator = torch.Generator().manual_seed(layer_seed(seed, name))
    # the same draws as one randperm per iteration, on the host for captures kept there, copied to the device once
    draws = torch.stack([torch.randperm(n, generator=generator)[:batch_size] for _ in range(iters)])
    draws_on_device = to_device(draws, device)
    losses = torch.empty(iters, device=device)
    weight_extrema = weight_channel_extrema(layer.module.weight.detach())  # W is fixed: once, not per iteration
    for i in range(iters):
        index = (draws[i], draws_on_device[i])
        step_idx = index[1] // per_step
        x, target = gather((inputs, outputs), index, device)
        out = quantized_output(layer, x.float(), theta.exp(), weight_extrema)
        loss = per_sample_loss(out, target.float(), layer.channel_dim)
        weighting.update(step_idx, loss)
        total = (weighting.weights(step_idx) * loss).mean()
        losses[i] = total.detach()
        if (bad := nonfinite_loss(losses, i)) is not None:
            raise FloatingPointError(f"LES on {name}: loss is {bad[1]} at iteration {bad[0]}")
        # autograd.grad, not backward: only θ needs a gradient; the layer's weights stay untouched
        (theta.grad,) = torch.autograd.grad(total, theta)
        optimizer.step()
        schedule.step()
    gamma = theta.detach().exp()
    if first_nonfinite(gamma) is not None:
        raise FloatingPointError(f"LES on {name}: γ is not finite after {iters} iterations")
    before = layer_loss(layer, inputs, outputs, steps, torch.ones_like(gamma), batch_size)
    after = layer_loss(layer, inputs, outputs, steps, gamma, batch_size)
    return gamma, before, after


@dataclass(frozen=True)
class LESSettings:
    """What shapes a layer's γ besides its records: the timestep weighting (``weighting`` with exponent
    ``r`` and EMA ``momentum``), Adam's ``iters`` and ``lr`` and the batches of ``batch_size`` drawn by ``seed``."""

    weighting: str
    iters: int
    lr: float
    batch_size: int
    r: float = 20.0
    momentum: float = 0.95
    seed: int = 0


def _learn_captured(name: str, layer: QuantLayer, steps: int, settings: LESSettings, device: torch.device):
    inputs, outputs = _CAPTURED[name]
    s = settings
    weighting = make_weighting(s.weighting, steps, s.r, s.momentum)
    # the captures stay where the capture budget placed them: only batches travel to the device
    draws = dict(iters=s.iters, lr=s.lr, batch_size=s.batch_size, seed=s.seed)
    gamma, before, after = learn_gamma(
        layer.to(device), inputs, outputs, steps, weighting, name=name, device=device, **draws
    )
    return name, host(gamma), before, after


# the captures of the window being learned: forked workers inherit them, copy-on-write, instead of
# receiving a pickled copy of every layer's records
_CAPTURED: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def assign_layers(costs: dict[str, int], ranks: int) -> dict[str, int]:
    """The rank that learns each layer: costliest layer first, each to the least loaded rank."""
    load, owner = [0] * ranks, {}
    for name in sorted(costs, key=costs.get, reverse=True):
        rank = load.index(min(load))
        owner[name] = rank
        load[rank] += costs[name]
    return owner


def learn_all(
    layers: dict[str, QuantLayer],
    fp_model: nn.Module,
    fp_layers: dict[str, nn.Module],
    records: tuple[torch.Tensor, ...],
    steps: int,
    settings: LESSettings,
    *,
    budget: Budget,
    capture_batch: int = 64,
    workers: int = 1,
    checkpoints: Checkpoints | None = None,
    device: torch.device = torch.device("cpu"),
    world: World = SINGLE,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[float, float]]]:
    """γ for every layer: ({name: γ}, {name: (loss at γ = 1, loss at γ)}), in the order of ``layers``.

    Each layer learns from its FP input and output on ``records`` = (x, t) or (x, t, cond), step by
    step (record r is at step r // (len / ``steps``)), captured from ``fp_model`` (the FP network
    whose layers have the names of ``layers``) a window of consecutive layers at a time within
    ``budget`` (:mod:`pipeline.calibration.capture`).

    Every layer runs on one intra-op thread, inline (``workers`` = 1) or in ``workers`` forked
    processes: torch's CPU reductions split work by thread count, so a fixed count keeps γ
    bit-identical for any ``workers``. Use more workers, not more threads, to use more cores. With
    ``checkpoints`` each finished layer is saved at once and layers found there are not learned
    again: γ is the same whether a run resumed or not, because each layer's result depends on that
    layer alone.

    With several torchrun ranks (``world``) each rank learns the layers :func:`assign_layers` gives
    it and every rank returns all results. On CUDA a rank learns its layers one after another on its
    GPU (forked workers cannot share a CUDA context)."""
    if missing := sorted(set(layers) - set(fp_layers)):
        raise ValueError(f"LES: the FP model has no layer {missing[0]!r}")
    fp_layers = {name: fp_layers[name] for name in layers}
    one = tuple(v[:1].to(device) for v in records)
    order = execution_order(fp_layers, lambda: fp_model(*one))
    if unreached := [name for name in layers if name not in order]:
        raise ValueError(f"LES: a forward pass never reaches {unreached[0]!r}")
    numel = io_numel(fp_model, fp_layers, one)
    n = len(records[0])
    capture_bytes = {name: n * sum(numel[name]) * 4 for name in order}  # float32 input and output
    if device.type == "cuda":
        workers = 1
    job = partial(_learn_captured, steps=steps, settings=settings, device=device)
    results = {}
    if checkpoints:
        for name in layers:
            if (saved := checkpoints.load(name)) is not None:
                tensors, losses = saved
                results[name] = (tensors["gamma"], losses["before"], losses["after"])
    # rank 0's view of what is done: a rank that looked later could see layers other ranks already learned
    # in this run, and split the rest differently
    done = world.broadcast(list(results))
    results = {name: results[name] for name in done}
    todo = [name for name in order if name not in results]
    if world.size > 1:
        # a layer's cost: its multiply-adds over the records
        costs = {name: n * numel[name][0] * (w := layers[name].module.weight).numel() // w.shape[1] for name in todo}
        owner = assign_layers(costs, world.size)
        todo = [name for name in todo if owner[name] == world.rank]
    with tqdm(
        total=len(results) + len(todo), initial=len(results), desc="LES", unit="layer", disable=not world.main
    ) as bar:

        def finished(name: str, gamma: torch.Tensor, before: float, after: float) -> None:
            results[name] = (gamma, before, after)
            if checkpoints:
                checkpoints.save(name, {"gamma": gamma}, {"before": before, "after": after})
            bar.update()

        for window in windows(todo, capture_bytes, budget.window_bytes):
            with layer_io(
                fp_model, {name: fp_layers[name] for name in window}, records, capture_batch, budget, device
            ) as captured:
                _CAPTURED.update(captured)
                try:
                    for result in single_threaded(job, [(name, layers[name]) for name in window], workers):
                        finished(*result)
                finally:
                    _CAPTURED.clear()
    results = world.merge(results)
    return {n: results[n][0] for n in layers}, {n: (results[n][1], results[n][2]) for n in layers}


def les_records_per_step(cfg: Config, calib: zarr.Group) -> int:
    """Records of each step LES learns from: ``les.records`` spread over the steps, or all of them."""
    steps = calib.attrs["steps"]
    return (cfg.les.records or steps * records_per_step(calib)) // steps


def learn_gammas(
    cfg: Config,
    name: str,
    seed: int,
    fp: Denoiser,
    calib: zarr.Group | None,
    *,
    device: torch.device,
    world: World = SINGLE,
    checkpoints: Checkpoints | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[float, float]]]:
    """LES of weights entry ``name`` (docs/method.md §2): ({layer: γ}, {layer: (loss at γ = 1, loss at γ)});
    γ = 1 everywhere and no losses for a method without LES, which needs no ``calib``."""
    variant = cfg.weights_variant(name)
    method = METHODS[variant.method]
    les = cfg.les
    unet = copy.deepcopy(fp.unet).cpu()
    spec = QuantSpec(w_bits=variant.w_bits, a_bits=variant.a_bits, num_steps=1, split=method.split)
    layers = quantize(unet, spec)
    if not method.les:
        return {n: torch.ones_like(layer.gamma) for n, layer in layers.items()}, {}
    fp_layers = quantizable_layers(fp.unet)
    return learn_all(
        layers,
        fp.to(device),
        fp_layers,
        records_by_step(calib, les_records_per_step(cfg, calib), seed),
        calib.attrs["steps"],
        LESSettings(
            method.weighting, les.iters, les.learning_rate, les.batch_size, les.focal_r, les.focal_momentum, seed
        ),
        budget=Budget.from_config(cfg.capture),
        capture_batch=cfg.capture.batch_size,
        workers=les.workers,
        checkpoints=checkpoints,
        device=device,
        world=world,
    )
