"""Dump, sample and LES on a tiny UNet into the folder ``sys.argv[1]``; tests/test_distributed.py runs
it as one process and under ``torchrun`` with 2 gloo ranks (NCCL where ``DMQ_DIST_DEVICE=cuda``) and
compares the results."""

import copy
import os
import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from pipeline.calibration.capture import Budget
from pipeline.calibration.dump import dump_calibration, open_calibration, records_by_step
from pipeline.eval.sampling import write_samples
from pipeline.infra.checkpoint import Checkpoints
from pipeline.infra.distributed import init, shared_store
from pipeline.infra.storage import write_tensors
from pipeline.method.les import LESSettings, learn_all
from pipeline.models.diffusion import ddim_scheduler
from pipeline.models.embedded import build_unet
from pipeline.quant import QuantSpec, quantizable_layers, quantize

# chunks of 2 records and batches of 3 cut each other, so ranks get uneven, step-straddling shares
DUMP = dict(num_samples=8, layer_records_per_step=4, layer_io_gb=1.0, batch_size=3, eta=0.5, seed=11, chunk_records=2)
SAMPLE = dict(num_samples=10, batch_size=4)
LES_LAYERS = (
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.1.resnets.0.conv_shortcut",
    "mid_block.attentions.0.to_q",
    "up_blocks.0.resnets.0.conv1",
)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    world, device = init(os.environ.get("DMQ_DIST_DEVICE", "cpu"))  # cuda: NCCL, one GPU per rank
    torch.manual_seed(0)
    unet = build_unet(16, (16, 32, 32), layers_per_block=1, norm_num_groups=8).eval().to(device)
    scheduler = ddim_scheduler(DDPMScheduler(num_train_timesteps=1000), steps=3)
    with shared_store(out / "calib.zarr", world) as tmp:
        dump_calibration(
            tmp, unet, scheduler, quantizable_layers(unet), attrs={"job": "test"}, device=device, world=world, **DUMP
        )
    write_samples(
        out / "samples.zarr",
        unet,
        scheduler,
        [7, 8],
        eta=0.5,
        device=device,
        attrs={},
        desc="sample",
        world=world,
        **SAMPLE,
    )
    fp = copy.deepcopy(unet)
    layers = quantize(unet, QuantSpec(w_bits=4, a_bits=6))
    with world.main_first():
        checkpoints = Checkpoints(out / "les.ckpt", "key")
    gammas, losses = learn_all(
        {name: layers[name] for name in LES_LAYERS},
        fp,
        quantizable_layers(fp),
        records_by_step(open_calibration(out / "calib.zarr"), 4, seed=0),
        3,
        LESSettings("focal", iters=4, lr=1e-2, batch_size=4),
        budget=Budget.of(1.0, 1.0),
        checkpoints=checkpoints,
        device=device,
        world=world,
    )
    if world.main:
        write_tensors(out / "les.safetensors", gammas, {name: list(pair) for name, pair in losses.items()})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
