"""Activation calibration on the weight-quantized network: per-step ranges (EMA of min / max per step
index), or one range per layer shared by every step, initialised by an Lp search and then learned block
by block (Q-Diffusion, arXiv 2302.04304)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import zarr
from tqdm import tqdm

from pipeline.calibration.capture import Budget, observing
from pipeline.calibration.dump import random_records, step_records
from pipeline.config import Config
from pipeline.infra.checkpoint import Checkpoints
from pipeline.infra.device import first_nonfinite, first_true, host, to_device
from pipeline.infra.workers import one_thread_on_cpu
from pipeline.method.adaround import UnitRecords, fit_unit, unit_by_unit
from pipeline.method.pts import PTSVoter
from pipeline.methods import METHODS
from pipeline.models.denoiser import Denoiser
from pipeline.quant.attention import MatmulInput
from pipeline.quant.layers import QuantLayer
from pipeline.quant.model import calibrating, set_step
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
    names, quantizers = list(layers), [layer.act_quantizer for layer in layers.values()]
    for s in tqdm(range(steps), desc="calibrate activations"):
        set_step(unet, s)
        inputs = tuple(to_device(v, device) for v in step_records(calib, s, records, seed))
        with calibrating(layers.values()):
            for start in range(0, len(inputs[0]), batch_size):
                unet(*(v[start : start + batch_size] for v in inputs))
        ranges = [torch.cat([q.running_min[s], q.running_max[s]]) for q in quantizers]
        if (bad := first_true(torch.stack([~torch.isfinite(r).all() for r in ranges]))) is not None:  # one wait a step
            raise FloatingPointError(
                f"activation calibration: the input range of {names[bad]} is not finite (NaN or Inf) at step {s}"
            )
        if after_step is not None:
            after_step(s, inputs)


def _best_ranges(layer: QuantLayer, x: torch.Tensor, grid: int, p: float) -> tuple[torch.Tensor, ...]:
    """Per part of ``layer``'s channels, the range ``[lo r, hi r]`` minimising ``sum |x - Q(x)|^p`` among
    the clipping ratios ``r = 1 - 0.01 i`` (i < ``grid``), lo and hi the part's min and max of ``x``:
    (lo, hi, scale, zero point), each (parts,). Vectorised over channels, parts and ratios, the ratios in
    chunks of at most ``RATIO_CHUNK_ELEMENTS`` quantized values: all ``grid`` copies of a large input at
    once would cost ``grid`` times its memory. A tie goes to the least clipping."""
    aq = layer.act_quantizer
    lo, hi = part_extrema(x, aq.parts, aq.num_parts, layer.channel_dim)
    ratios = 1.0 - 0.01 * torch.arange(grid, dtype=x.dtype, device=x.device)  # (G,)
    lo, hi = lo * ratios[:, None], hi * ratios[:, None]  # (G, P)
    scale, zero_point = affine_params(lo, hi, aq.bits)
    errors = torch.zeros(grid, aq.num_parts, dtype=torch.float64, device=x.device)
    channel_dim = layer.channel_dim % x.ndim + 1  # of x with a leading ratio dimension
    others = tuple(d for d in range(1, x.ndim + 1) if d != channel_dim)
    shape = [1] * (x.ndim + 1)
    shape[channel_dim] = -1
    chunk = max(1, RATIO_CHUNK_ELEMENTS // x.numel())
    for start in range(0, grid, chunk):
        chosen = slice(start, min(start + chunk, grid))
        shape[0] = chosen.stop - chosen.start
        x_hat = fake_quantize(
            x.unsqueeze(0), scale[chosen, aq.parts].view(shape), zero_point[chosen, aq.parts].view(shape), aq.bits
        )
        channel_errors = x_hat.sub_(x).abs_().pow_(p).sum(others)  # (ratios, C)
        errors[chosen].index_add_(1, aq.parts, channel_errors.double())
    best = errors.argmin(0)  # (P,)
    part = torch.arange(aq.num_parts, device=best.device)
    return tuple(t[best, part] for t in (lo, hi, scale, zero_point))


@torch.no_grad()
def init_shared_activations(
    unet: nn.Module, layers: dict[str, QuantLayer], inputs, steps: torch.Tensor, grid: int, p: float
) -> None:
    """Q-Diffusion's initialisation of the activation range shared by all steps (arXiv 2302.04304): one
    forward pass over the records ``inputs`` = (x, t) or (x, t, cond) of any steps (``steps``: each
    row's step index), weights and activations quantized, every layer choosing at its first call, on the
    input it gets from the quantized layers before it, the ranges of :func:`_best_ranges` for its
    x / γ. Every step slot gets them, PTS exponents 0. ``unet`` may be a Denoiser."""
    pending = dict(layers)

    def initialise(name: str, layer: QuantLayer, args, _) -> None:
        if pending.pop(name, None) is None:
            return  # a layer called twice in a pass keeps its first call's range
        x = layer.scale_input(args[0])
        if (row := first_nonfinite(x)) is not None:
            step = int(host(steps)[row])
            raise FloatingPointError(
                f"activation calibration: the input range of {name} is not finite (NaN or Inf) at step {step}"
            )
        aq = layer.act_quantizer
        lo, hi, scale, zero_point = _best_ranges(layer, x, grid, p)
        aq.scale[:], aq.zero_point[:] = scale, zero_point
        aq.running_min[:], aq.running_max[:] = lo, hi
        aq.exponent.zero_()
        aq.calibrated[:] = True

    for layer in layers.values():
        layer.quantize_acts = True
    with observing(layers, initialise, before=True):
        unet(*inputs)
    if pending:
        raise RuntimeError(f"activation calibration: {', '.join(pending)} not reached by a forward pass")


@dataclass(frozen=True)
class StepLearning:
    """Q-Diffusion's second activation phase: Adam on the shared steps, cosine-decayed to 0."""

    iters: int
    lr: float
    batch_size: int
    p: float  # of the block output's Lp error
    seed: int
    precision: str = "none"


def learn_unit_steps(name: str, unit: nn.Module, fp_inputs, fp_outputs, settings: StepLearning) -> dict:
    """Learn the shared step (one per layer and part) of every act quantizer inside ``unit``, weights and
    activations quantized, on FP inputs against FP outputs; zero points stay. Returns the Lp loss
    before and after."""
    layers = [m for m in act_quantized(unit).values() if m.quantize_acts]
    unit.requires_grad_(False)  # only the steps learn (the weights are frozen integers)
    steps = [nn.Parameter(layer.act_quantizer.scale[0].clone()) for layer in layers]
    optimizer = torch.optim.Adam(steps, lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.iters, eta_min=0.0)
    records = UnitRecords(unit, fp_inputs, fp_outputs, settings.precision, settings.p)
    before = records.mean_loss(settings.batch_size)
    try:
        for layer, step in zip(layers, steps):
            layer.act_quantizer.learned_scale = step
        fit_unit(
            "activation step",
            name,
            records,
            optimizer,
            settings.iters,
            settings.batch_size,
            settings.seed,
            lambda i, index: records.per_sample_loss(index).mean(),
            schedule,
        )
    finally:
        for layer in layers:
            layer.act_quantizer.learned_scale = None
    with torch.no_grad():
        for layer, step in zip(layers, steps):
            _set_steps(layer.act_quantizer, step.clamp_min(1e-8))
    return {"before": before, "after": records.mean_loss(settings.batch_size)}


def _set_steps(aq, scale: torch.Tensor) -> None:
    """Every step slot quantizes with ``scale`` (parts,) and its zero point; the running range follows."""
    levels = 2**aq.bits - 1
    aq.scale[:] = scale
    aq.running_min[:], aq.running_max[:] = -aq.zero_point * scale, (levels - aq.zero_point) * scale


def act_quantized(unit: nn.Module) -> dict[str, QuantLayer | MatmulInput]:
    """The modules of ``unit`` with an activation quantizer (layers and attention matmul inputs), by path."""
    return {name: m for name, m in unit.named_modules() if isinstance(m, (QuantLayer, MatmulInput))}


def shared_steps(unit: nn.Module) -> dict[str, torch.Tensor]:
    """The learned steps of a unit's act quantizers, by module path inside the unit."""
    return {name: m.act_quantizer.scale[0] for name, m in act_quantized(unit).items()}


@torch.no_grad()
def restore_shared_steps(unit: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, m in act_quantized(unit).items():
        _set_steps(m.act_quantizer, state[name].to(m.act_quantizer.scale.device))


def learn_shared_steps(
    q_model: nn.Module,
    fp_model: nn.Module,
    inputs,
    settings: StepLearning,
    checkpoints: Checkpoints | None = None,
    budget: Budget = Budget.of(0.5, 0.5),
    capture_batch: int = 64,
) -> dict[str, dict]:
    """Q-Diffusion's activation phase after :func:`init_shared_activations`: block by block (the units
    of AdaRound), each block of ``q_model`` with weights and activations quantized learns its layers'
    shared steps on the FP network's block inputs against its block outputs, over the records
    ``inputs``; with ``checkpoints`` every learned block is saved at once and a rerun resumes."""

    def learn(name, unit, fp_inputs, fp_outputs):
        return learn_unit_steps(name, unit, fp_inputs, fp_outputs, settings)

    return unit_by_unit(
        q_model,
        fp_model,
        inputs,
        learn,
        shared_steps,
        restore_shared_steps,
        "learn activation steps",
        checkpoints,
        budget,
        capture_batch,
        fp_inputs=True,
    )


class Calibrated(NamedTuple):
    """The PTS voter (None for a method without PTS) and the shared steps' learning report."""

    voter: PTSVoter | None
    learned: dict


@one_thread_on_cpu
def calibrate_row(
    cfg: Config,
    row: str,
    seed: int,
    model: Denoiser,
    quantizers: dict[str, nn.Module],
    calib: zarr.Group,
    *,
    fp_unet: nn.Module | None,
    pts_layers: list[str],
    device: torch.device,
    checkpoints: Callable[[], Checkpoints] | None = None,
) -> Calibrated:
    """Activation parameters of ``row`` (docs/method.md §5) in ``quantizers`` (the weight-quantized
    layers of ``model``, on ``device``, and the attention matmuls' inputs where the row quantizes them):
    per step with PTS voting on ``pts_layers`` for a method with PTS, or Q-Diffusion's steps shared by all
    steps, learned against ``fp_unet`` with ``checkpoints()`` (made only when the learning runs).

    On the CPU on one intra-op thread, as weight reconstruction: the bytes do not depend on the core
    count, and the pts stage runs its quantization seeds side by side in worker processes instead."""
    pts = cfg.pts
    method = METHODS[cfg.row_variant(row).method]
    voter = None
    if method.pts:
        voter = PTSVoter({n: quantizers[n] for n in pts_layers}, pts.num_candidates, pts.ratio_threshold)
    if method.shared_acts:
        learned = calibrate_shared_steps(
            cfg, model, quantizers, calib, seed=seed, device=device, fp_unet=fp_unet, checkpoints=checkpoints
        )
        return Calibrated(voter, learned)
    after_step = None if voter is None else (lambda s, inputs: voter(model, s, inputs, pts.batch_size))
    drawn = dict(records=pts.calib_records, batch_size=pts.batch_size, device=device, seed=seed)
    calibrate_activations(model, quantizers, calib, momentum=pts.momentum, after_step=after_step, **drawn)
    return Calibrated(voter, {})


def calibrate_shared_steps(
    cfg: Config,
    model: Denoiser,
    layers: dict[str, nn.Module],
    calib: zarr.Group,
    *,
    seed: int,
    device: torch.device,
    fp_unet: nn.Module,
    checkpoints: Callable[[], Checkpoints] | None,
) -> dict:
    """Q-Diffusion's shared steps: the initialisation, then (``shared_acts.learn``) the steps learned block
    by block against the FP model, each block checkpointed; returns the learning's per-block losses."""
    shared = cfg.shared_acts
    records, step = random_records(calib, shared.init_records, seed)  # a subset of the learning's draw
    records = tuple(to_device(v, device) for v in records)
    init_shared_activations(model, layers, records, to_device(step, device), shared.clip_grid, shared.clip_p)
    if not shared.learn:
        return {}
    settings = StepLearning(shared.iters, shared.lr, shared.batch_size, shared.p, seed, cfg.autocast)
    records, _ = random_records(calib, shared.records, seed)
    saved = checkpoints() if checkpoints else None
    start = time.perf_counter()
    units = learn_shared_steps(
        model,
        model.with_unet(fp_unet).to(device),  # the conditioning already loaded (a text encoder's prompt embeddings)
        tuple(to_device(v, device) for v in records),
        settings,
        saved,
        Budget.from_config(cfg.capture),
        cfg.capture.batch_size,
    )
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "mean_loss_before": sum(u["before"] for u in units.values()) / len(units),
        "mean_loss_after": sum(u["after"] for u in units.values()) / len(units),
        "units": units,
    }
