"""Speed-up of sampling sharded over torchrun ranks, against one process, on this machine.

Runs the same sampling job (FP UNet, ``write_samples``) three ways: 1 process x 1 thread, 1 process x
N threads, N gloo ranks x 1 thread (``torchrun --standalone``). Prints wall times with and without
start-up (imports, model load, process group), the speed-ups, and whether each store equals the
1 x 1 one byte for byte.

    python benchmarks/sharded_sampling.py --fp-model artifacts/fp_model --samples 512 --batch 64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def job(out: Path, fp_model: Path, samples: int, batch: int, steps: int) -> None:
    import torch

    from pipeline.eval.sampling import write_samples
    from pipeline.infra.distributed import init
    from pipeline.models.diffusion import ddim_scheduler, load_fp_model

    world, device = init("cpu")
    unet, train_scheduler = load_fp_model(fp_model)
    scheduler = ddim_scheduler(train_scheduler, steps)
    world.barrier()
    start = time.perf_counter()
    write_samples(out / "samples.zarr", unet, scheduler, [0], samples, batch, 0.0, device, {}, "sample", world)
    if world.main:
        print(
            json.dumps(
                {"sampling_s": time.perf_counter() - start, "threads": torch.get_num_threads(), "ranks": world.size}
            )
        )


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp-model", type=Path, default=ROOT / "artifacts/fp_model")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job(args.job, args.fp_model, args.samples, args.batch, args.steps)
        return
    script = [
        str(Path(__file__).resolve()),
        "--fp-model",
        str(args.fp_model.resolve()),
        "--samples",
        str(args.samples),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
    ]
    runs = {
        "1 process x 1 thread": ([sys.executable], 1),
        f"1 process x {args.ranks} threads": ([sys.executable], args.ranks),
        f"{args.ranks} ranks x 1 thread": (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}"],
            1,
        ),
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (launcher, threads) in runs.items():
            out = Path(tmp) / name.replace(" ", "_")
            out.mkdir()
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
            start = time.perf_counter()
            done = subprocess.run(
                [*launcher, *script, "--job", str(out)], env=env, capture_output=True, text=True, cwd=ROOT
            )
            wall = time.perf_counter() - start
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            inner = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
            rows[name] = {"wall_s": wall, "sampling_s": inner["sampling_s"], "store": tree_hash(out / "samples.zarr")}
            print(f"{name:<24} wall {wall:6.1f} s   sampling {inner['sampling_s']:6.1f} s", flush=True)
    base = rows["1 process x 1 thread"]
    for name, row in rows.items():
        row["speedup_wall"] = base["wall_s"] / row["wall_s"]
        row["speedup_sampling"] = base["sampling_s"] / row["sampling_s"]
        row["same_store_as_1x1"] = row["store"] == base["store"]
        print(
            f"{name:<24} speed-up {row['speedup_sampling']:.2f}x sampling, {row['speedup_wall']:.2f}x wall; store "
            f"identical to 1x1: {row['same_store_as_1x1']}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"samples": args.samples, "batch": args.batch, "steps": args.steps, "runs": rows}, indent=2)
            + "\n"
        )


if __name__ == "__main__":
    main()
