"""Stats stage: per-channel statistics against a direct per-channel numpy computation."""

import csv
import json

import numpy as np
import pytest
import zarr

from pipeline.calibration.dump import open_calibration
from pipeline.calibration.stats import (
    auto_pts_layers,
    layer_statistics,
    load_stats,
    range_spread,
    summary,
    write_stats_store,
)
from pipeline.config import parse_config
from pipeline.infra.storage import atomic_store, seal_store
from stages.lineage import stage_provenance

STEPS, PER_STEP = 3, 4
SHORTCUT = "up_blocks.0.resnets.0.conv_shortcut"
CONV1 = "up_blocks.0.resnets.0.conv1"
LINEAR = "down_blocks.0.attentions.0.to_q"
OUTLIER_CHANNELS = [3, 11]


def make_calib(path, provenance=None):
    """Tiny calib.zarr: a shortcut input with two planted outlier channels, a flat conv input and a
    flat channel-last linear input. Each step has its own scale so mixing steps up shows."""
    rng = np.random.default_rng(0)
    scale = np.repeat(np.arange(1, STEPS + 1), PER_STEP).astype(np.float32)
    shortcut = rng.uniform(-1, 1, (STEPS * PER_STEP, 16, 4, 4)) * scale[:, None, None, None]
    shortcut[:, OUTLIER_CHANNELS] *= 100
    data = {
        SHORTCUT: shortcut,
        CONV1: rng.uniform(-1, 1, (STEPS * PER_STEP, 16, 4, 4)) * scale[:, None, None, None],
        LINEAR: rng.uniform(-2, 3, (STEPS * PER_STEP, 5, 8)) * scale[:, None, None],
    }
    root = zarr.open_group(str(path), mode="w")
    root.create_array("trajectory/x_t", data=np.zeros((STEPS * PER_STEP, 1, 4, 4), np.float32))
    for layer, x in data.items():
        root.create_array(f"layers/{layer}/input", data=x.astype(np.float16), chunks=(5, *x.shape[1:]))
    root.attrs.update(
        {
            "model_hash": "abc",
            **(provenance or {}),
            "steps": STEPS,
            "layer_records_per_step": PER_STEP,
            "num_samples": PER_STEP,
        }
    )
    seal_store(path)
    return {layer: x.astype(np.float16).astype(np.float32) for layer, x in data.items()}


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


@pytest.fixture
def calib(tmp_path):
    data = make_calib(tmp_path / "calib.zarr")
    return open_calibration(tmp_path / "calib.zarr"), data


def test_statistics_match_direct_computation(calib):
    root, data = calib
    stats = layer_statistics(root, 99.0)
    assert set(stats) == set(data)
    for layer, x in data.items():
        expected = expected_stats(x, 99.0)
        for name, value in expected.items():
            assert stats[layer][name].dtype == np.float32
            np.testing.assert_allclose(stats[layer][name], value, rtol=1e-5, err_msg=f"{layer} {name}")


def test_outlier_ratio_separates_planted_layer(calib):
    stats = layer_statistics(calib[0], 99.9)
    assert stats[SHORTCUT]["outlier_ratio"].min() > 50
    for layer in (CONV1, LINEAR):
        assert 1 <= stats[layer]["outlier_ratio"].max() < 1.5
    assert auto_pts_layers(stats, 4.0) == [SHORTCUT]
    report = summary(stats, top=2)
    assert [row["layer"] for row in report["top_outlier_layers"]][0] == SHORTCUT
    assert len(report["top_outlier_layers"]) == 2
    json.dumps(report)


def test_outlier_ratio_zero_median_stays_finite():
    variance, ratio = range_spread(np.zeros((2, 4)), np.array([[0, 0, 0, 5.0], [0, 0, 0, 0]]))
    assert np.isfinite(ratio).all() and ratio[0] >= 1e5 and ratio[1] == 1
    np.testing.assert_allclose(variance, [np.var([0, 0, 0, 5.0]), 0])


def test_store_round_trip(calib, tmp_path):
    stats = layer_statistics(calib[0], 99.0)
    with atomic_store(tmp_path / "stats.zarr") as tmp:
        write_stats_store(tmp, stats, {"steps": STEPS, "model_hash": "abc", "percentile": 99.0})
    loaded = load_stats(tmp_path / "stats.zarr")
    assert list(loaded) == list(stats)
    for layer in stats:
        for name, value in stats[layer].items():
            np.testing.assert_array_equal(loaded[layer][name], value)
    assert zarr.open_group(str(tmp_path / "stats.zarr"), mode="r").attrs["model_hash"] == "abc"
    assert auto_pts_layers(tmp_path / "stats.zarr", 4.0) == [SHORTCUT]


def test_stage_writes_store_report_table_and_figures(tmp_path, monkeypatch):
    from stages import layout
    from stages.stats import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("stats:\n  percentile: 99.0\n")
    data = make_calib(layout.CALIB, stage_provenance(parse_config({"stats": {"percentile": 99.0}}), "dump", "abc"))
    main()
    loaded = load_stats(layout.STATS)
    np.testing.assert_allclose(loaded[LINEAR]["max"], expected_stats(data[LINEAR], 99.0)["max"], rtol=1e-5)
    report = json.loads(layout.STATS_JSON.read_text())
    assert report["model_hash"] == "abc" and report["top_outlier_layers"][0]["layer"] == SHORTCUT
    with layout.STATS_TABLE.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data) * STEPS and set(rows[0]) == {"layer", "step", "outlier_ratio"}
    for figure in (layout.STATS_RANGES_FIG, layout.STATS_HEATMAP_FIG):
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("**/.*tmp-*"))
