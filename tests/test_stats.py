"""Stats: per-channel statistics against a direct per-channel numpy computation, captured from the trajectories."""

import json

import numpy as np
import torch
import zarr
from diffusers import DDPMScheduler

from pipeline.calibration.capture import Budget, capture_io
from pipeline.calibration.dump import dump_calibration, open_calibration, step_records
from pipeline.calibration.stats import (
    auto_pts_layers,
    channel_statistics,
    layer_statistics,
    load_stats,
    natural_sorted,
    range_spread,
    summary,
    tabulate,
    write_stats_store,
)
from pipeline.infra.storage import atomic_store
from pipeline.models.diffusion import ddim_scheduler
from pipeline.quant import quantizable_layers

CPU = torch.device("cpu")

STEPS, PER_STEP = 3, 4
SHORTCUT = "up_blocks.0.resnets.0.conv_shortcut"
CONV1 = "up_blocks.0.resnets.0.conv1"
LINEAR = "down_blocks.0.attentions.0.to_q"
OUTLIER_CHANNELS = [3, 11]


def planted():
    """A shortcut input with two planted outlier channels, a flat conv input and a flat channel-last
    linear input. Each step has its own scale so mixing steps up shows."""
    rng = np.random.default_rng(0)
    scale = np.repeat(np.arange(1, STEPS + 1), PER_STEP).astype(np.float32)
    shortcut = rng.uniform(-1, 1, (STEPS * PER_STEP, 16, 4, 4)) * scale[:, None, None, None]
    shortcut[:, OUTLIER_CHANNELS] *= 100
    data = {
        SHORTCUT: shortcut,
        CONV1: rng.uniform(-1, 1, (STEPS * PER_STEP, 16, 4, 4)) * scale[:, None, None, None],
        LINEAR: rng.uniform(-2, 3, (STEPS * PER_STEP, 5, 8)) * scale[:, None, None],
    }
    return {layer: x.astype(np.float32) for layer, x in data.items()}


def statistics(data, percentile):
    return tabulate(
        {
            layer: [channel_statistics(x[s * PER_STEP : (s + 1) * PER_STEP], percentile) for s in range(STEPS)]
            for layer, x in data.items()
        }
    )


def expected_stats(x, percentile):
    """One channel and one step at a time, the slow obvious way."""
    channel_axis = 1 if x.ndim == 4 else x.ndim - 1
    out = {name: np.zeros((STEPS, x.shape[channel_axis])) for name in ("min", "max", "absmax", "percentile")}
    variance, ratio = np.zeros(STEPS), np.zeros(STEPS)
    for s in range(STEPS):
        block = x[s * PER_STEP : (s + 1) * PER_STEP]
        for c in range(x.shape[channel_axis]):
            values = np.take(block, c, axis=channel_axis).ravel()
            out["min"][s, c], out["max"][s, c] = values.min(), values.max()
            out["absmax"][s, c] = np.abs(values).max()
            out["percentile"][s, c] = np.percentile(np.abs(values), percentile)
        ranges = out["max"][s] - out["min"][s]
        variance[s], ratio[s] = np.var(ranges), ranges.max() / np.median(ranges)
    return {**out, "channel_range_variance": variance, "outlier_ratio": ratio}


def test_statistics_match_direct_computation():
    data = planted()
    stats = statistics(data, 99.0)
    assert set(stats) == set(data)
    for layer, x in data.items():
        expected = expected_stats(x, 99.0)
        for name, value in expected.items():
            assert stats[layer][name].dtype == np.float32
            np.testing.assert_allclose(stats[layer][name], value, rtol=1e-5, err_msg=f"{layer} {name}")


def test_outlier_ratio_separates_planted_layer():
    stats = statistics(planted(), 99.9)
    assert stats[SHORTCUT]["outlier_ratio"].min() > 50
    for layer in (CONV1, LINEAR):
        assert 1 <= stats[layer]["outlier_ratio"].max() < 1.5
    assert auto_pts_layers(stats, 4.0) == [SHORTCUT]
    report = summary(stats, top=2)
    assert [row["layer"] for row in report["top_outlier_layers"]][0] == SHORTCUT
    assert len(report["top_outlier_layers"]) == 2
    json.dumps(report)


def test_every_layer_is_covered_from_the_trajectories_whatever_the_dump_stored(tiny_unet, tmp_path):
    """The stats capture every quantizable layer's input on the first records of each step, in
    windows of layers that do not change the figures, whatever layer I/O the store keeps."""
    scheduler = ddim_scheduler(DDPMScheduler(num_train_timesteps=1000), steps=STEPS)
    layers = quantizable_layers(tiny_unet)
    with atomic_store(tmp_path / "calib.zarr") as tmp:
        dump_calibration(
            tmp,
            tiny_unet,
            scheduler,
            layers,
            num_samples=6,
            layer_records_per_step=1,
            layer_io_gb=6e-4,
            batch_size=6,
            eta=0.0,
            seed=0,
            chunk_records=6,
            attrs={},
            device=CPU,
        )
    root = open_calibration(tmp_path / "calib.zarr")
    assert len(root.attrs["layer_steps"]) < STEPS  # the store holds fewer steps than the stats cover
    stats = layer_statistics(tiny_unet, layers, root, PER_STEP, 99.0, Budget.of(1, 1), CPU, 64)
    assert list(stats) == natural_sorted(layers)
    rows = {name: [] for name in layers}
    for s in range(STEPS):
        x, t = step_records(root, s, PER_STEP)
        with capture_io(layers) as captured, torch.no_grad():
            tiny_unet(x, t)
        for name, (inputs, _) in captured.items():
            rows[name].append(channel_statistics(inputs.numpy(), 99.0))
    expected = tabulate(rows)
    windowed = layer_statistics(tiny_unet, layers, root, PER_STEP, 99.0, Budget(0, 0, str(tmp_path)), CPU, 3)
    for name in layers:
        for key, value in expected[name].items():
            np.testing.assert_allclose(stats[name][key], value, rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")
            np.testing.assert_allclose(windowed[name][key], value, rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")


def test_outlier_ratio_zero_median_stays_finite():
    variance, ratio = range_spread(np.zeros((2, 4)), np.array([[0, 0, 0, 5.0], [0, 0, 0, 0]]))
    assert np.isfinite(ratio).all() and ratio[0] >= 1e5 and ratio[1] == 1
    np.testing.assert_allclose(variance, [np.var([0, 0, 0, 5.0]), 0])


def test_store_round_trip(tmp_path):
    stats = statistics(planted(), 99.0)
    with atomic_store(tmp_path / "stats.zarr") as tmp:
        write_stats_store(tmp, stats, {"steps": STEPS, "model_hash": "abc", "percentile": 99.0})
    loaded = load_stats(tmp_path / "stats.zarr")
    assert list(loaded) == list(stats)
    for layer in stats:
        for name, value in stats[layer].items():
            np.testing.assert_array_equal(loaded[layer][name], value)
    assert zarr.open_group(str(tmp_path / "stats.zarr"), mode="r").attrs["model_hash"] == "abc"
    assert auto_pts_layers(tmp_path / "stats.zarr", 4.0) == [SHORTCUT]
