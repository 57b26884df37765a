"""Power-of-Two Scaling with voting.

Channel c of a PTS layer at step s quantizes with step ``Δ_s · 2^-k_c`` (the per-tensor zero point is
kept). Every calibration sample votes for the k that minimises its own squared quantization error on
that channel; the channel takes the mode, unless fewer than τ of the samples agree, then k = 0.
Ties (equal errors, equal counts: a dead channel, say) go to the finest step, the largest k, as in the
reference code, which lists its candidates from the finest step down.
"""

from __future__ import annotations

import fnmatch
import re

import torch

from pipeline.calibration.capture import observing, run_batches
from pipeline.infra.device import host
from pipeline.quant.layers import QuantLayer
from pipeline.quant.quantizers import fake_quantize


def select_pts_layers(names: list[str], patterns: list[str]) -> list[str]:
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            endings = sorted({re.search(r"[^.]+(\.\d+)?$", n).group(0) for n in names})
            raise ValueError(
                f"pts.layers: pattern {pattern!r} matches no quantized layer; the quantized layers' names "
                f"end in {', '.join(endings)} (e.g. {names[0]!r}), or use 'auto'"
            )
    return chosen


def ballots(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, num_candidates: int, channel_dim: int
) -> torch.Tensor:
    """The votes of the samples of ``x`` (samples first) with per-channel base ``scale`` / ``zero_point`` (C,):
    per channel, how many samples chose each k, shape (C, K). Counts add up exactly over batches."""
    c = x.shape[channel_dim]
    per_sample = x.movedim(channel_dim, 1).reshape(x.shape[0], c, -1)  # (N, C, positions)
    errors = torch.stack([
        (per_sample - fake_quantize(per_sample, (scale * 2.0**-k)[:, None], zero_point[:, None], bits)).pow(2).sum(2)
        for k in range(num_candidates)
    ])  # fmt: skip  # (K, N, C)
    finest_first = num_candidates - 1  # argmin / max return the first of equals: search from the largest k down
    choice = finest_first - errors.flip(0).argmin(0)  # (N, C)
    return torch.nn.functional.one_hot(choice, num_candidates).sum(0)  # (C, K)


def count_votes(counts: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """Per channel from its ballot ``counts`` (C, K): the mode ``k_mode``, its ``agreement`` ratio and the
    applied ``k`` (the mode where at least ``threshold`` of the samples agree, else 0)."""
    finest_first = counts.shape[1] - 1
    top, first = counts.flip(1).max(1)
    k_mode = finest_first - first
    agreement = top.float() / counts[0].sum()
    k = torch.where(agreement >= threshold, k_mode, torch.zeros_like(k_mode))
    return {"k_mode": k_mode, "agreement": agreement, "k": k}


def vote(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    num_candidates: int,
    threshold: float,
    channel_dim: int,
) -> dict[str, torch.Tensor]:
    """Vote on ``x`` (samples first) with per-channel base ``scale`` / ``zero_point`` (C,).

    Returns per channel: the mode ``k_mode``, its ``agreement`` ratio and the applied ``k``."""
    return count_votes(ballots(x, scale, zero_point, bits, num_candidates, channel_dim), threshold)


class PTSVoter:
    """Votes per step on the (scaled) inputs of the PTS layers of the quantized network."""

    def __init__(self, layers: dict[str, QuantLayer], num_candidates: int, threshold: float) -> None:
        self.layers = layers
        self.num_candidates = num_candidates
        self.threshold = threshold
        self.results: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in layers}

    @torch.no_grad()
    def __call__(self, unet, step: int, records: tuple[torch.Tensor, ...], batch_size: int) -> None:
        """Vote at ``step`` on the model inputs ``records`` = (x, t) or (x, t, cond). Each batch's ballots are
        counted as it passes, so no layer's inputs are kept: the pass runs with the step's exponents at 0,
        the base every candidate is measured from."""
        base, counts = {}, {}
        for name, layer in self.layers.items():
            layer.act_quantizer.exponent[step].zero_()
            base[name] = layer.act_quantizer.channel_params(step)

        def count(name, layer, args, _):
            bits = layer.act_quantizer.bits
            found = ballots(layer.scale_input(args[0]), *base[name], bits, self.num_candidates, layer.channel_dim)
            counts[name] = found if name not in counts else counts[name] + found

        with observing(self.layers, count, before=True):
            run_batches(unet, records, batch_size)
        for name, layer in self.layers.items():
            aq = layer.act_quantizer
            result = count_votes(counts[name], self.threshold)
            aq.exponent[step] = result["k"].to(aq.exponent.dtype)
            self.results[name].append(result)

    def stacked(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer: ``k_mode``, ``agreement``, ``k`` as (steps, C) tensors, on the host."""
        return {
            name: {key: host(torch.stack([r[key] for r in per_step])) for key in per_step[0]}
            for name, per_step in self.results.items()
            if per_step
        }


def vote_summary(votes: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Per PTS layer: channels with k > 0 at any step, mean agreement ratio, k histogram."""
    layers = {}
    for name, v in votes.items():
        k = v["k"]
        layers[name] = {
            "channels": k.shape[1],
            "channels_k_gt_0_any_step": int((k > 0).any(0).sum()),
            "mean_channels_k_gt_0_per_step": float((k > 0).sum(1).float().mean()),
            "mean_agreement": float(v["agreement"].mean()),
            "k_histogram": torch.bincount(k.flatten().long(), minlength=int(k.max()) + 1).tolist(),
        }
    return {"layers": layers}
