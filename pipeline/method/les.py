"""Learned Equivalent Scaling (DESIGN.md §2 step 2): one γ ∈ R^{C_in}, γ > 0, per quantized layer.

γ = exp(θ), θ = 0 at the start, so γ stays positive without clamping. The loss compares the FP layer
output stored by the dump stage with ``Qw(W · diag(γ)) ⊛ Qa(x / γ) + b`` where both quantizers take
their range on the fly (per output channel and part for weights, per tensor and part for activations)
and round straight-through, so the gradient reaches γ through the rounding and through the ranges.

Layers are independent: :func:`learn_all` spreads them over torchrun ranks and, within a rank, over
worker processes. Each layer's batch order comes from a generator seeded by a stable hash of (seed,
layer name), so γ does not depend on the number of ranks or workers or the order in which layers
finish. On CUDA the iteration loop never waits for the GPU: batch indices are drawn up front, the
timestep weighting lives on the device, and the loss is checked for NaN / Inf every
``CHECK_EVERY`` iterations, not every one.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from pathlib import Path

import torch
import zarr
from tqdm import tqdm

from pipeline.infra.checkpoint import Checkpoints
from pipeline.infra.device import to_device
from pipeline.infra.distributed import SINGLE, World
from pipeline.method.weighting import TimestepWeighting, make_weighting
from pipeline.quant.layers import QuantLayer
from pipeline.quant.quantizers import affine_params, fake_quantize, part_extrema, weight_part_extrema

CHECK_EVERY = 100  # iterations between checks of the loss for NaN / Inf (each check waits for the device)


def layer_seed(seed: int, name: str) -> int:
    """Stable across processes and runs (Python's ``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def quantized_output(layer: QuantLayer, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``Qw(W · diag(γ)) ⊛ Qa(x / γ) + b`` with on-the-fly min-max ranges and straight-through rounding."""
    wq = layer.weight_quantizer
    parts, num_parts = wq.parts, wq.num_parts
    w = layer.scaled_weight(gamma)
    scale, zp = affine_params(*weight_part_extrema(w, parts, num_parts), wq.bits)
    view = (w.shape[0], w.shape[1], *[1] * (w.ndim - 2))
    w_hat = fake_quantize(w, scale[:, parts].view(view), zp[:, parts].view(view), wq.bits, ste=True)

    x = layer.scale_input(x, gamma)
    lo, hi = part_extrema(x, parts, num_parts, layer.channel_dim)
    scale, zp = affine_params(lo, hi, layer.act_quantizer.bits)
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
    """Unweighted mean loss over all records. Activation ranges are taken per chunk of one step's
    records, as the per-step activation quantizers will be, so the number does not depend on how
    steps would be mixed in a batch."""
    per_step = len(inputs) // steps
    total = torch.zeros((), dtype=torch.float64, device=inputs.device)
    for s in range(steps):
        for a in range(s * per_step, (s + 1) * per_step, batch_size):
            b = min(a + batch_size, (s + 1) * per_step)
            out = quantized_output(layer, inputs[a:b].float(), gamma)
            total += per_sample_loss(out, outputs[a:b].float(), layer.channel_dim).double().sum()
    return total.item() / len(inputs)


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
) -> tuple[torch.Tensor, float, float]:
    """Learn γ for one layer from its FP ``inputs`` / ``outputs`` (record r is at step r // (N / S)).

    Returns (γ, loss at γ = 1, loss at the learned γ), both losses over all records. The layer
    itself is not modified."""
    n = len(inputs)
    if n == 0 or n % steps:
        raise ValueError(f"LES on {name}: {n} records do not split into {steps} steps")
    per_step = n // steps
    device = inputs.device
    theta = torch.zeros(layer.gamma.shape, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iters, eta_min=0.0)
    generator = torch.Generator().manual_seed(layer_seed(seed, name))
    # the same draws as one randperm per iteration, copied to the device once
    batches = to_device(
        torch.stack([torch.randperm(n, generator=generator)[:batch_size] for _ in range(iters)]), device
    )
    losses = torch.empty(iters, device=device)
    for i in range(iters):
        idx = batches[i]
        step_idx = idx // per_step
        out = quantized_output(layer, inputs[idx].float(), theta.exp())
        loss = per_sample_loss(out, outputs[idx].float(), layer.channel_dim)
        weighting.update(step_idx, loss)
        total = (weighting.weights(step_idx) * loss).mean()
        losses[i] = total.detach()
        if (i + 1) % CHECK_EVERY == 0 or i + 1 == iters:
            _check_finite(losses[: i + 1], name)
        # autograd.grad, not backward: only θ needs a gradient; the layer's weights stay untouched
        (theta.grad,) = torch.autograd.grad(total, theta)
        optimizer.step()
        schedule.step()
    gamma = theta.detach().exp()
    if not torch.isfinite(gamma).all():
        raise FloatingPointError(f"LES on {name}: γ is not finite after {iters} iterations")
    before = layer_loss(layer, inputs, outputs, steps, torch.ones_like(gamma), batch_size)
    after = layer_loss(layer, inputs, outputs, steps, gamma, batch_size)
    return gamma, before, after


def _check_finite(losses: torch.Tensor, name: str) -> None:
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise FloatingPointError(f"LES on {name}: loss is {losses[i].item()} at iteration {i}")


def load_layer_io(calib_path: str | Path, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A layer's stored FP inputs and outputs (float16, as stored) and the number of steps."""
    root = zarr.open_group(str(calib_path), mode="r")
    try:
        inputs, outputs = (torch.from_numpy(root[f"layers/{name}/{kind}"][:]) for kind in ("input", "output"))
    except KeyError:
        raise ValueError(f"{calib_path} has no layer I/O for {name!r}; rerun the dump stage for this model") from None
    steps, per_step = root.attrs["steps"], root.attrs["layer_records_per_step"]
    if len(inputs) != steps * per_step or len(outputs) != len(inputs):
        raise ValueError(f"{calib_path}: layer {name!r} has {len(inputs)} records, expected {steps} x {per_step}")
    for kind, values in (("input", inputs), ("output", outputs)):
        bad = ~torch.isfinite(values.reshape(len(values), -1)).all(1)
        if bad.any():
            record = int(bad.nonzero()[0])
            raise ValueError(
                f"{calib_path}: layer {name!r} {kind} is not finite (NaN or Inf) at step {record // per_step} "
                f"(record {record}); rerun the dump stage"
            )
    return inputs, outputs, steps


def _learn_from_store(name, layer, calib_path, weighting, r, momentum, device, **kwargs):
    inputs, outputs, steps = load_layer_io(calib_path, name)
    w = make_weighting(weighting, steps, r, momentum)
    gamma, before, after = learn_gamma(
        layer.to(device), to_device(inputs, device), to_device(outputs, device), steps, w, name=name, **kwargs
    )
    return name, gamma.cpu(), before, after


def assign_layers(layers: dict[str, QuantLayer], calib_path: str | Path, ranks: int) -> dict[str, int]:
    """The rank that learns each layer: costliest layer first, each to the least loaded rank. A
    layer's cost is its multiply-adds over its stored records (a layer missing from the store costs 0;
    learning it fails with its own message)."""
    root = zarr.open_group(str(calib_path), mode="r")

    def cost(name: str, layer: QuantLayer) -> int:
        key = f"layers/{name}/input"
        weight = layer.module.weight
        return math.prod(root[key].shape) * weight.numel() // weight.shape[1] if key in root else 0

    costs = {name: cost(name, layer) for name, layer in layers.items()}
    load, owner = [0] * ranks, {}
    for name in sorted(costs, key=costs.get, reverse=True):
        rank = load.index(min(load))
        owner[name] = rank
        load[rank] += costs[name]
    return owner


def _start_worker(parent: int) -> None:
    """One intra-op thread; and exit when the stage process is gone (killed), instead of waiting
    forever on a queue nobody feeds."""
    torch.set_num_threads(1)

    def exit_when_orphaned():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, daemon=True).start()


def learn_all(
    layers: dict[str, QuantLayer],
    calib_path: str | Path,
    *,
    weighting: str,
    iters: int,
    lr: float,
    batch_size: int,
    r: float,
    momentum: float,
    seed: int,
    workers: int = 1,
    checkpoints: Checkpoints | None = None,
    device: torch.device = torch.device("cpu"),
    world: World = SINGLE,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[float, float]]]:
    """γ for every layer: ({name: γ}, {name: (loss at γ = 1, loss at γ)}), in the order of ``layers``.

    Every layer runs on one intra-op thread, inline (``workers`` = 1) or in ``workers`` processes:
    torch's CPU reductions split work by thread count, so a fixed count keeps γ bit-identical for any
    ``workers``. Use more workers, not more threads, to use more cores. With ``checkpoints`` each
    finished layer is saved at once and layers found there are not learned again: γ is the same
    whether a run resumed or not, because each layer's result depends on that layer alone.

    With several torchrun ranks (``world``) each rank learns the layers :func:`assign_layers` gives
    it and every rank returns all results. On CUDA a rank learns its layers one after another on its
    GPU (``workers`` applies to CPU: forked workers cannot share a CUDA context)."""
    job = partial(
        _learn_from_store,
        calib_path=str(calib_path),
        weighting=weighting,
        r=r,
        momentum=momentum,
        device=device,
        iters=iters,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
    )
    if device.type == "cuda":
        workers = 1
    results = {}
    if checkpoints:
        for name in layers:
            if (saved := checkpoints.load(name)) is not None:
                tensors, losses = saved
                results[name] = (tensors["gamma"], losses["before"], losses["after"])
    todo = {name: layer for name, layer in layers.items() if name not in results}
    if world.size > 1:
        owner = assign_layers(todo, calib_path, world.size)
        todo = {name: layer for name, layer in todo.items() if owner[name] == world.rank}
    with tqdm(
        total=len(results) + len(todo), initial=len(results), desc="LES", unit="layer", disable=not world.main
    ) as bar:

        def finished(name: str, gamma: torch.Tensor, before: float, after: float) -> None:
            results[name] = (gamma, before, after)
            if checkpoints:
                checkpoints.save(name, {"gamma": gamma}, {"before": before, "after": after})
            bar.update()

        if workers == 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for name, layer in todo.items():
                    finished(*job(name, layer))
            finally:
                torch.set_num_threads(threads)
        elif todo:
            # fork starts in milliseconds; it is safe because workers run torch single-threaded
            context = multiprocessing.get_context(
                "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            )
            with ProcessPoolExecutor(
                workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),)
            ) as pool:
                futures = [pool.submit(job, name, layer) for name, layer in todo.items()]
                try:
                    for future in as_completed(futures):
                        finished(*future.result())
                except BaseException:
                    pool.shutdown(cancel_futures=True)  # one failed layer fails the stage; skip the queue
                    raise
    results = world.merge(results)
    return {n: results[n][0] for n in layers}, {n: (results[n][1], results[n][2]) for n in layers}
