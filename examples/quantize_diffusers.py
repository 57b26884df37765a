"""Quantize a local diffusers model with DMQ at W4A8 in one call, save it, reload it and sample.

    python examples/quantize_diffusers.py /data/models/ddpm-cifar10 dmq-w4a8.safetensors

The folder is an unconditional pixel model: a diffusers pipeline folder (unet/, scheduler/) or a bare
UNet folder with its scheduler config. Nothing is downloaded. The budgets default to the shipped
params' (LES 300, AdaRound 800 iterations per layer / block, each at a learning rate scaled up to
its length); the paper's are 6 000 and 20 000.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from pipeline import Calibration, load, preset, quantize, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="local diffusers folder")
    parser.add_argument("checkpoint", type=Path, help="the quantized checkpoint to write (.safetensors)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps, for calibration and sampling")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--les-iters", type=int, default=300)
    parser.add_argument("--recon-iters", type=int, default=800)
    parser.add_argument("--backend", choices=("fake", "int8"), default="fake")
    parser.add_argument("--images", type=Path, default=Path("samples.npy"))
    args = parser.parse_args()
    pipeline_layout = (args.model / "unet").is_dir()
    subfolder = {"subfolder": "unet"} if pipeline_layout else {}

    # 1. The FP UNet, loaded the usual way, and DMQ W4A8 with the params' sections as keywords.
    unet = UNet2DModel.from_pretrained(args.model, **subfolder)
    config = preset(
        "dmq",
        w_bits=4,
        a_bits=8,
        diffusion={"steps": args.steps},
        les={"iters": args.les_iters},
        recon={"iters": args.recon_iters},
    )
    # 2. One call: trajectories sampled for 64 noise seeds, LES, AdaRound, per-step ranges and PTS.
    quantized = quantize(unet, config, Calibration(num_samples=args.calibration_samples, seed=1234))
    save(quantized, args.checkpoint)

    # 3. Later, or elsewhere: the checkpoint on the same FP folder, in a diffusers pipeline.
    quantized = load(args.checkpoint, args.model, backend=args.backend)
    scheduler = DDIMScheduler.from_pretrained(args.model, subfolder="scheduler" if pipeline_layout else None)
    pipe = DDIMPipeline(unet=quantized, scheduler=scheduler)
    images = pipe(batch_size=4, num_inference_steps=args.steps, eta=0.0, output_type="np").images
    np.save(args.images, images)
    print(f"{args.checkpoint}: {args.checkpoint.stat().st_size} bytes; {len(images)} samples in {args.images}")


if __name__ == "__main__":
    main()
