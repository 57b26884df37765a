"""Calibration dump: FP DDIM trajectories and the FP inputs/outputs of every quantizable layer.

Store layout (``calib.zarr``)::

    trajectory/x_t      (S*N, C, H, W) float32   record r = s*N + n: sample n at step s
    trajectory/t        (S*N,) int64             diffusion timestep
    trajectory/step     (S*N,) int32             step index s (0 = noisiest)
    trajectory/sample   (S*N,) int32
    trajectory/cond     (N,) int64               condition key of each sample (conditional models only)
    layers/<module.path>/input   (K*M, ...) float16   record i*M + m: the m-th record of the i-th stored step
    layers/<module.path>/output  (K*M, ...) float16

Layer I/O is a sample for people to inspect (``cli.py inspect``), bounded by ``calib.layer_io_gb``:
M = ``calib.layer_records_per_step`` records of every step (attribute ``layer_steps`` lists the
stored steps), fewer records per step when those do not fit, and when not even one record of every
step fits, one record at each of K evenly spaced steps. Nothing downstream reads it: the stats stage
and LES capture what they need from the trajectories (:mod:`pipeline.calibration.capture`).

Records are model inputs: ``(x_t, t)``, or ``(x_t, t, cond)`` for a conditional model (see
:mod:`pipeline.models.denoiser`). A store dumped with classifier-free guidance (attribute ``guided``)
follows every conditional record with its unconditional twin (same x_t, key NULL): the UNet sees both
inputs at every sampling step, so both are calibrated. Record counts (``count`` arguments, M) then
count records, two per sample.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import zarr
from tqdm import tqdm

from pipeline.calibration.capture import GB, Budget, capture_io, io_numel
from pipeline.config import Config
from pipeline.infra.device import to_device
from pipeline.infra.distributed import SINGLE, World, my_batches, plan_batches
from pipeline.infra.storage import ArtifactError, create_array, open_store, store_name
from pipeline.models.denoiser import NULL, Denoiser, as_denoiser, load_denoiser
from pipeline.models.diffusion import ddim_sample, ddim_scheduler, sample_noise
from pipeline.quant.model import quantizable_layers


def _chunks(shape: tuple[int, ...], chunk_records: int) -> tuple[int, ...]:
    return (min(chunk_records, shape[0]), *shape[1:])


def dump_calibration(
    store_path: Path,
    model: nn.Module,
    scheduler,
    layers: dict[str, nn.Module],
    num_samples: int,
    layer_records_per_step: int,
    layer_io_gb: float,
    batch_size: int,
    eta: float,
    seed: int,
    chunk_records: int,
    attrs: dict,
    device: torch.device,
    guidance_scale: float = 1.0,
    world: World = SINGLE,
    capture_bytes: int | None = None,
) -> None:
    """Write the calibration store at ``store_path``. ``model``: a
    :class:`~pipeline.models.denoiser.Denoiser` or a bare unconditional UNet. Sample n gets the condition
    ``model.condition_keys(n)``; with guidance both its inputs are recorded. For a text-to-image model
    ``attrs`` must carry the ``prompts`` (see :func:`record_denoiser`).

    With several ranks every rank makes this call on the same temporary store
    (:func:`pipeline.infra.distributed.shared_store`): rank 0 creates the arrays, each rank fills whole
    chunks of them, and the store equals a one-process one byte for byte. Trajectory records
    ``s*N + n`` of one chunk belong to one step only when ``chunk_records`` divides N; otherwise the
    trajectories are one unit of work (rank 0 runs them all).

    A layer-I/O pass holds every layer's float32 input and output of its batch at once (1.8 GB a
    record for SD v1.4): with ``capture_bytes`` its batches are cut to fit them (one record at least)."""
    denoiser = as_denoiser(model)
    steps = len(scheduler.timesteps)
    shape = denoiser.sample_shape
    guided = denoiser.conditional and guidance_scale != 1
    keys = denoiser.condition_keys(torch.arange(num_samples))
    n_records = steps * num_samples
    # the stored layer I/O, decided (or refused) before any work: float16 inputs and outputs of one record
    probe = (torch.zeros(1, *shape), scheduler.timesteps[:1], *(() if keys is None else (keys[:1],)))
    numel = io_numel(denoiser, layers, tuple(to_device(v, device) for v in probe))
    per_step = min(layer_records_per_step, 2 * num_samples if guided else num_samples)
    io_elements = sum(map(sum, numel.values()))  # of one record's layer inputs and outputs
    stored = layer_io_sample(steps, per_step, 2 * io_elements, layer_io_gb)
    sample_chunk = chunk_records if num_samples % chunk_records == 0 else num_samples
    if world.main:
        root = zarr.open_group(str(store_path), mode="w")
        create_array(
            root,
            "trajectory/x_t",
            shape=(n_records, *shape),
            chunks=_chunks((n_records, *shape), chunk_records),
            dtype="float32",
        )
        create_array(root, "trajectory/t", data=np.repeat(scheduler.timesteps.numpy().astype(np.int64), num_samples))
        create_array(root, "trajectory/step", data=np.repeat(np.arange(steps, dtype=np.int32), num_samples))
        create_array(root, "trajectory/sample", data=np.tile(np.arange(num_samples, dtype=np.int32), steps))
        create_array(root, "trajectory/x0", shape=(num_samples, *shape), chunks=(sample_chunk, *shape), dtype="float32")
        if keys is not None:
            create_array(root, "trajectory/cond", data=keys.numpy())
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
    layer_batch = batch_size if capture_bytes is None else max(1, min(batch_size, capture_bytes // (4 * io_elements)))
    dump_layer_io(root, denoiser, layers, stored, num_samples, layer_batch, chunk_records, device, world)
    world.barrier()
    if world.main:
        root.attrs.update(
            {
                **attrs,
                "steps": steps,
                "num_samples": num_samples,
                "layer_steps": stored.steps,
                "layer_records_per_step": stored.per_step,
                "guidance_scale": guidance_scale,
            }
        )


def dump_model(
    store_path: str | Path,
    folder: str | Path,
    unet: nn.Module,
    train_scheduler,
    cfg: Config,
    prompts: list[str] | None,
    *,
    device: torch.device,
    attrs: dict,
    world: World = SINGLE,
) -> None:
    """The calibration store of the FP model in ``folder`` (``unet`` and its training scheduler loaded
    from it) as params' ``calib``, ``diffusion.steps`` and ``capture`` say, with ``prompts`` for a
    text-to-image model: what the dump stage writes and :func:`pipeline.api.quantize` samples.
    With several ranks, every rank calls it on the same temporary store (see :func:`dump_calibration`)."""
    calib = cfg.calib
    denoiser = load_denoiser(folder, unet, prompts).to(device)
    dump_calibration(
        store_path,
        denoiser,
        ddim_scheduler(train_scheduler, cfg.diffusion.steps),
        quantizable_layers(unet),
        guidance_scale=calib.guidance_scale,
        num_samples=calib.num_samples,
        layer_records_per_step=calib.layer_records_per_step,
        layer_io_gb=calib.layer_io_gb,
        batch_size=calib.batch_size,
        eta=calib.eta,
        seed=calib.seed,
        chunk_records=calib.chunk_records,
        device=device,
        attrs={**attrs, "prompts": prompts},
        world=world,
        capture_bytes=Budget.from_config(cfg.capture).device_bytes,
    )


class LayerSample(NamedTuple):
    steps: list[int]  # the steps whose layer I/O is stored
    per_step: int  # records of each


def layer_io_sample(steps: int, per_step: int, record_bytes: int, budget_gb: float) -> LayerSample:
    """The layer I/O the dump stores within ``budget_gb``: ``per_step`` records of every step, as
    many as fit of every step, or one record of as many evenly spaced steps as fit."""
    fit = int(budget_gb * GB // record_bytes)
    if fit == 0:
        raise ValueError(
            f"calib.layer_io_gb: {budget_gb} GiB cannot hold one record of layer I/O "
            f"({record_bytes / GB:.3g} GiB in float16); raise it"
        )
    if fit >= steps:
        return LayerSample(list(range(steps)), min(per_step, fit // steps))
    return LayerSample(sorted({round(i * (steps - 1) / max(1, fit - 1)) for i in range(fit)}), 1)


def record_denoiser(folder: str | Path, unet: nn.Module, root: zarr.Group) -> Denoiser:
    """``unet`` with the conditioning the store's records were dumped with (its ``prompts``
    attribute, for a text-to-image model), so that the records' condition keys mean the same."""
    return load_denoiser(folder, unet, root.attrs.get("prompts"))


def records_per_step(root: zarr.Group, num_samples: int | None = None) -> int:
    """Records of each step: one per trajectory, two in a guided store."""
    n = root.attrs["num_samples"] if num_samples is None else num_samples
    return 2 * n if root.attrs.get("guided", False) else n


@torch.no_grad()
def dump_layer_io(
    root, model, layers, stored: LayerSample, num_samples, batch_size, chunk_records, device, world: World = SINGLE
) -> None:
    """Replay the first records of the stored steps through the FP model with forward hooks. Layer
    records ``i*M + m`` go in batches that never straddle a step or a chunk; each rank replays the
    batches of its chunks. Rank 0 creates the arrays from the shapes of one probe pass."""
    per_step = stored.per_step
    n = len(stored.steps) * per_step
    if world.main:
        with capture_io(layers) as captured:
            model(*(to_device(v, device) for v in _records(root, 0, num_samples, 1)))
        for name, (inp, out) in captured.items():
            for kind, value in (("input", inp), ("output", out)):
                shape = (n, *value.shape[1:])
                create_array(
                    root, f"layers/{name}/{kind}", shape=shape, chunks=_chunks(shape, chunk_records), dtype="float16"
                )
    names = world.broadcast(list(captured) if world.main else None)
    world.barrier()
    arrays = {name: {kind: root[f"layers/{name}/{kind}"] for kind in ("input", "output")} for name in names}
    batches = my_batches(plan_batches(n, batch_size, min(chunk_records, n), period=per_step), world)
    for a, b in tqdm(batches, desc="dump layer I/O", disable=not world.main):
        i, m = divmod(a, per_step)
        s = stored.steps[i]
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


def records_by_step(root: zarr.Group, per_step: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``per_step`` records of every step drawn by ``seed`` (:func:`step_records`), step after step:
    record r is at step r // ``per_step``."""
    steps = [step_records(root, s, per_step, seed) for s in range(root.attrs["steps"])]
    return tuple(torch.cat(parts) for parts in zip(*steps))


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
