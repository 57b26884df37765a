"""The autocast param on CPU (bf16), and the device helpers; the CUDA paths are not tested here."""

import copy

import numpy as np
import pytest
import torch
import zarr
from diffusers import DDPMScheduler

from helpers import TwoConvs
from pipeline.eval.sampling import fill_samples
from pipeline.infra.device import autocast, to_device
from pipeline.method.adaround import AdaRoundSettings, adaround
from pipeline.method.weight_init import init_weight_quantizers
from pipeline.models.diffusion import ddim_scheduler
from pipeline.quant import QuantSpec, quantize


def test_unknown_autocast_mode_is_refused():
    with pytest.raises(ValueError, match="unknown autocast mode 'int8'"):
        autocast(torch.device("cpu"), "int8")


def test_to_device_on_cpu_is_the_same_tensor():
    x = torch.ones(3)
    assert to_device(x, torch.device("cpu")) is x


def test_bf16_sampling_is_close_to_float32_but_not_equal(tiny_unet, tmp_path):
    scheduler = ddim_scheduler(DDPMScheduler(num_train_timesteps=1000), steps=2)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    for name, precision in (("none", "none"), ("bf16", "bf16")):
        root.create_array(name, shape=(4, 1, 16, 16), chunks=(4, 1, 16, 16), dtype="float32")
        fill_samples(tiny_unet, scheduler, root[name], 4, 0.0, 3, torch.device("cpu"), name, precision=precision)
    fp32, bf16 = root["none"][:], root["bf16"][:]
    assert np.isfinite(bf16).all() and not np.array_equal(fp32, bf16)
    np.testing.assert_allclose(bf16, fp32, atol=0.1)


def test_bf16_reconstruction_learns_a_rounding():
    torch.manual_seed(0)
    fp = TwoConvs().eval().requires_grad_(False)
    q = copy.deepcopy(fp)
    layers = quantize(q, QuantSpec(w_bits=4))
    init_weight_quantizers(layers, 10, 2.4)
    settings = AdaRoundSettings(
        iters=30,
        lr=1e-2,
        batch_size=8,
        reg_lambda=0.01,
        beta_start=20,
        beta_end=2,
        warmup=0.2,
        seed=0,
        precision="bf16",
    )
    report = adaround(q, fp, (torch.randn(16, 4, 8, 8), torch.zeros(16)), settings)
    assert set(report) == {"a", "b"} and all(np.isfinite(r["after"]) for r in report.values())
