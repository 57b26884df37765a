import numpy as np
import torch
from diffusers import DDPMScheduler

from pipeline.calibration.dump import capture_io, dump_calibration, open_calibration, step_records
from pipeline.infra.storage import atomic_store
from pipeline.models.diffusion import ddim_sample, ddim_scheduler, sample_noise
from pipeline.quant import quantizable_layers


def test_dump_round_trip_matches_direct_forward_hooks(tiny_unet, tmp_path):
    scheduler = ddim_scheduler(DDPMScheduler(num_train_timesteps=1000), steps=4)
    layers = quantizable_layers(tiny_unet)
    store = tmp_path / "calib.zarr"
    with atomic_store(store) as tmp:
        dump_calibration(
            tmp,
            tiny_unet,
            scheduler,
            layers,
            num_samples=6,
            layer_records_per_step=3,
            batch_size=4,
            eta=0.0,
            seed=11,
            chunk_records=5,
            attrs={"model_hash": "abc"},
            device=torch.device("cpu"),
        )
    root = open_calibration(store)
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
