"""Hot-path benchmarks: LES and AdaRound iterations, FP vs fake-quantized sampling, the calibration dump.

Every figure comes with a reference measured in the same process on the same data, and the table
reports the ratio, which travels between machines better than a time:

* ``les``: one LES iteration of a layer / one plain forward+backward of that layer (γ-scaled, no
  quantizers) on the same batch. Per-iteration time is the difference of two runs of
  :func:`pipeline.method.les.learn_gamma` with different iteration counts, so its fixed costs drop out.
* ``adaround``: one AdaRound iteration of a block / one forward+backward of the FP block.
* ``sample``: fake-quantized DDIM sampling time / FP sampling time (goal: at most 1.5).
* ``dump``: calibration dump throughput (logical MB of arrays per second), store size on disk.

Each case runs in a child process (one intra-op thread unless ``--threads``), which reports its peak
resident memory (and peak CUDA memory on a GPU). ``--before DIR`` also runs every case on the
``pipeline/`` package of another checkout (e.g. ``git archive <commit> pipeline | tar -x -C DIR``),
back to back with the current one, so a change is measured before/after in the same run.

    python benchmarks/bench.py                                   # both models -> benchmarks/results.json
    python benchmarks/bench.py --models default --cases sample
    python benchmarks/bench.py --before /tmp/dmq-before --json before_after.json
    python benchmarks/bench.py --models default --cases les --iters 20 320 3 --before /tmp/dmq-before  # 300 a layer
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The embedded default (params.yaml model.*), and LDM-4's UNet (CelebA-HQ / LSUN: 224 base channels,
# multipliers 1-2-3-4, 2 ResNet blocks per level, attention at the three lower resolutions, 64x64x3
# latent) at half width and half resolution, which keeps a run within minutes on 2 CPU cores.
MODELS = {
    "default": None,  # pipeline.models.embedded.build_unet with params.yaml's model.* (randomly initialised)
    "ldm4-half": dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(112, 224, 336, 448),
        layers_per_block=2,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
    ),
}
CASES = ("les", "adaround", "sample", "dump")
STEPS = 10  # DDIM steps of the sampling and dump cases
RECORDS = 32  # LES / AdaRound batch (the paper's and the reference's)
# iterations of the two LES / AdaRound runs whose difference times one iteration, and rounds of each
ITERS = {"default": (4, 24, 5), "ldm4-half": (2, 8, 3)}
SAMPLE_BATCH = {"default": 32, "ldm4-half": 4}


def iterations(model: str) -> tuple[int, int, int]:
    """ITERS of ``model``, or those of ``--iters`` (handed to the children as BENCH_ITERS)."""
    given = os.environ.get("BENCH_ITERS")
    return tuple(int(n) for n in given.split(",")) if given else ITERS[model]


# ---------------------------------------------------------------- child process: one case, one model


def _timed(fn, repeats: int = 3) -> float:
    """Best of ``repeats`` wall times of ``fn()`` (the machine is shared: the minimum is the least noisy)."""
    return _interleaved({"fn": fn}, repeats)["fn"]


def _interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` rounds that run them all in turn, so that
    load from elsewhere on a shared machine hits every figure of a ratio alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _model(name: str, device):
    import torch
    from diffusers import UNet2DModel

    from pipeline.models.embedded import build_unet

    torch.manual_seed(0)
    unet = build_unet(16, (32, 64, 64), 1, 8) if MODELS[name] is None else UNet2DModel(**MODELS[name])
    return unet.eval().requires_grad_(False).to(device)


def _scheduler(steps: int):
    from diffusers import DDPMScheduler

    from pipeline.models.diffusion import ddim_scheduler

    return ddim_scheduler(DDPMScheduler(num_train_timesteps=1000), steps)


def _records(unet, device, count: int):
    """``count`` inputs spread over the sampling steps: random latents at the matching noise level."""
    import torch

    scheduler = _scheduler(STEPS)
    cfg = unet.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn((count, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=g)
    step = torch.arange(count) % STEPS
    return x.to(device), scheduler.timesteps[step].to(device), step


def _layer_io(unet, layers, x, t):
    import torch

    from pipeline.calibration.dump import capture_io

    with capture_io(layers) as captured, torch.no_grad():
        unet(x, t)
    return captured


def _pick_layers(layers, unet, x, t) -> dict[str, str]:
    """The costliest 3x3 conv, the costliest shortcut conv (PTS's layers) and an attention projection."""
    io = _layer_io(unet, layers, x[:1], t[:1])

    def macs(name):
        inp = io[name][0]
        w = layers[name].weight
        return inp[0].numel() * w.numel() // w.shape[1]

    convs = [n for n, m in layers.items() if m.weight.ndim == 4 and m.weight.shape[-1] == 3]
    shortcuts = [n for n in layers if n.endswith("conv_shortcut")]
    attention = [n for n in layers if n.endswith("to_q")]
    picked = {"conv3x3": max(convs, key=macs), "shortcut": max(shortcuts, key=macs)}
    if attention:
        picked["to_q"] = max(attention, key=macs)
    return picked


def case_les(model: str, device) -> dict:
    import torch

    from pipeline.method.les import learn_gamma
    from pipeline.method.weighting import make_weighting
    from pipeline.quant import quantizable_layers
    from pipeline.quant.layers import QuantLayer

    unet = _model(model, device)
    layers = quantizable_layers(unet)
    x, t, _ = _records(unet, device, RECORDS)
    rows = {}
    for role, name in _pick_layers(layers, unet, x, t).items():
        inputs, outputs = _layer_io(unet, {name: layers[name]}, x, t)[name]
        layer = QuantLayer(layers[name], w_bits=4, a_bits=8, num_steps=1, split=None).to(device)
        inputs, outputs = inputs.half(), outputs.half()

        def learn(iters):
            learn_gamma(
                layer,
                inputs,
                outputs,
                4,
                make_weighting("focal", 4),
                iters=iters,
                lr=1e-3,
                batch_size=RECORDS,
                seed=0,
                name=name,
            )

        base, more, rounds = iterations(model)
        theta = torch.zeros(layer.gamma.shape, device=device, requires_grad=True)

        def plain():
            for _ in range(more - base):
                gamma = theta.exp()
                out = layer.module_forward(layer.scale_input(inputs.float(), gamma), layer.scaled_weight(gamma))
                torch.autograd.grad((out - outputs.float()).pow(2).mean(), theta)

        best = _interleaved({"base": lambda: learn(base), "more": lambda: learn(more), "ref": plain}, rounds)
        per_iter = max(best["more"] - best["base"], 1e-9) / (more - base)
        ref = best["ref"] / (more - base)
        rows[role] = {
            "layer": name,
            "iter_ms": per_iter * 1e3,
            "iters_per_s": 1 / per_iter,
            "ref_fwd_bwd_ms": ref * 1e3,
            "ratio": per_iter / ref,
        }
    return rows


def case_adaround(model: str, device) -> dict:
    import torch

    from pipeline.calibration.capture import GB, Budget, placement, unit_inputs, unit_outputs
    from pipeline.method.adaround import AdaRoundSettings, reconstruct_unit, reconstruction_units
    from pipeline.method.weight_init import init_weight_quantizers
    from pipeline.quant import QuantSpec, quantize

    fp = _model(model, device)
    q = copy.deepcopy(fp)
    layers = quantize(q, QuantSpec(w_bits=4))
    init_weight_quantizers(layers, 10, 2.4)
    x, t, _ = _records(fp, device, RECORDS)
    units = reconstruction_units(q, lambda: q(x[:1], t[:1]))
    fp_modules = dict(fp.named_modules())

    def size(unit):
        return sum(p.numel() for p in unit.parameters())

    resnets = [u for u in units if type(u[1]).__name__ == "ResnetBlock2D"]
    attentions = [u for u in units if type(u[1]).__name__ == "Attention"]
    picked = {"resnet": max(resnets, key=lambda u: size(u[1]))}
    if attentions:
        picked["attention"] = max(attentions, key=lambda u: size(u[1]))
    rows = {}
    for role, (name, unit) in picked.items():
        with placement(Budget(4 * GB, 0), device) as allocate:
            q_inputs = unit_inputs(q, unit, (x, t), RECORDS, allocate)
            fp_outputs = unit_outputs(fp, {name: fp_modules[name]}, (x, t), RECORDS, allocate)[name]

        def run(iters):
            settings = AdaRoundSettings(
                iters=iters, lr=1e-3, batch_size=RECORDS, reg_lambda=0.01, beta_start=20, beta_end=2, warmup=0.2, seed=0
            )
            reconstruct_unit(name, unit, q_inputs, fp_outputs, settings)

        base, more, rounds = iterations(model)
        fp_unit = copy.deepcopy(fp_modules[name]).requires_grad_(True)
        args, kwargs = q_inputs
        target = fp_outputs
        params = list(fp_unit.parameters())

        def plain():
            for _ in range(more - base):
                out = fp_unit(*args, **kwargs)
                torch.autograd.grad((out - target).pow(2).mean(), params)

        best = _interleaved({"base": lambda: run(base), "more": lambda: run(more), "ref": plain}, rounds)
        per_iter = max(best["more"] - best["base"], 1e-9) / (more - base)
        ref = best["ref"] / (more - base)
        rows[role] = {
            "block": name,
            "iter_ms": per_iter * 1e3,
            "iters_per_s": 1 / per_iter,
            "ref_fwd_bwd_ms": ref * 1e3,
            "ratio": per_iter / ref,
        }
    return rows


def _fake_quantized(fp, device, x, steps: int, a_bits: int = 8):
    """W4A``a_bits`` copy of ``fp`` as the sample stage runs it: stored integer weights, per-step activation
    parameters (min-max of one batch per step), PTS exponents on the shortcut convs."""
    import torch

    from pipeline.method.weight_init import init_weight_quantizers
    from pipeline.models.diffusion import ddim_sample, sample_noise
    from pipeline.quant import QuantSpec, calibrating, quantize, set_step

    q = copy.deepcopy(fp)
    layers = quantize(q, QuantSpec(w_bits=4, a_bits=a_bits, num_steps=steps))
    init_weight_quantizers(layers, 10, 2.4)
    g = torch.Generator().manual_seed(2)
    for name, layer in layers.items():
        layer.load_integer_weight(layer.integer_weight())
        layer.quantize_acts = True
        if name.endswith("conv_shortcut"):
            layer.act_quantizer.exponent.copy_(torch.randint(0, 4, layer.act_quantizer.exponent.shape, generator=g))
    noise = sample_noise(0, torch.arange(len(x)), steps, tuple(x.shape[1:])).to(device)
    with calibrating(layers.values()):
        ddim_sample(q, _scheduler(steps), noise, 0.0, lambda s, t, x: set_step(q, s))
    return q


def case_sample(model: str, device) -> dict:
    import torch

    from pipeline.models.diffusion import ddim_sample, sample_noise
    from pipeline.quant import set_step

    fp = _model(model, device)
    batch = SAMPLE_BATCH[model]
    cfg = fp.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    noise = sample_noise(0, torch.arange(batch), STEPS, shape).to(device)
    q = _fake_quantized(fp, device, noise[:, 0], STEPS)
    scheduler = _scheduler(STEPS)
    times = _interleaved(
        {
            "fp": lambda: ddim_sample(fp, scheduler, noise, 0.0),
            "quant": lambda: ddim_sample(q, scheduler, noise, 0.0, lambda s, t, x: set_step(q, s)),
        },
        3,
    )
    return {
        "batch": batch,
        "steps": STEPS,
        "fp_images_per_s": batch / times["fp"],
        "quant_images_per_s": batch / times["quant"],
        "ratio": times["quant"] / times["fp"],
    }


def case_dump(model: str, device) -> dict:
    import zarr

    from pipeline.calibration.dump import dump_calibration
    from pipeline.quant import quantizable_layers

    unet = _model(model, device)
    num_samples, per_step = (32, 8) if model == "default" else (4, 2)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "calib.zarr"
        start = time.perf_counter()
        dump_calibration(
            store,
            unet,
            _scheduler(STEPS),
            quantizable_layers(unet),
            num_samples=num_samples,
            layer_records_per_step=per_step,
            layer_io_gb=8.0,
            batch_size=num_samples,
            eta=0.0,
            seed=0,
            chunk_records=64,
            attrs={},
            device=device,
        )
        seconds = time.perf_counter() - start
        root = zarr.open_group(str(store), mode="r")
        logical = sum(array.nbytes for array in _all_arrays(root))
        on_disk = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    return {
        "samples": num_samples,
        "layer_records_per_step": per_step,
        "steps": STEPS,
        "seconds": seconds,
        "logical_mb": logical / 2**20,
        "store_mb": on_disk / 2**20,
        "mb_per_s": logical / 2**20 / seconds,
    }


def _all_arrays(group):
    for _, array in group.arrays():
        yield array
    for _, sub in group.groups():
        yield from _all_arrays(sub)


def child(case: str, model: str, device_name: str) -> dict:
    import torch

    from pipeline.infra.device import resolve_device

    device = resolve_device(device_name)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = {"case": case, "model": model, "threads": torch.get_num_threads(), "device": str(device)}
    result["result"] = globals()[f"case_{case}"](model, device)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_after_imports_mb"] = baseline
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# ---------------------------------------------------------------- parent: run the children, print the table


def run_case(case: str, model: str, code: Path, device: str, threads: int) -> dict:
    # the code first, then the caller's path: packages carried to a GPU machine live there (gpu_check.sh)
    path = os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", case, model, device], cwd=code, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"case {case} on {model} ({code}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows_of(result: dict) -> list[tuple[str, str, str]]:
    """(what, figure, ratio) lines of one case's result."""
    r, case = result["result"], result["case"]
    if case in ("les", "adaround"):
        return [
            (
                f"{case} {role} ({v.get('layer') or v.get('block')})",
                f"{v['iters_per_s']:.1f} it/s",
                f"{v['ratio']:.2f}x fwd+bwd",
            )
            for role, v in r.items()
        ]
    if case == "sample":
        return [
            (
                f"sample b={r['batch']} S={r['steps']}",
                f"fp {r['fp_images_per_s']:.2f} / quant {r['quant_images_per_s']:.2f} img/s",
                f"{r['ratio']:.2f}x fp",
            )
        ]
    return [
        (
            f"dump N={r['samples']} M={r['layer_records_per_step']}",
            f"{r['mb_per_s']:.1f} MB/s, {r['logical_mb']:.1f} MB",
            f"store {r['store_mb']:.1f} MB",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of each case")
    parser.add_argument("--before", type=Path, help="another checkout (with pipeline/) to run every case on too")
    parser.add_argument(
        "--iters", nargs=3, type=int, metavar=("BASE", "MORE", "ROUNDS"), help="LES / AdaRound runs (default: ITERS)"
    )
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.iters:
        os.environ["BENCH_ITERS"] = ",".join(map(str, args.iters))
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    codes = {"after": ROOT} if args.before is None else {"before": args.before.resolve(), "after": ROOT}
    results = []
    header = f"{'model':<10} {'code':<7} {'case':<58} {'figure':<34} {'ratio':<18} {'peak RSS MB (over imports)':>26}"
    print(header, flush=True)
    for model in args.models:
        for case in args.cases:
            for label, code in codes.items():
                result = {**run_case(case, model, code, args.device, args.threads), "code": label}
                results.append(result)
                for what, figure, ratio in rows_of(result):
                    memory = (
                        f"{result['peak_rss_mb']:.0f} (+{result['peak_rss_mb'] - result['rss_after_imports_mb']:.0f})"
                    )
                    print(f"{model:<10} {label:<7} {what:<58} {figure:<34} {ratio:<18} {memory:>26}", flush=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
