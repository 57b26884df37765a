"""Would an entry's quantization seeds pay learned in one graph? (issue 41, item 3)

``recon`` and ``les`` learn each of ``quant.seeds`` one after another: the same block or layer, the
same iterations, other batches. In one graph (``torch.func.vmap`` over the seeds' stacked learned
tensors and their batches) a convolution with per-seed weights becomes one grouped convolution and
every element-wise op runs once for all seeds. This probe times both ways on units of the embedded
UNet (``params.yaml``'s ``model``, random weights) with a simplified iteration of each learner, its
own code, not the stages':

* ``adaround``: every weight of a ResNet block rounded by ``floor(w / s) + h(V)`` (4 bits, per output
  channel), loss = block output error + 0.01 × the rounding regulariser, Adam on V;
* ``les``: one convolution on fake-quantized ``x / γ`` (6 bits, per tensor) and ``W·diag(γ)`` (4 bits,
  per output channel) with straight-through rounding, Adam on log γ.

Inputs and targets are the unit's own on 512 random records of the UNet. Both ways run the same
iterations on the same batches, back to back in one process, ``--rounds`` times; the ratio is the
one-graph time over the one-after-another time (below 1: one graph is faster).

    python benchmarks/seed_graph.py
    python benchmarks/seed_graph.py --learners les --iters 300 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from pipeline.models.embedded import build_unet  # noqa: E402
from pipeline.params import load_config  # noqa: E402

UNITS = {
    "adaround": ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "up_blocks.0.resnets.0"],
    "les": [
        "down_blocks.0.resnets.0.conv1",
        "down_blocks.1.resnets.0.conv_shortcut",
        "up_blocks.0.resnets.0.conv_shortcut",
        "up_blocks.0.resnets.1.conv1",
    ],
}
RECORDS, BATCH, SEEDS = 512, 32, 3


def unit_records(unet: torch.nn.Module, name: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The unit's inputs (positional) and outputs on RECORDS random noisy images and timesteps."""
    found = {}

    def keep(_, args, output):
        found["inputs"], found["output"] = tuple(a.detach() for a in args), output.detach()

    handle = dict(unet.named_modules())[name].register_forward_hook(keep)
    size = unet.config.sample_size
    with torch.no_grad():
        unet(torch.randn(RECORDS, 1, size, size), torch.randint(0, 1000, (RECORDS,)))
    handle.remove()
    return found["inputs"], found["output"]


def ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (x.round() - x).detach()


def soft_offset(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * 1.2 - 0.1).clamp(0, 1)  # AdaRound's rectified sigmoid, ζ = 1.1, γ = -0.1


def per_channel(w: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, w.ndim))


def adaround_problem(block: torch.nn.Module):
    """(initial V per weight, loss(V, inputs…, target)) of one ResNet block."""
    weights = {n: p.detach() for n, p in block.named_parameters() if n.endswith("weight") and p.ndim > 1}
    scale = {n: w.abs().amax(dim=per_channel(w), keepdim=True) / 7 for n, w in weights.items()}
    floor = {n: torch.floor(w / scale[n]) for n, w in weights.items()}
    start = {n: -torch.log(1.2 / (w / scale[n] - floor[n] + 0.1) - 1) for n, w in weights.items()}

    def loss(v: dict, *args) -> torch.Tensor:
        *inputs, target = args
        rounded = {n: (floor[n] + soft_offset(v[n])).clamp(-8, 7) * scale[n] for n in weights}
        error = (functional_call(block, rounded, tuple(inputs)) - target).pow(2).sum(1).mean()
        regulariser = sum((1 - (2 * soft_offset(x) - 1).abs().pow(10.0)).sum() for x in v.values())
        return error + 0.01 * regulariser

    return start, loss


def fake_quantize(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2**bits - 1
    step = (high - low).clamp_min(1e-8) / levels
    zero = (-low / step).round().detach()
    return ((ste_round(x / step) + zero).clamp(0, levels) - zero) * step


def les_problem(conv: torch.nn.Conv2d):
    """(initial log γ, loss(log γ, x, target)) of one convolution."""
    weight, bias = conv.weight.detach(), conv.bias.detach()

    def loss(log_gamma: dict, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        gamma = log_gamma["gamma"].exp().view(1, -1, 1, 1)
        w = weight * gamma
        wq = fake_quantize(w, w.amin(dim=per_channel(w), keepdim=True), w.amax(dim=per_channel(w), keepdim=True), 4)
        xs = x / gamma
        out = F.conv2d(fake_quantize(xs, xs.amin(), xs.amax(), 6), wq, bias, conv.stride, conv.padding)
        return (out - target).pow(2).mean()

    return {"gamma": torch.zeros(weight.shape[1])}, loss


def one_after_another(start: dict, loss, records: tuple, batches: torch.Tensor, lr: float) -> dict:
    """Each seed learned alone, as the stages do; its learned tensors stacked by seed."""
    learned = []
    for seed_batches in batches:
        params = {n: p.clone().requires_grad_() for n, p in start.items()}
        optimizer = torch.optim.Adam(params.values(), lr=lr)
        for index in seed_batches:
            optimizer.zero_grad()
            loss(params, *(r[index] for r in records)).backward()
            optimizer.step()
        learned.append(params)
    return {n: torch.stack([p[n].detach() for p in learned]) for n in start}


def one_graph(start: dict, loss, records: tuple, batches: torch.Tensor, lr: float) -> dict:
    """Every seed in one graph: per-seed copies stacked, the seeds' batches side by side."""
    params = {n: p.expand(len(batches), *p.shape).clone().requires_grad_() for n, p in start.items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    seed_losses = vmap(loss)
    for step in range(batches.shape[1]):
        optimizer.zero_grad()
        seed_losses(params, *(r[batches[:, step]] for r in records)).sum().backward()
        optimizer.step()
    return {n: p.detach() for n, p in params.items()}


def problem(unet: torch.nn.Module, learner: str, name: str):
    inputs, output = unit_records(unet, name)
    unit = dict(unet.named_modules())[name]
    start, loss = adaround_problem(unit) if learner == "adaround" else les_problem(unit)
    return start, loss, (*inputs, output), {"adaround": 4e-3, "les": 2e-2}[learner]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learners", nargs="+", default=list(UNITS), choices=list(UNITS))
    parser.add_argument("--iters", type=int, default=150, help="iterations of each seed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_config(ROOT / "params.yaml").model
    unet = build_unet(model.image_size, model.block_out_channels, model.layers_per_block, model.norm_num_groups)
    unet.eval().requires_grad_(False)
    for learner in args.learners:
        for name in UNITS[learner]:
            start, loss, records, lr = problem(unet, learner, name)
            batches = torch.randint(0, RECORDS, (SEEDS, args.iters, BATCH), generator=torch.Generator().manual_seed(0))
            times = {one_after_another: [], one_graph: []}
            for _ in range(args.rounds):
                for way in times:
                    began = time.perf_counter()
                    way(start, loss, records, batches, lr)
                    times[way].append((time.perf_counter() - began) / (SEEDS * args.iters) * 1e3)
            alone, together = min(times[one_after_another]), min(times[one_graph])
            shape = "×".join(map(str, records[0].shape[1:]))
            print(
                f"{learner:<8} {name:<38} input {shape:<9} one after another {alone:6.2f} ms, "
                f"one graph {together:6.2f} ms a seed-iteration: {together / alone:.2f}×"
            )


if __name__ == "__main__":
    main()
