"""The int8 backend (pipeline/deploy/integer.py) against FP32 and the fake-quantized model: speed, memory,
faithfulness and where the time goes, on the models of benchmarks/bench.py (the embedded default, LDM-4's
UNet at half width and resolution), W4A8 and W4A6 with PTS exponents on the shortcut convs, on this machine's
CPU (its kind names the results file: benchmarks/int8_results_<richest kernel flag>.{txt,json}).

* ``speed``: time per denoiser call and per DDIM sampling run (S = 10) of FP32, fake and int8, interleaved in
  one process (best of several rounds), reported as ratios to FP32 of the same run; the PSNR of the int8
  samples against the fake ones (same noise); how many int8 layers run as exponent groups (kernels that add
  pairs in int16, pipeline/deploy/integer.py).
* ``where``: one denoiser call split into the quantized layers' time (int8: codes + glue, kernels) and the
  rest of the network (norms, attention matmuls, activations, FP layers), from hooks.
* ``kernels``: the candidate kernels on one LDM-sized conv and linear: float32, oneDNN u8 x s8 with float32
  output (the chosen one), x86 / fbgemm quantized conv / linear (quint8 output: not faithful, timed for
  reference), ``torch._int_mm`` (s8 x s8 -> s32, plus the rescale).
* ``memory``: one child process per backend: weight bytes (float, int8), RSS after building the model, and
  the peak RSS of one denoiser call (VmHWM reset before the call).

    OMP_NUM_THREADS=2 python benchmarks/int8.py            # -> benchmarks/int8_results_<flag>.{txt,json}
    OMP_NUM_THREADS=2 python benchmarks/int8.py --models default --parts speed --a-bits 6
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench import MODELS, STEPS, _fake_quantized, _interleaved, _model, _scheduler  # noqa: E402

BATCH = {"default": 64, "ldm4-half": 8}  # batches a 2-core CPU samples with (the sample stage's default is 250)
CALL_ROUNDS, SAMPLE_ROUNDS, KERNEL_ROUNDS = 7, 3, 15
PARTS = ("kernels", "speed", "where", "memory")
PER_A_BITS = ("speed", "where", "memory")  # the kernels part times fixed shapes, whatever the bits


def _threads() -> int:
    import torch

    threads = min(2, int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.set_num_threads(threads)
    return threads


_BUILT: dict = {}


def _built(model: str, a_bits: int):
    """:func:`_build` of all three backends, once per model and bits in this process."""
    if (model, a_bits) not in _BUILT:
        _BUILT.clear()
        _BUILT[model, a_bits] = _build(model, a_bits)
    return _BUILT[model, a_bits]


def _build(model: str, a_bits: int, backends=("fp32", "fake", "int8")):
    """(models by backend, noise (B, S, C, H, W)); the fake and int8 ones share the calibration (per-step ranges
    from one fake sampling run on this noise)."""
    import torch

    from pipeline.deploy.integer import to_integer
    from pipeline.models.diffusion import sample_noise

    fp = _model(model, torch.device("cpu"))
    cfg = fp.config
    noise = sample_noise(0, torch.arange(BATCH[model]), STEPS, (cfg.in_channels, cfg.sample_size, cfg.sample_size))
    out = {"fp32": fp}
    if "fake" in backends or "int8" in backends:
        out["fake"] = _fake_quantized(fp, torch.device("cpu"), noise[:, 0], STEPS, a_bits)
    if "int8" in backends:
        out["int8"] = copy.deepcopy(out["fake"]) if "fake" in backends else out.pop("fake")
        to_integer(out["int8"])
    return {name: out[name] for name in backends}, noise


# Copied from tests/test_integer.py _in_float64
def _in_float64(fake):
    """The fake-quantized model computed in float64 (the reference for float rounding through the network)."""
    from pipeline.quant import quant_layers

    wide = copy.deepcopy(fake).double()
    for layer in quant_layers(wide).values():
        layer.frozen_weight = layer.frozen_weight.double()
    return wide


def _sampler(unet, noise):
    from pipeline.models.diffusion import ddim_sample
    from pipeline.quant import set_step

    scheduler = _scheduler(STEPS)
    return lambda: ddim_sample(unet, scheduler, noise, 0.0, lambda s, t, x: set_step(unet, s))


def part_speed(model: str, a_bits: int) -> dict:
    import torch

    from pipeline.deploy.integer import integer_layers
    from pipeline.quant import set_step

    models, noise = _built(model, a_bits)
    x, t, step = noise[:, 0], _scheduler(STEPS).timesteps[STEPS // 2], STEPS // 2
    for unet in models.values():
        set_step(unet, step)
    with torch.no_grad():
        calls = _interleaved({name: (lambda u=u: u(x, t)) for name, u in models.items()}, CALL_ROUNDS)
        runs = _interleaved({name: _sampler(u, noise) for name, u in models.items()}, SAMPLE_ROUNDS)
        fake, int8, fp = (_sampler(models[n], noise)() for n in ("fake", "int8", "fp32"))
        wide = _sampler(_in_float64(models["fake"]), noise.double())().float()
    span = fake.max() - fake.min()

    def psnr(a, b):
        return float(10 * torch.log10(span**2 / ((a - b) ** 2).mean()))

    layers = integer_layers(models["int8"]).values()
    return {
        "batch": BATCH[model],
        "steps": STEPS,
        "int8_layers": len(layers),
        "grouped_layers": sum(any(len(g) > len(layer.input_scale[0]) for g in layer.gemms) for layer in layers),
        "call_s": calls,
        "sample_s": runs,
        "call_ratio_to_fp32": {n: v / calls["fp32"] for n, v in calls.items()},
        "sample_ratio_to_fp32": {n: v / runs["fp32"] for n, v in runs.items()},
        "psnr_int8_vs_fake_db": psnr(int8, fake),
        "psnr_fp32_vs_fake_db": psnr(fp, fake),
        "psnr_int8_vs_fake_float64_db": psnr(int8, wide),
        "psnr_fake_vs_fake_float64_db": psnr(fake, wide),
    }


def part_where(model: str, a_bits: int) -> dict:
    """Seconds of one denoiser call (best of 3) by where they go."""
    import torch

    from pipeline.deploy import integer
    from pipeline.quant import quant_layers, quantizable_layers, set_step

    models, noise = _built(model, a_bits)
    x, t = noise[:, 0], _scheduler(STEPS).timesteps[STEPS // 2]
    kernel_s = [0.0]
    plain_kernel = integer._int8_gemm

    def timed_kernel(*args):
        start = time.perf_counter()
        out = plain_kernel(*args)
        kernel_s[0] += time.perf_counter() - start
        return out

    result = {}
    for name, unet in models.items():
        set_step(unet, STEPS // 2)
        if name == "fp32":
            layers = [unet.get_submodule(n) for n in quantizable_layers(unet)]
        else:
            layers = list((quant_layers if name == "fake" else integer.integer_layers)(unet).values())
        inside = [0.0]
        starts = {}
        hooks = [
            m.register_forward_pre_hook(lambda m, a: starts.__setitem__(id(m), time.perf_counter())) for m in layers
        ]
        hooks += [
            m.register_forward_hook(
                lambda m, a, o: inside.__setitem__(0, inside[0] + time.perf_counter() - starts[id(m)])
            )
            for m in layers
        ]
        integer._int8_gemm = timed_kernel
        best = None
        try:
            with torch.no_grad():
                for _ in range(3):
                    inside[0] = kernel_s[0] = 0.0
                    start = time.perf_counter()
                    unet(x, t)
                    total = time.perf_counter() - start
                    if best is None or total < best["total_s"]:
                        best = {"total_s": total, "quantized_layers_s": inside[0], "rest_s": total - inside[0]}
                        if name == "int8":
                            best.update(kernels_s=kernel_s[0], codes_and_glue_s=inside[0] - kernel_s[0])
        finally:
            integer._int8_gemm = plain_kernel
            for hook in hooks:
                hook.remove()
        result[name] = best
    return result


def _milliseconds(fns: dict) -> dict[str, float]:
    return {name: seconds * 1e3 for name, seconds in _interleaved(fns, KERNEL_ROUNDS).items()}


def part_kernels(model: str) -> dict:
    """One conv and one linear of the model's size, each candidate kernel, best of KERNEL_ROUNDS (milliseconds)."""
    import torch
    import torch.nn.functional as F

    batch, base = BATCH[model], MODELS[model]["block_out_channels"][1] if MODELS[model] else 64
    side = (MODELS[model]["sample_size"] if MODELS[model] else 16) // 2
    g = torch.Generator().manual_seed(0)
    out = {}
    # conv 3x3, base -> base channels at half resolution
    x = torch.randn(batch, base, side, side, generator=g)
    w = torch.randn(base, base, 3, 3, generator=g) * 0.05
    bias = torch.randn(base, generator=g)
    codes = torch.randint(0, 256, x.shape, dtype=torch.uint8, generator=g)
    w8 = torch.randint(-120, 121, w.shape, generator=g).to(torch.int8)
    w_scale = torch.rand(base, generator=g) * 0.01 + 1e-3
    zeros = torch.zeros(base, dtype=torch.long)
    packed = torch.ops.onednn.qconv_prepack(w8, w_scale, 1.0, 0, [1, 1], [1, 1], [1, 1], 1, None)
    torch.backends.quantized.engine = "x86"
    wq = torch.quantize_per_channel(w8.float() * w_scale.view(-1, 1, 1, 1), w_scale.double(), zeros, 0, torch.qint8)
    x86_packed = torch.ops.quantized.conv2d_prepack(wq, bias, [1, 1], [1, 1], [1, 1], 1)
    codes_cl = codes.contiguous(memory_format=torch.channels_last)
    x_cl, w_cl = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    qx = torch._make_per_tensor_quantized_tensor(codes, 0.02, 100).contiguous(memory_format=torch.channels_last)

    def onednn_conv(c):
        args = (packed, w_scale, zeros, bias, [1, 1], [1, 1], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "")
        return torch.ops.onednn.qconv2d_pointwise(c, 0.02, 100, *args)

    conv = {
        "fp32 F.conv2d": lambda: F.conv2d(x, w, bias, 1, 1),
        "fp32 F.conv2d, channels-last": lambda: F.conv2d(x_cl, w_cl, bias, 1, 1),
        "onednn qconv2d_pointwise u8s8->f32 (chosen)": lambda: onednn_conv(codes),
        "onednn qconv2d_pointwise, channels-last input (as inside the UNet)": lambda: onednn_conv(codes_cl),
        "x86 quantized.conv2d u8s8->u8 (requantizes: not faithful)": lambda: torch.ops.quantized.conv2d(
            qx, x86_packed, 1.0, 0
        ),
        "codes of the input (x/gamma/step, round, +zp, clamp, to uint8)": lambda: (
            (x / 1.1).div_(0.02).round_().add_(100).clamp_(0, 255).to(torch.uint8)
        ),
    }
    out[f"conv3x3 {base}->{base} {side}x{side} b={batch}"] = _milliseconds(conv)
    # linear: attention projection over the tokens of that level
    tokens = batch * side * side
    xl = torch.randn(tokens, base, generator=g)
    wl = torch.randn(base, base, generator=g)
    cl = torch.randint(0, 256, (tokens, base), dtype=torch.uint8, generator=g)
    w8l = torch.randint(-120, 121, (base, base), generator=g).to(torch.int8)
    packed_l = torch.ops.onednn.qlinear_prepack(w8l, None)
    w8t = w8l.t().contiguous()
    wql = torch.quantize_per_channel(w8l.float() * w_scale.view(-1, 1), w_scale.double(), zeros, 0, torch.qint8)
    x86_l = torch.ops.quantized.linear_prepack(wql, bias)
    qxl = torch._make_per_tensor_quantized_tensor(cl, 0.02, 100)
    linear = {
        "fp32 F.linear": lambda: F.linear(xl, wl, bias),
        "onednn qlinear_pointwise u8s8->f32 (chosen)": lambda: torch.ops.onednn.qlinear_pointwise(
            cl, 0.02, 100, packed_l, w_scale, zeros, bias, 1.0, 0, torch.float32, "none", [], ""
        ),
        "x86 quantized.linear u8s8->u8 (requantizes: not faithful)": lambda: torch.ops.quantized.linear(
            qxl, x86_l, 1.0, 0
        ),
        "torch._int_mm s8s8->s32 + rescale": lambda: (
            torch._int_mm((cl.to(torch.int16) - 128).to(torch.int8), w8t).float().mul_(w_scale * 0.02).add_(bias)
        ),
    }
    out[f"linear {base}->{base} tokens={tokens}"] = _milliseconds(linear)
    return out


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(model: str, a_bits: str, backend: str) -> dict:
    import torch

    from pipeline.deploy.integer import weight_bytes
    from pipeline.quant import set_step

    _threads()
    models, noise = _build(model, int(a_bits), (backend,))
    unet = models[backend]
    del models
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what building the model freed (glibc keeps it otherwise)
    after_build = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the call alone
    set_step(unet, STEPS // 2)
    with torch.no_grad():
        unet(noise[:, 0], _scheduler(STEPS).timesteps[STEPS // 2])
    sizes = weight_bytes(unet)
    return {
        "float_weight_mb": sizes["float"] / 2**20,
        "int8_weight_mb": sizes["integer"] / 2**20,
        "rss_after_build_mb": after_build,
        "peak_rss_in_call_mb": _rss_mb("VmHWM"),
    }


def part_memory(model: str, a_bits: int) -> dict:
    out = {}
    for backend in ("fp32", "fake", "int8"):
        env = {**os.environ, "OMP_NUM_THREADS": str(_threads())}
        done = subprocess.run(
            [sys.executable, __file__, "--memory-child", model, str(a_bits), backend],
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            sys.exit(f"memory of {backend} on {model} failed:\n{done.stderr[-3000:]}")
        out[backend] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _lines(model: str, part: str, r: dict) -> list[str]:
    if part == "speed":
        c, s = r["call_ratio_to_fp32"], r["sample_ratio_to_fp32"]
        return [
            f"{model:<16} speed   denoiser call b={r['batch']}: fp32 {r['call_s']['fp32'] * 1e3:.0f} ms; "
            f"fake {c['fake']:.2f}x fp32, int8 {c['int8']:.2f}x fp32 ({r['grouped_layers']} of {r['int8_layers']} "
            "int8 layers as exponent groups)",
            f"{model:<16} speed   sampling b={r['batch']} S={r['steps']}: fp32 {r['sample_s']['fp32']:.2f} s; "
            f"fake {s['fake']:.2f}x fp32, int8 {s['int8']:.2f}x fp32",
            f"{model:<16} faith   PSNR of samples: int8 vs fake {r['psnr_int8_vs_fake_db']:.1f} dB; against the fake "
            f"model in float64: int8 {r['psnr_int8_vs_fake_float64_db']:.1f} dB, fake (float32) "
            f"{r['psnr_fake_vs_fake_float64_db']:.1f} dB; fp32 vs fake {r['psnr_fp32_vs_fake_db']:.1f} dB",
        ]
    if part == "where":
        lines = []
        for name, v in r.items():
            extra = (
                f" (codes+glue {v['codes_and_glue_s'] * 1e3:.0f} ms, kernels {v['kernels_s'] * 1e3:.0f} ms)"
                if "kernels_s" in v
                else ""
            )
            lines.append(
                f"{model:<16} where   {name:<5} call {v['total_s'] * 1e3:.0f} ms = quantized layers "
                f"{v['quantized_layers_s'] * 1e3:.0f} ms{extra} + rest {v['rest_s'] * 1e3:.0f} ms"
            )
        return lines
    if part == "kernels":
        return [
            f"{model:<16} kernel  {shape}: {name} {ms:.2f} ms ({ms / list(v.values())[0]:.2f}x fp32)"
            for shape, v in r.items()
            for name, ms in v.items()
        ]
    return [
        f"{model:<16} memory  {name:<5} weights float {v['float_weight_mb']:.2f} MB + int8 "
        f"{v['int8_weight_mb']:.2f} MB; "
        f"RSS after build {v['rss_after_build_mb']:.0f} MB, peak in one call {v['peak_rss_in_call_mb']:.0f} MB"
        for name, v in r.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--a-bits", nargs="*", type=int, default=[8, 6], choices=range(2, 9))
    parser.add_argument("--out", type=Path, help="default: benchmarks/int8_results_<richest kernel flag of the CPU>")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return
    import torch

    from pipeline.deploy.integer import kernels_add_pairs_in_int16
    from pipeline.infra.machine import cpu_kind, kernel_flags

    cpu, flags = cpu_kind(), kernel_flags()
    out = args.out or ROOT / f"benchmarks/int8_results_{flags[-1] if flags else 'x86'}"
    threads = _threads()
    started = time.perf_counter()
    head = (
        f"CPU {cpu}; int8 kernels add pairs in int16: {kernels_add_pairs_in_int16()}; torch {torch.__version__}, "
        f"{threads} threads, W4A{'/'.join(map(str, args.a_bits))}, PTS on shortcuts, DDIM S={STEPS}; ratios are to "
        f"FP32 measured in the same run (best of {CALL_ROUNDS} calls / {SAMPLE_ROUNDS} sampling runs, interleaved)"
    )
    lines, results = [head], {"header": head, "cpu": cpu}
    print(head, flush=True)
    for model in args.models:
        for part in args.parts:
            for a_bits in args.a_bits if part in PER_A_BITS else [None]:
                r = globals()[f"part_{part}"](model, *([a_bits] if a_bits else []))
                label = model if a_bits is None else f"{model} W4A{a_bits}"
                results.setdefault(label, {})[part] = r
                for line in _lines(label, part, r):
                    print(line, flush=True)
                    lines.append(line)
    lines.append(f"total {time.perf_counter() - started:.0f} s")
    print(lines[-1])
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
