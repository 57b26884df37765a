"""AdaRound: learned up/down rounding of each weight, reconstructed block by block.

Each weight rounds to ``floor(w / s) + h(V)`` with ``h`` a rectified sigmoid; a regulariser with
annealed exponent β pushes ``h`` to 0 or 1, after which rounding is hard. Blocks (ResNet blocks,
attention / transformer blocks) are reconstructed in execution order with inputs from the already
quantized network and targets from the FP network; stray layers are reconstructed one by one.

On CUDA the iteration loop does not wait for the GPU: batch indices are drawn up front and the loss
is checked for NaN / Inf every ``CHECK_EVERY`` (:mod:`pipeline.infra.device`) iterations (fp16
autocast is the exception: its gradient scaler looks at the gradients on the host every iteration).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

from pipeline.calibration.capture import (
    GB,
    Budget,
    execution_order,
    gather,
    placement,
    unit_inputs,
    unit_outputs,
    windows,
)
from pipeline.infra.checkpoint import Checkpoints
from pipeline.infra.device import autocast, host, nonfinite_loss, to_device
from pipeline.quant.layers import QuantLayer

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid, from the AdaRound paper
BLOCK_TYPES = ("ResnetBlock2D", "Attention", "BasicTransformerBlock", "Transformer2DModel")


class RoundingOffsets(nn.Module):
    """Learned offsets ``h(V) ∈ [0, 1]`` added to ``floor(w / s)``; initialised to reproduce ``w / s``."""

    def __init__(self, weight_over_scale: torch.Tensor) -> None:
        super().__init__()
        rest = weight_over_scale - torch.floor(weight_over_scale)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.soft = False  # hard rounding unless inside soft_rounding()

    def soft_offset(self) -> torch.Tensor:
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def hard_offset(self) -> torch.Tensor:
        return (self.v >= 0).to(self.v.dtype)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.soft_offset() - 1).abs().pow(beta)).sum()


@contextmanager
def soft_rounding(offsets: list[RoundingOffsets]) -> Iterator[None]:
    """Soft (learnable) rounding for the duration of the block, hard again on the way out, exception or not."""
    try:
        for o in offsets:
            o.soft = True
        yield
    finally:
        for o in offsets:
            o.soft = False


@dataclass(frozen=True)
class AdaRoundSettings:
    iters: int
    lr: float
    batch_size: int
    reg_lambda: float
    beta_start: float
    beta_end: float
    warmup: float
    seed: int
    precision: str = "none"  # the autocast param of the training forward passes: none | bf16 | fp16


def beta_at(i: int, s: AdaRoundSettings) -> float | None:
    """None during warm-up (no regulariser), then β annealed linearly from start to end. Iteration ``i``
    (from 0) is the reference's t = i + 1 (it counts from 1), so the last iteration has β = end exactly."""
    t, start = i + 1, int(s.warmup * s.iters)
    if t < start:
        return None
    progress = (t - start) / max(1, s.iters - start)
    return s.beta_end + (s.beta_start - s.beta_end) * (1 - progress)


def attach_rounding(layer: QuantLayer) -> RoundingOffsets:
    wq = layer.weight_quantizer
    scale, _ = wq.channel_params(layer.module.weight.ndim)
    wq.rounding = RoundingOffsets((layer.scaled_weight() / scale).detach())
    return wq.rounding


def reconstruction_units(model: nn.Module, run_once) -> list[tuple[str, nn.Module]]:
    """Blocks and stray quantized layers, in the order a forward pass first reaches them."""
    units, claimed = {}, set()
    for name, module in model.named_modules():
        if any(name.startswith(c + ".") for c in claimed):
            continue
        is_block = type(module).__name__ in BLOCK_TYPES and any(isinstance(m, QuantLayer) for m in module.modules())
        if is_block or isinstance(module, QuantLayer):
            units[name] = module
            claimed.add(name)
    return [(name, units[name]) for name in execution_order(units, run_once)]


def main_output(output):
    """A block's hidden states: diffusers' Transformer2DModel returns them in a tuple."""
    return output[0] if isinstance(output, tuple) else output


class UnitRecords:
    """A unit's captured inputs and FP targets, and the per-sample error of the unit's output against
    them: ``|out - target|^p`` summed over channels, averaged over positions (Q-Diffusion's lp_loss)."""

    def __init__(self, unit: nn.Module, inputs, fp_outputs, precision: str = "none", p: float = 2.0) -> None:
        self.unit, self.inputs, self.fp_outputs, self.precision, self.p = unit, inputs, fp_outputs, precision, p
        self.device = next(unit.parameters()).device
        self.count = len(main_output(fp_outputs))

    def per_sample_loss(self, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        args, kwargs = gather(self.inputs, index, self.device)
        with autocast(self.device, self.precision):
            out = main_output(self.unit(*args, **kwargs))
        target = main_output(gather(self.fp_outputs, index, self.device))
        error = (out.float() - target).abs().pow(self.p)
        return error.sum(1 if out.dim() == 4 else -1).flatten(1).mean(1)

    @torch.no_grad()
    def mean_loss(self, batch_size: int) -> float:
        total = sum(
            self.per_sample_loss((idx, to_device(idx, self.device))).sum().double()
            for idx in torch.arange(self.count).split(batch_size)
        )
        return float(host(total)) / self.count


def fit_unit(
    what: str,
    name: str,
    records: UnitRecords,
    optimizer,
    iters: int,
    batch_size: int,
    seed: int,
    loss_at,
    schedule=None,
) -> None:
    """``iters`` steps of ``optimizer`` on ``loss_at(i, index)``, a batch of ``batch_size`` records
    drawn per iteration from a generator seeded with ``seed``; the loss is checked for NaN / Inf every
    ``CHECK_EVERY`` iterations; a learning-rate ``schedule`` steps with the optimizer."""
    generator = torch.Generator().manual_seed(seed)
    # the same draws as one randint per iteration, on the host for captures kept there
    n = records.count
    batches = torch.stack([torch.randint(0, n, (min(batch_size, n),), generator=generator) for _ in range(iters)])
    batches_on_device = to_device(batches, records.device)  # copied once: the loop does not wait for the device
    scaler = torch.amp.GradScaler(records.device.type, enabled=records.precision == "fp16")
    losses = torch.empty(iters, device=records.device)
    for i in range(iters):
        loss = loss_at(i, (batches[i], batches_on_device[i]))
        losses[i] = loss.detach()
        if (bad := nonfinite_loss(losses, i)) is not None:
            raise FloatingPointError(f"{what} loss is {bad[1]} in {name} at iteration {bad[0]}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if schedule is not None:
            schedule.step()


def reconstruct_unit(
    name: str, unit: nn.Module, q_inputs, fp_outputs, settings: AdaRoundSettings, weighting=None, steps=None
) -> dict:
    """Learn the rounding of every QuantLayer inside ``unit``; return the (unweighted) loss before
    and after. With a ``weighting`` (and the records' step indices) the training loss is timestep
    weighted as in LES; the reference reconstructs unweighted."""
    layers = [m for m in unit.modules() if isinstance(m, QuantLayer)]
    offsets = [attach_rounding(layer) for layer in layers]
    optimizer = torch.optim.Adam([o.v for o in offsets], lr=settings.lr)
    records = UnitRecords(unit, q_inputs, fp_outputs, settings.precision)

    def loss_at(i: int, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        per_sample = records.per_sample_loss(index)
        if weighting is not None:
            weighting.update(steps[index[1]], per_sample.detach())
            per_sample = per_sample * weighting.weights(steps[index[1]])
        loss = per_sample.mean()
        beta = beta_at(i, settings)
        if beta is not None:
            loss = loss + settings.reg_lambda * sum(o.regularizer(beta) for o in offsets)
        return loss

    before = records.mean_loss(settings.batch_size)
    with soft_rounding(offsets):
        fit_unit("AdaRound", name, records, optimizer, settings.iters, settings.batch_size, settings.seed, loss_at)
    for o in offsets:
        o.v.requires_grad_(False)
        o.v.grad = None  # the last iteration's gradient: as large as the weights, and never read again
    return {"before": before, "after": records.mean_loss(settings.batch_size)}


def rounding_state(unit: nn.Module) -> dict[str, torch.Tensor]:
    """The learned rounding variables of a reconstructed unit, by layer path inside the unit."""
    return {name: m.weight_quantizer.rounding.v for name, m in unit.named_modules() if isinstance(m, QuantLayer)}


@torch.no_grad()
def restore_rounding(unit: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put back a unit's learned rounding exactly as :func:`reconstruct_unit` left it (hard rounding)."""
    for name, layer in unit.named_modules():
        if isinstance(layer, QuantLayer):
            offsets = attach_rounding(layer)
            offsets.v.copy_(state[name])
            offsets.v.requires_grad_(False)


def adaround(
    q_model: nn.Module,
    fp_model: nn.Module,
    inputs,
    settings: AdaRoundSettings,
    make_weighting=None,
    steps=None,
    checkpoints: Checkpoints | None = None,
    budget: Budget = Budget.of(0.5, 0.5),
    capture_batch: int = 64,
) -> dict[str, dict]:
    """Reconstruct all units of ``q_model`` (weights quantized, activations FP) against ``fp_model`` on
    ``inputs`` = (x, t) or (x, t, cond), each unit on its inputs from the already quantized network
    (see :func:`unit_by_unit`). ``make_weighting()`` gives each unit a fresh timestep weighting over
    the records' ``steps``. Each unit draws its batches from its own generator, so a resumed run ends
    bit-identical to an uninterrupted one."""

    def learn(name, unit, q_inputs, fp_outputs):
        weighting = make_weighting() if make_weighting is not None else None
        return reconstruct_unit(name, unit, q_inputs, fp_outputs, settings, weighting, steps)

    return unit_by_unit(
        q_model,
        fp_model,
        inputs,
        learn,
        rounding_state,
        restore_rounding,
        "adaround",
        checkpoints,
        budget,
        capture_batch,
    )


def unit_by_unit(
    q_model: nn.Module,
    fp_model: nn.Module,
    inputs,
    learn,
    state,
    restore,
    desc: str,
    checkpoints: Checkpoints | None = None,
    budget: Budget = Budget.of(0.5, 0.5),
    capture_batch: int = 64,
    fp_inputs: bool = False,
) -> dict[str, dict]:
    """``learn(name, unit, unit_inputs, fp_outputs) -> report`` for every unit of ``q_model`` in
    execution order, against the FP targets of ``fp_model`` on ``inputs`` = (x, t) or (x, t, cond)
    (models: bare UNets or :class:`~pipeline.models.denoiser.Denoiser`). A unit's inputs come from
    ``q_model`` with the units before it learned (AdaRound), or with ``fp_inputs`` from ``fp_model``
    (Q-Diffusion's activation phase).

    With ``checkpoints`` every learned unit's ``state(unit)`` is saved at once, and units found there
    get ``restore(unit, saved)`` instead of learning: a unit's inputs may come from the units before
    it, so those are restored exactly.

    Captures are placed by ``budget``, half of it for the unit's inputs and half for the FP targets of
    a window of consecutive units, captured in one forward pass a batch (one unit at least): on the
    device first, then in host memory, then in scratch files, so no unit needs its records on the
    device at once; training batches are gathered from wherever they lie. Captures run
    ``capture_batch`` records a forward pass."""
    device = inputs[0].device
    half = budget.halved()
    units = reconstruction_units(q_model, lambda: q_model(*(v[:1] for v in inputs)))
    fp_modules = dict(fp_model.named_modules())
    fp_units = {name: fp_modules[name] for name, _ in units}
    sizes = _target_bytes(fp_model, fp_units, inputs)
    names = [name for name, _ in units]
    targets: dict = {}
    report = {}
    with ExitStack() as window:
        for index, (name, unit) in enumerate(tqdm(units, desc=desc)):
            if checkpoints and (saved := checkpoints.load(name)) is not None:
                restore(unit, saved[0])
                report[name] = saved[1]
                continue
            if name not in targets:  # the FP targets of this unit and of as many next ones as fit
                targets = {}
                window.close()  # the previous window's captures and scratch files
                later = {n: fp_units[n] for n in windows(names[index:], sizes, half.window_bytes)[0]}
                allocate = window.enter_context(placement(half, device))
                targets = unit_outputs(fp_model, later, inputs, capture_batch, allocate)
            with placement(half, device) as allocate:
                source, reached = (fp_model, fp_units[name]) if fp_inputs else (q_model, unit)
                unit_in = unit_inputs(source, reached, inputs, capture_batch, allocate)
                report[name] = learn(name, unit, unit_in, targets.pop(name))
            if checkpoints:
                checkpoints.save(name, state(unit), report[name])
    return report


def _target_bytes(fp_model: nn.Module, fp_units: dict[str, nn.Module], inputs) -> dict[str, int]:
    """Bytes of each unit's FP output over all records, from a pass over one record (kept where it is made:
    only its shapes are read)."""
    with placement(Budget(GB, 0), inputs[0].device) as allocate:
        one = unit_outputs(fp_model, fp_units, tuple(v[:1] for v in inputs), 1, allocate)
    tensors = {name: [v for v in tree_leaves(out) if isinstance(v, torch.Tensor)] for name, out in one.items()}
    return {name: len(inputs[0]) * sum(v.numel() * v.element_size() for v in found) for name, found in tensors.items()}
