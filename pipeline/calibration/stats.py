"""Per layer x step x input-channel statistics of the FP layer inputs on the calibration trajectories.

They show where PTS pays: a layer whose input channels span very different ranges (high outlier
ratio) loses its small channels to one per-tensor step size. In the paper these are the ResNet
shortcut convs, whose input is the raw, unnormalised ``concat(h, skip)``.

A statistics table ``Stats`` maps layer -> name -> array: the per-channel ``CHANNEL_STATS`` have
shape (S, C), the per-step ``STEP_STATS`` shape (S,).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import zarr
from tqdm import tqdm

from pipeline.calibration.capture import Budget, execution_order, io_numel, layer_io, windows
from pipeline.calibration.dump import step_records
from pipeline.infra.storage import atomic_path, create_array, open_store

CHANNEL_STATS = ("min", "max", "absmax", "percentile")
STEP_STATS = ("channel_range_variance", "outlier_ratio")
# The outlier ratio is capped at 1 / RATIO_EPS, so a layer with mostly dead (constant) channels gets
# a large finite ratio rather than inf, which JSON and a log colour scale cannot take.
RATIO_EPS = 1e-6

Stats = dict[str, dict[str, np.ndarray]]


def channels_first(x: np.ndarray) -> np.ndarray:
    """(C, values): Conv2d inputs are (N, C, H, W), Linear inputs channel-last (N, ..., C)."""
    axis = 1 if x.ndim == 4 else x.ndim - 1
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def range_spread(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Variance over channels of the channel ranges and their max / median ratio, along the last axis."""
    ranges = hi.astype(np.float64) - lo
    top, median = ranges.max(-1), np.median(ranges, -1)
    ratio = np.divide(top, np.maximum(median, RATIO_EPS * top), out=np.ones_like(top), where=top > 0)
    return ranges.var(-1), ratio


def channel_statistics(x: np.ndarray, percentile: float) -> dict[str, np.ndarray]:
    """``CHANNEL_STATS`` of one step's inputs ``x`` of one layer, per channel."""
    x = channels_first(x)
    magnitude = np.abs(x)
    return {
        "min": x.min(1),
        "max": x.max(1),
        "absmax": magnitude.max(1),
        "percentile": np.percentile(magnitude, percentile, axis=1),
    }


def tabulate(rows: dict[str, list[dict[str, np.ndarray]]]) -> Stats:
    """Per layer, the per-step :func:`channel_statistics` (in step order) stacked, with the per-step spreads."""
    stats: Stats = {}
    for layer in natural_sorted(rows):
        table = {name: np.stack([row[name] for row in rows[layer]]).astype(np.float32) for name in CHANNEL_STATS}
        variance, ratio = range_spread(table["min"], table["max"])
        stats[layer] = {
            **table,
            "channel_range_variance": variance.astype(np.float32),
            "outlier_ratio": ratio.astype(np.float32),
        }
    return stats


@torch.no_grad()
def layer_statistics(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calib: zarr.Group,
    per_step: int,
    percentile: float,
    budget: Budget,
    device: torch.device,
    batch_size: int,
) -> Stats:
    """Statistics of every layer's FP input over the first ``per_step`` records of every step of the
    calibration trajectories, captured from ``model`` (the FP network or its Denoiser; ``layers``
    its quantizable layers) a window of layers at a time; ``percentile`` is taken of |x| per channel."""
    one = tuple(v[:1].to(device) for v in step_records(calib, 0, 1))
    order = execution_order(layers, lambda: model(*one))
    numel = io_numel(model, layers, one)
    sizes = {name: per_step * sum(numel[name]) * 4 for name in order}
    rows: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in order}
    for s in tqdm(range(calib.attrs["steps"]), desc="stats"):
        records = step_records(calib, s, per_step)
        for window in windows(order, sizes, budget.window_bytes):
            with layer_io(model, {n: layers[n] for n in window}, records, batch_size, budget, device) as captured:
                for name, (x, _) in captured.items():
                    rows[name].append(channel_statistics(x.float().cpu().numpy(), percentile))
    return tabulate(rows)


def write_stats_store(path: str | Path, stats: Stats, attrs: dict) -> None:
    """Zarr group ``<layer>/<statistic>``; write into an ``atomic_store`` temporary for atomicity."""
    root = zarr.open_group(str(path), mode="w")
    for layer, table in stats.items():
        for name in CHANNEL_STATS + STEP_STATS:
            create_array(root, f"{layer}/{name}", data=np.asarray(table[name], dtype=np.float32))
    root.attrs.update(attrs)


def load_stats(source: str | Path | zarr.Group) -> Stats:
    root = source if isinstance(source, zarr.Group) else open_stats(source)
    return {
        layer: {name: np.asarray(root[f"{layer}/{name}"][...]) for name in CHANNEL_STATS + STEP_STATS}
        for layer in natural_sorted(root.group_keys())
    }


def open_stats(path: str | Path) -> zarr.Group:
    return open_store(path, "statistics store")


def mean_outlier_ratios(stats: Stats) -> dict[str, float]:
    return {layer: float(table["outlier_ratio"].mean()) for layer, table in stats.items()}


def summary(stats: Stats, top: int = 10) -> dict:
    """The stats.json content: per-layer outlier ratio and channel-range variance, worst layers first."""
    layers = {
        layer: {
            "mean_outlier_ratio": float(table["outlier_ratio"].mean()),
            "max_outlier_ratio": float(table["outlier_ratio"].max()),
            "mean_channel_range_variance": float(table["channel_range_variance"].mean()),
        }
        for layer, table in stats.items()
    }
    ranked = sorted(layers, key=lambda layer: -layers[layer]["mean_outlier_ratio"])
    return {
        "layers": layers,
        "top_outlier_layers": [{"layer": layer, **layers[layer]} for layer in ranked[:top]],
    }


def auto_pts_layers(source: Stats | str | Path | zarr.Group, threshold: float) -> list[str]:
    """Layers whose outlier ratio, averaged over steps, exceeds ``threshold`` (``pts.layers: auto``)."""
    stats = source if isinstance(source, dict) else load_stats(source)
    return [layer for layer, ratio in mean_outlier_ratios(stats).items() if ratio > threshold]


def showcase_layers(stats: Stats) -> tuple[str, str]:
    """(outlier-heavy, ordinary) layer pair for the channel-range figure: the shortcut with the highest
    mean outlier ratio, and the ``conv1`` of the same ResNet block, which sees the same tensor after
    GroupNorm + SiLU (else the calmest ``conv1``, else the calmest layer)."""
    ratios = mean_outlier_ratios(stats)
    heavy = max([n for n in ratios if n.endswith("conv_shortcut")] or ratios, key=ratios.get)
    sibling = heavy.rsplit(".", 1)[0] + ".conv1"
    if sibling in ratios:
        return heavy, sibling
    others = [n for n in ratios if n != heavy] or [heavy]
    return heavy, min([n for n in others if n.endswith("conv1")] or others, key=ratios.get)


def write_outlier_table(stats: Stats, path: str | Path) -> None:
    """Long CSV (layer, step, outlier_ratio) for a DVC ``plots:`` entry."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "step", "outlier_ratio"])
        for layer, table in stats.items():
            writer.writerows((layer, s, f"{ratio:.6g}") for s, ratio in enumerate(table["outlier_ratio"]))


def natural_sorted(names) -> list[str]:
    """``down_blocks.2`` before ``down_blocks.10``."""
    return sorted(names, key=lambda name: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])
