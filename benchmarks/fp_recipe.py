"""Training recipes of the embedded FP model, side by side in one run: training time and FP FID.

Each recipe trains the embedded UNet from the same seed, with params.yaml's ``model.*`` except what
the recipe sets (steps, batch, lr, EMA, ``image_size``, ``block_out_channels``), then
samples ``--samples`` images per noise seed with DDIM (``diffusion.steps``, ``sample.batch_size`` and
``sample.eta``) and measures FID in the digit classifier's feature space against the real digits, like
the ``fid_fp`` stage (the samples of a recipe with another ``image_size`` are resized to params.yaml's
first, as the digits themselves are). The table gives each recipe's training time as a ratio to the
first recipe's, measured in this run, and its FID's mean ± spread over the noise seeds.
``--old-model FOLDER`` takes the first recipe's weights from a model folder it already trained (e.g.
``artifacts/fp_model`` of an earlier repro) and times only ``--timing-steps`` of its training, scaled
to its full length, so the long reference recipe need not be retrained to be compared.

    python benchmarks/fp_recipe.py --classifier artifacts/classifier.safetensors --old-model artifacts/fp_model \\
        --recipe today=train_steps:2500,batch_size:128,lr:0.002,ema_decay:0.995 \\
        --recipe narrow=train_steps:1200,batch_size:128,lr:0.003,ema_decay:0.995,block_out_channels:16-32-32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # this checkout's code, whichever checkout pip installed

from pipeline.eval.metrics import evaluate_runs, feature_space, featurize, reference_digits  # noqa: E402
from pipeline.eval.sampling import generate  # noqa: E402
from pipeline.models.diffusion import ddim_scheduler, load_fp_model  # noqa: E402
from pipeline.models.training import train_embedded  # noqa: E402
from pipeline.params import load_config  # noqa: E402

TRAIN_KEYS = {
    "train_steps": int,
    "batch_size": int,
    "lr": float,
    "ema_decay": float,
    "image_size": int,
    "block_out_channels": lambda text: [int(c) for c in text.split("-")],  # e.g. 16-32-32
}


def parse_recipe(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition("=")
    recipe = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition(":")
        if key not in TRAIN_KEYS:
            raise SystemExit(f"--recipe {name}: unknown key {key!r} (known: {', '.join(TRAIN_KEYS)})")
        recipe[key] = TRAIN_KEYS[key](value)
    if "train_steps" not in recipe:
        raise SystemExit(f"--recipe {name}: train_steps is required")
    return name, recipe


def train(cfg, recipe: dict, steps: int):
    model = cfg.model.model_validate({**cfg.model.model_dump(), **recipe, "train_steps": steps})
    start = time.perf_counter()
    ema, scheduler, _ = train_embedded(model, cfg.seed)
    return ema, scheduler, time.perf_counter() - start


def at_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """Samples resized the way :func:`load_digits_images` resizes the 8x8 digits, so that models trained
    at different sizes are measured in one feature space (the classifier's, at ``model.image_size``)."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", required=True, help="name=key:value,... (first: reference)")
    parser.add_argument("--classifier", type=Path, required=True, help="the classifier stage's safetensors")
    parser.add_argument("--old-model", type=Path, help="model folder already trained with the first recipe")
    parser.add_argument("--timing-steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[2024, 2025, 2026])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "fp_recipe.json")
    args = parser.parse_args()
    cfg = load_config(ROOT / "params.yaml")
    recipes = [parse_recipe(text) for text in args.recipe]
    features = feature_space(str(args.classifier), None)
    reference = featurize(reference_digits(cfg.model.image_size), features, reference=True)
    e, sample = cfg.eval, cfg.sample
    rows = []
    for index, (name, recipe) in enumerate(recipes):
        if index == 0 and args.old_model is not None:
            _, _, seconds = train(cfg, recipe, args.timing_steps)
            seconds *= recipe["train_steps"] / args.timing_steps
            unet, scheduler = load_fp_model(args.old_model)
            timed = f"{args.timing_steps} steps timed, scaled"
        else:
            unet, scheduler, seconds = train(cfg, recipe, recipe["train_steps"])
            timed = "trained in full"
        ddim = ddim_scheduler(scheduler, cfg.diffusion.steps)
        runs = {
            seed: at_size(
                generate(
                    unet, ddim, args.samples, sample.batch_size, sample.eta, seed, torch.device("cpu"), f"{name} {seed}"
                ),
                cfg.model.image_size,
            )
            for seed in args.seeds
        }
        found = evaluate_runs(runs, reference, features, e.kid_subset_size, e.isc_splits, e.prc_neighborhood)
        fids = [seed_metrics["fid"] for seed_metrics in found["seeds"].values()]
        rows.append(
            {
                "recipe": name,
                **recipe,
                "train_seconds": round(seconds, 1),
                "timing": timed,
                "fid_mean": statistics.mean(fids),
                "fid_std": statistics.stdev(fids) if len(fids) > 1 else 0.0,
                "fid_per_seed": fids,
                "confident_share": found["mean"]["confident_share"],
            }
        )
        print(f"{name}: {rows[-1]['train_seconds']:.0f} s, FID {rows[-1]['fid_mean']:.1f} ± {rows[-1]['fid_std']:.1f}")
    base = rows[0]["train_seconds"]
    print(f"| recipe | settings | train time / {rows[0]['recipe']}'s | train s | FID (mean ± spread) | confident |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        settings = ", ".join(f"{k} {v}" for k, v in row.items() if k in TRAIN_KEYS)
        print(
            f"| {row['recipe']} | {settings} | {row['train_seconds'] / base:.2f} | {row['train_seconds']:.0f} "
            f"| {row['fid_mean']:.1f} ± {row['fid_std']:.1f} | {row['confident_share']:.3f} |"
        )
    environment = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    args.json.write_text(json.dumps({"environment": environment, "seeds": args.seeds, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
