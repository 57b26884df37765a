"""Calibration dump: FP DDIM trajectories and the FP inputs/outputs of every quantizable layer.

Store layout (``calib.zarr``)::

    trajectory/x_t      (S*N, C, H, W) float32   record r = s*N + n: sample n at step s
    trajectory/t        (S*N,) int64             diffusion timestep
    trajectory/step     (S*N,) int32             step index s (0 = noisiest)
    trajectory/sample   (S*N,) int32
    layers/<module.path>/input   (S*M, ...) float16   record s*M + m: sample m < M at step s
    layers/<module.path>/output  (S*M, ...) float16
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import zarr
from tqdm import tqdm

from pipeline.diffusion import ddim_sample, sample_noise
from pipeline.io import ArtifactError, open_store, store_name


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
    unet: nn.Module,
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
) -> None:
    steps = len(scheduler.timesteps)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    root = zarr.open_group(str(store_path), mode="w")
    n_records = steps * num_samples
    x_t = root.create_array("trajectory/x_t", shape=(n_records, *shape), chunks=_chunks((n_records, *shape), chunk_records), dtype="float32")
    root.create_array("trajectory/t", data=np.repeat(scheduler.timesteps.numpy().astype(np.int64), num_samples))
    root.create_array("trajectory/step", data=np.repeat(np.arange(steps, dtype=np.int32), num_samples))
    root.create_array("trajectory/sample", data=np.tile(np.arange(num_samples, dtype=np.int32), steps))
    x0 = root.create_array("trajectory/x0", shape=(num_samples, *shape), dtype="float32")

    for start in tqdm(range(0, num_samples, batch_size), desc="dump trajectories"):
        indices = torch.arange(start, min(start + batch_size, num_samples))
        noise = sample_noise(seed, indices, steps, shape).to(device)

        def record(s, t, x):
            if not torch.isfinite(x).all():
                raise FloatingPointError(f"dump: the FP model's trajectory is not finite (NaN or Inf) at step {s}")
            x_t[s * num_samples + start : s * num_samples + start + len(indices)] = x.cpu().numpy()

        x0[start : start + len(indices)] = ddim_sample(unet, scheduler, noise, eta, record).cpu().numpy()

    dump_layer_io(root, unet, layers, scheduler.timesteps, num_samples, min(layer_records_per_step, num_samples), batch_size, chunk_records, device)
    root.attrs.update({**attrs, "steps": steps, "num_samples": num_samples, "layer_records_per_step": min(layer_records_per_step, num_samples)})


@torch.no_grad()
def dump_layer_io(root, unet, layers, timesteps, num_samples, per_step, batch_size, chunk_records, device) -> None:
    """Replay the first ``per_step`` samples of each step through the FP model with forward hooks."""
    steps = len(timesteps)
    x_t = root["trajectory/x_t"]
    arrays = {}
    for s in tqdm(range(steps), desc="dump layer I/O"):
        for start in range(0, per_step, batch_size):
            stop = min(start + batch_size, per_step)
            x = torch.from_numpy(x_t[s * num_samples + start : s * num_samples + stop]).to(device)
            with capture_io(layers) as captured:
                unet(x, timesteps[s].to(device))
            for name, (inp, out) in captured.items():
                if name not in arrays:
                    arrays[name] = {
                        kind: root.create_array(
                            f"layers/{name}/{kind}",
                            shape=(steps * per_step, *t.shape[1:]),
                            chunks=_chunks((steps * per_step, *t.shape[1:]), chunk_records),
                            dtype="float16",
                        )
                        for kind, t in (("input", inp), ("output", out))
                    }
                for kind, value in (("input", inp), ("output", out)):
                    arrays[name][kind][s * per_step + start : s * per_step + stop] = _float16(value, f"layer {name!r} {kind}", s)


def _float16(x: torch.Tensor, what: str, step: int) -> np.ndarray:
    """``x`` as stored (float16), refusing NaN / Inf and values beyond float16's range (±65504)."""
    half = x.half()
    if not torch.isfinite(half).all():
        reason = "overflows float16" if torch.isfinite(x).all() else "is not finite (NaN or Inf)"
        raise FloatingPointError(f"dump: {what} {reason} at step {step}")
    return half.cpu().numpy()


def open_calibration(path: str | Path) -> zarr.Group:
    """The calibration store, checked against its manifest (see :func:`pipeline.io.open_store`)."""
    root = open_store(path, "calibration store")
    if "trajectory/x_t" not in root:
        raise ArtifactError(f"calibration store {path} has no trajectory/x_t: not written by the dump stage")
    return root


def _finite_records(x: torch.Tensor, steps: torch.Tensor, source: str) -> torch.Tensor:
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1)
    if bad.any():
        raise ValueError(f"{source}: trajectory x_t is not finite (NaN or Inf) at step {int(steps[bad][0])}; rerun the dump stage")
    return x


def step_records(root: zarr.Group, step: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` trajectory inputs of step ``step`` and their timestep."""
    n = root.attrs["num_samples"]
    count = min(count, n)
    x = torch.from_numpy(root["trajectory/x_t"][step * n : step * n + count])
    t = int(root["trajectory/t"][step * n])
    return _finite_records(x, torch.full((count,), step), store_name(root)), torch.full((count,), t, dtype=torch.long)


def random_records(root: zarr.Group, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` trajectory records drawn without replacement from all steps: (x_t, t, step)."""
    total = root["trajectory/x_t"].shape[0]
    index = np.sort(torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: min(count, total)].numpy())
    x = torch.from_numpy(root["trajectory/x_t"].get_orthogonal_selection((index,)))
    t = torch.from_numpy(root["trajectory/t"][:][index])
    step = torch.from_numpy(root["trajectory/step"][:][index]).long()
    return _finite_records(x, step, store_name(root)), t, step
