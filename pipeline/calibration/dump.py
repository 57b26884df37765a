"""Calibration dump: FP DDIM trajectories and the FP inputs/outputs of every quantizable layer.

Store layout (``calib.zarr``)::

    trajectory/x_t      (S*N, C, H, W) float32   record r = s*N + n: sample n at step s
    trajectory/t        (S*N,) int64             diffusion timestep
    trajectory/step     (S*N,) int32             step index s (0 = noisiest)
    trajectory/sample   (S*N,) int32
    trajectory/cond     (N,) int64               condition key of each sample (conditional models only)
    layers/<module.path>/input   (S*M, ...) float16   record s*M + m: the m-th record of step s
    layers/<module.path>/output  (S*M, ...) float16

Records are model inputs: ``(x_t, t)``, or ``(x_t, t, cond)`` for a conditional model (see
:mod:`pipeline.models.denoiser`). A store dumped with classifier-free guidance (attribute ``guided``)
follows every conditional record with its unconditional twin (same x_t, key NULL): the UNet sees both
inputs at every sampling step, so both are calibrated. Record counts (``count`` arguments, M) then
count records, two per sample.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import zarr
from tqdm import tqdm

from pipeline.infra.device import to_device
from pipeline.infra.distributed import SINGLE, World, my_batches, plan_batches
from pipeline.infra.storage import ArtifactError, open_store, store_name
from pipeline.models.denoiser import NULL, Denoiser, as_denoiser, load_denoiser
from pipeline.models.diffusion import ddim_sample, sample_noise


@contextmanager
def capture_io(layers: dict[str, nn.Module]):
    """Record ``(input, output)`` of each named layer on every forward call inside the block."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def record(module, args, output):
            captured[name] = (args[0].detach(), output.detach())

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _chunks(shape: tuple[int, ...], chunk_records: int) -> tuple[int, ...]:
    return (min(chunk_records, shape[0]), *shape[1:])


def dump_calibration(
    store_path: Path,
    model: nn.Module,
    scheduler,
    layers: dict[str, nn.Module],
    num_samples: int,
    layer_records_per_step: int,
    batch_size: int,
    eta: float,
    seed: int,
    chunk_records: int,
    attrs: dict,
    device: torch.device,
    guidance_scale: float = 1.0,
    world: World = SINGLE,
) -> None:
    """Write the calibration store at ``store_path``. ``model``: a
    :class:`~pipeline.models.denoiser.Denoiser` or a bare unconditional UNet. Sample n gets the condition
    ``model.condition_keys(n)``; with guidance both its inputs are recorded. For a text-to-image model
    ``attrs`` must carry the ``prompts`` (see :func:`record_denoiser`).

    With several ranks every rank makes this call on the same temporary store
    (:func:`pipeline.infra.distributed.shared_store`): rank 0 creates the arrays, each rank fills whole
    chunks of them, and the store equals a one-process one byte for byte. Trajectory records
    ``s*N + n`` of one chunk belong to one step only when ``chunk_records`` divides N; otherwise the
    trajectories are one unit of work (rank 0 runs them all)."""
    denoiser = as_denoiser(model)
    steps = len(scheduler.timesteps)
    shape = denoiser.sample_shape
    guided = denoiser.conditional and guidance_scale != 1
    keys = denoiser.condition_keys(torch.arange(num_samples))
    n_records = steps * num_samples
    sample_chunk = chunk_records if num_samples % chunk_records == 0 else num_samples
    if world.main:
        root = zarr.open_group(str(store_path), mode="w")
        root.create_array(
            "trajectory/x_t",
            shape=(n_records, *shape),
            chunks=_chunks((n_records, *shape), chunk_records),
            dtype="float32",
        )
        root.create_array("trajectory/t", data=np.repeat(scheduler.timesteps.numpy().astype(np.int64), num_samples))
        root.create_array("trajectory/step", data=np.repeat(np.arange(steps, dtype=np.int32), num_samples))
        root.create_array("trajectory/sample", data=np.tile(np.arange(num_samples, dtype=np.int32), steps))
        root.create_array("trajectory/x0", shape=(num_samples, *shape), chunks=(sample_chunk, *shape), dtype="float32")
        if keys is not None:
            root.create_array("trajectory/cond", data=keys.numpy())
        root.attrs["guided"] = guided
        if world.size > 1 and sample_chunk == num_samples:
            print(
                f"dump: calib.chunk_records ({chunk_records}) does not divide calib.num_samples ({num_samples}), "
                "so rank 0 runs every trajectory",
                file=sys.stderr,
            )
    world.barrier()
    root = zarr.open_group(str(store_path), mode="r+")
    x_t, x0 = root["trajectory/x_t"], root["trajectory/x0"]
    batches = my_batches(plan_batches(num_samples, batch_size, sample_chunk), world)
    for start, stop in tqdm(batches, desc="dump trajectories", disable=not world.main):
        indices = torch.arange(start, stop)
        noise = to_device(sample_noise(seed, indices, steps, shape), device)
        cond = None if keys is None else to_device(keys[indices], device)

        def record(s, t, x):
            if not torch.isfinite(x).all():
                raise FloatingPointError(f"dump: the FP model's trajectory is not finite (NaN or Inf) at step {s}")
            x_t[s * num_samples + start : s * num_samples + stop] = x.cpu().numpy()

        x0[start:stop] = ddim_sample(denoiser, scheduler, noise, eta, record, cond, guidance_scale).cpu().numpy()
    world.barrier()  # layer I/O replays trajectory records that other ranks wrote
    per_step = min(layer_records_per_step, records_per_step(root, num_samples))
    dump_layer_io(root, denoiser, layers, steps, num_samples, per_step, batch_size, chunk_records, device, world)
    world.barrier()
    if world.main:
        root.attrs.update(
            {
                **attrs,
                "steps": steps,
                "num_samples": num_samples,
                "layer_records_per_step": per_step,
                "guidance_scale": guidance_scale,
            }
        )


def record_denoiser(folder: str | Path, unet: nn.Module, root: zarr.Group) -> Denoiser:
    """``unet`` with the conditioning the store's records were dumped with (its ``prompts``
    attribute, for a text-to-image model), so that the records' condition keys mean the same."""
    return load_denoiser(folder, unet, root.attrs.get("prompts"))


def records_per_step(root: zarr.Group, num_samples: int) -> int:
    return 2 * num_samples if root.attrs.get("guided", False) else num_samples


@torch.no_grad()
def dump_layer_io(
    root, model, layers, steps, num_samples, per_step, batch_size, chunk_records, device, world: World = SINGLE
) -> None:
    """Replay the first ``per_step`` records of each step through the FP model with forward hooks.
    Layer records ``s*per_step + m`` go in batches that never straddle a step or a chunk; each rank
    replays the batches of its chunks. Rank 0 creates the arrays from the shapes of one probe pass."""
    n = steps * per_step
    if world.main:
        with capture_io(layers) as captured:
            model(*(to_device(v, device) for v in _records(root, 0, num_samples, 1)))
        for name, (inp, out) in captured.items():
            for kind, value in (("input", inp), ("output", out)):
                shape = (n, *value.shape[1:])
                root.create_array(
                    f"layers/{name}/{kind}", shape=shape, chunks=_chunks(shape, chunk_records), dtype="float16"
                )
    names = world.broadcast(list(captured) if world.main else None)
    world.barrier()
    arrays = {name: {kind: root[f"layers/{name}/{kind}"] for kind in ("input", "output")} for name in names}
    batches = my_batches(plan_batches(n, batch_size, min(chunk_records, n), period=per_step), world)
    for a, b in tqdm(batches, desc="dump layer I/O", disable=not world.main):
        s, m = divmod(a, per_step)
        inputs = _records(root, s, num_samples, m + b - a)
        with capture_io(layers) as captured:
            model(*(to_device(v[m:], device) for v in inputs))
        for name, (inp, out) in captured.items():
            for kind, value in (("input", inp), ("output", out)):
                arrays[name][kind][a:b] = _float16(value, f"layer {name!r} {kind}", s)


def _float16(x: torch.Tensor, what: str, step: int) -> np.ndarray:
    """``x`` as stored (float16), refusing NaN / Inf and values beyond float16's range (±65504)."""
    half = x.half()
    if not torch.isfinite(half).all():
        reason = "overflows float16" if torch.isfinite(x).all() else "is not finite (NaN or Inf)"
        raise FloatingPointError(f"dump: {what} {reason} at step {step}")
    return half.cpu().numpy()


def open_calibration(path: str | Path) -> zarr.Group:
    """The calibration store, checked against its manifest (see :func:`pipeline.infra.storage.open_store`)."""
    root = open_store(path, "calibration store")
    if "trajectory/x_t" not in root:
        raise ArtifactError(f"calibration store {path} has no trajectory/x_t: not written by the dump stage")
    return root


def _finite_records(x: torch.Tensor, steps: torch.Tensor, source: str) -> torch.Tensor:
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1)
    if bad.any():
        raise ValueError(
            f"{source}: trajectory x_t is not finite (NaN or Inf) at step {int(steps[bad][0])}; rerun the dump stage"
        )
    return x


def _with_condition(
    root: zarr.Group, x: torch.Tensor, t: torch.Tensor, samples: np.ndarray
) -> tuple[torch.Tensor, ...]:
    """Model inputs of trajectory records: ``(x, t)``, or ``(x, t, cond)`` for a conditional store,
    with every record followed by its unconditional twin when the store is guided."""
    if "trajectory/cond" not in root:
        return x, t
    cond = torch.from_numpy(root["trajectory/cond"][:][samples])
    if not root.attrs.get("guided", False):
        return x, t, cond
    twins = torch.stack([cond, torch.full_like(cond, NULL)], 1).flatten()
    return x.repeat_interleave(2, 0), t.repeat_interleave(2, 0), twins


def _records(
    root: zarr.Group, step: int, n: int, count: int, order: np.ndarray | None = None
) -> tuple[torch.Tensor, ...]:
    """``count`` records of step ``step`` (of ``n`` trajectories): its first ones, or those of the
    trajectories in ``order``."""
    per_record = 2 if root.attrs.get("guided", False) else 1
    samples = (np.arange(n) if order is None else order)[: min(-(-count // per_record), n)]
    x = torch.from_numpy(root["trajectory/x_t"].get_orthogonal_selection((step * n + samples,)))
    t = torch.full((len(samples),), int(root["trajectory/t"][step * n]), dtype=torch.long)
    return tuple(v[:count] for v in _with_condition(root, x, t, samples))


def step_records(root: zarr.Group, step: int, count: int, seed: int | None = None) -> tuple[torch.Tensor, ...]:
    """``count`` records of step ``step``: (x_t, t) or (x_t, t, cond); the first ones, or with ``seed``
    a draw in random order (the order matters to the running ranges of activation calibration)."""
    n = root.attrs["num_samples"]
    order = None
    if seed is not None:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + step)).numpy()
    inputs = _records(root, step, n, count, order)
    _finite_records(inputs[0], torch.full((len(inputs[0]),), step), store_name(root))
    return inputs


def random_records(root: zarr.Group, count: int, seed: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``count`` trajectory rows drawn without replacement from all steps, as model inputs (x_t, t)
    or (x_t, t, cond) (two records per row in a guided store), and the step index of each record."""
    total = root["trajectory/x_t"].shape[0]
    index = np.sort(torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: min(count, total)].numpy())
    x = torch.from_numpy(root["trajectory/x_t"].get_orthogonal_selection((index,)))
    t = torch.from_numpy(root["trajectory/t"][:][index])
    step = torch.from_numpy(root["trajectory/step"][:][index]).long()
    _finite_records(x, step, store_name(root))
    inputs = _with_condition(root, x, t, root["trajectory/sample"][:][index] if "trajectory/cond" in root else index)
    return inputs, step.repeat_interleave(len(inputs[0]) // len(step), 0)
