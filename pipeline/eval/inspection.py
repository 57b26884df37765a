"""Human-readable summaries of Zarr stores (calibration dumps, statistics, votes, samples)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from pipeline.calibration.dump import open_calibration
from pipeline.infra.storage import MANIFEST_KEY, open_store


def _array_stats(array: zarr.Array, block_records: int = 256) -> tuple[float, float, float]:
    """Min, max, mean read block by block along the first axis, so huge arrays never load whole."""
    lo, hi, total, count = np.inf, -np.inf, 0.0, 0
    if array.ndim == 0:
        value = float(array[()])
        return value, value, value
    for start in range(0, array.shape[0], block_records):
        block = np.asarray(array[start : start + block_records], dtype=np.float64)
        if block.size:
            lo, hi = min(lo, block.min()), max(hi, block.max())
            total, count = total + block.sum(), count + block.size
    return lo, hi, total / max(count, 1)


def store_tree(path: str | Path, stats: bool = True) -> list[str]:
    """One line per group and array: shape, dtype, chunking and (optionally) min / max / mean."""
    root = open_store(path, sealed=False)
    # the manifest and the full parameter list are long: say they are there, show the rest
    attrs = {k: v for k, v in root.attrs.items() if k not in (MANIFEST_KEY, "params")}
    checked = f"  ({len(root.attrs[MANIFEST_KEY])} files match its manifest)" if MANIFEST_KEY in root.attrs else ""
    lines = [f"{path}{checked}" + (f"  attrs={attrs}" if attrs else "")]

    def walk(group: zarr.Group, depth: int) -> None:
        for name, node in sorted(group.members(), key=lambda item: item[0]):
            indent = "  " * depth
            if isinstance(node, zarr.Array):
                line = f"{indent}{name}  shape={node.shape} dtype={node.dtype} chunks={node.chunks}"
                if stats and node.size:
                    lo, hi, mean = _array_stats(node)
                    line += f"  min={lo:.4g} max={hi:.4g} mean={mean:.4g}"
                lines.append(line)
            else:
                lines.append(f"{indent}{name}/")
                walk(node, depth + 1)

    walk(root, 1)
    return lines


def layer_channel_ranges(path: str | Path, layer: str, step: int, kind: str = "input") -> np.ndarray:
    """(C, 2) per-channel min and max of one layer's dumped ``kind`` at step index ``step``."""
    root = open_calibration(path)
    if f"layers/{layer}" not in root:
        known = ", ".join(sorted(root["layers"].group_keys()))
        raise KeyError(f"no layer {layer!r} in {path}; layers: {known}")
    steps, per_step = root.attrs["steps"], root.attrs["layer_records_per_step"]
    if not 0 <= step < steps:
        raise ValueError(f"step {step} outside 0..{steps - 1}")
    stored = root.attrs.get("layer_steps", list(range(steps)))
    if step not in stored:
        raise ValueError(
            f"{path} keeps layer I/O of steps {', '.join(map(str, stored))} only (calib.layer_io_gb bounds it); "
            f"step {step} is not among them"
        )
    i = stored.index(step)
    data = np.asarray(root[f"layers/{layer}/{kind}"][i * per_step : (i + 1) * per_step], dtype=np.float32)
    channel_axis = 1 if data.ndim == 4 else data.ndim - 1
    per_channel = np.moveaxis(data, channel_axis, 0).reshape(data.shape[channel_axis], -1)
    return np.stack([per_channel.min(1), per_channel.max(1)], 1)
