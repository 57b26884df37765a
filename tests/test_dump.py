import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from pipeline.calibration.capture import GB, capture_io
from pipeline.calibration.dump import dump_calibration, layer_io_sample, open_calibration, step_records
from pipeline.infra.storage import atomic_store
from pipeline.models.diffusion import ddim_sample, ddim_scheduler, sample_noise
from pipeline.quant import quantizable_layers


def dump(unet, store, layer_io_gb=8.0):
    scheduler = ddim_scheduler(DDPMScheduler(num_train_timesteps=1000), steps=4)
    with atomic_store(store) as tmp:
        dump_calibration(
            tmp,
            unet,
            scheduler,
            quantizable_layers(unet),
            num_samples=6,
            layer_records_per_step=3,
            layer_io_gb=layer_io_gb,
            batch_size=4,
            eta=0.0,
            seed=11,
            chunk_records=5,
            attrs={"model_hash": "abc"},
            device=torch.device("cpu"),
        )
    return scheduler, open_calibration(store)


def test_dump_round_trip_matches_direct_forward_hooks(tiny_unet, tmp_path):
    layers = quantizable_layers(tiny_unet)
    scheduler, root = dump(tiny_unet, tmp_path / "calib.zarr")
    assert root.attrs["layer_steps"] == [0, 1, 2, 3] and root.attrs["layer_records_per_step"] == 3
    assert root.attrs["steps"] == 4 and root.attrs["model_hash"] == "abc"
    assert root["trajectory/x_t"].shape == (24, 1, 16, 16) and root["trajectory/x_t"].chunks[0] == 5
    assert set(root["layers"].group_keys()) == set(layers)

    # the stored trajectory is the sampler's own: rerun it directly and compare every step
    noise = sample_noise(11, torch.arange(6), 4, (1, 16, 16))
    seen = []
    ddim_sample(tiny_unet, scheduler, noise, 0.0, lambda s, t, x: seen.append(x.clone()))
    for s in range(4):
        x, t = step_records(root, s, 6)
        torch.testing.assert_close(x, seen[s], atol=1e-4, rtol=1e-4)  # batch composition changes float sums
        assert (t == scheduler.timesteps[s]).all()

    # layer I/O equals a forward hook on the same inputs, in float16
    s = 2
    x, t = step_records(root, s, 3)
    with capture_io(layers) as captured, torch.no_grad():
        tiny_unet(x, t[0])
    for name in ("down_blocks.1.resnets.0.conv_shortcut", "mid_block.attentions.0.to_q", "up_blocks.0.resnets.0.conv1"):
        inp, out = captured[name]
        stored_in = root[f"layers/{name}/input"]
        assert stored_in.dtype == np.float16 and stored_in.shape == (12, *inp.shape[1:])
        np.testing.assert_allclose(stored_in[s * 3 : s * 3 + 3], inp.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(root[f"layers/{name}/output"][s * 3 : s * 3 + 3], out.numpy(), rtol=2e-3, atol=2e-3)


def test_the_stored_layer_io_keeps_within_its_budget():
    """Every step's records while they fit; then fewer per step; then one record of evenly spaced steps."""
    record = GB // 10
    assert layer_io_sample(20, 4, record, 8.0) == ([*range(20)], 4)
    assert layer_io_sample(20, 4, record, 4.0) == ([*range(20)], 2)
    assert layer_io_sample(20, 4, record, 0.5) == ([0, 5, 10, 14, 19], 1)
    assert layer_io_sample(20, 4, record, 0.1) == ([0], 1)
    with pytest.raises(
        ValueError, match=r"calib\.layer_io_gb: 0\.05 GiB cannot hold one record of layer I/O \(0\.1 GiB"
    ):
        layer_io_sample(20, 4, record, 0.05)


def test_a_store_under_a_small_budget_holds_evenly_spaced_steps_of_the_same_records(tiny_unet, tmp_path):
    _, full = dump(tiny_unet, tmp_path / "full.zarr")
    one_record = sum(
        full[f"layers/{name}/{kind}"][:1].nbytes for name in full["layers"] for kind in ("input", "output")
    )
    _, small = dump(tiny_unet, tmp_path / "small.zarr", layer_io_gb=2.5 * one_record / GB)
    assert small.attrs["layer_steps"] == [0, 3] and small.attrs["layer_records_per_step"] == 1
    name = "mid_block.attentions.0.to_q"
    # the same records (the first of steps 0 and 3), replayed in batches of another size
    stored, expected = small[f"layers/{name}/input"][:], full[f"layers/{name}/input"][:][[0, 9]]
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(small["trajectory/x_t"][:], full["trajectory/x_t"][:])
