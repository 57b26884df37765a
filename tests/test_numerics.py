"""Non-finite numbers stop a stage with the layer (or unit) and the step; zero ranges divide nothing by zero."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import zarr
from diffusers import DDPMScheduler

from helpers import TwoConvs
from pipeline.calibration.dump import dump_calibration, random_records, step_records
from pipeline.method.activation_ranges import calibrate_activations, init_shared_activations
from pipeline.method.adaround import AdaRoundSettings, adaround
from pipeline.method.les import learn_gamma
from pipeline.method.pts import vote
from pipeline.method.weight_init import init_weight_quantizers
from pipeline.method.weighting import make_weighting
from pipeline.models.diffusion import ddim_scheduler
from pipeline.quant import QuantSpec, quantizable_layers, quantize
from pipeline.quant.layers import QuantLayer
from pipeline.quant.quantizers import ActQuantizer, affine_params, search_weight_params

STEPS, PER_STEP = 4, 3
CPU = torch.device("cpu")
SETTINGS = AdaRoundSettings(
    iters=20, lr=1e-2, batch_size=8, reg_lambda=0.01, beta_start=20, beta_end=2, warmup=0.2, seed=0
)


def trajectory_store(path, x):
    root = zarr.open_group(str(path), mode="w")
    root.attrs.update({"steps": STEPS, "num_samples": PER_STEP})
    root.create_array("trajectory/x_t", data=x)
    root.create_array("trajectory/t", data=np.repeat(np.arange(STEPS, 0, -1) * 100, PER_STEP))
    root.create_array("trajectory/step", data=np.repeat(np.arange(STEPS, dtype=np.int32), PER_STEP))
    return root


def test_non_finite_trajectory_names_the_step(tmp_path):
    x = np.zeros((STEPS * PER_STEP, 1, 4, 4), dtype=np.float32)
    x[10, 0, 0, 0] = np.nan  # record 10 = step 3
    root = trajectory_store(tmp_path / "calib.zarr", x)
    step_records(root, 2, PER_STEP)
    with pytest.raises(ValueError, match=r"calib\.zarr: trajectory x_t is not finite \(NaN or Inf\) at step 3"):
        step_records(root, 3, PER_STEP)
    with pytest.raises(ValueError, match="at step 3"):
        random_records(root, STEPS * PER_STEP, seed=0)


def dump(unet, path):
    scheduler = ddim_scheduler(DDPMScheduler(num_train_timesteps=1000), steps=STEPS)
    dump_calibration(
        path,
        unet,
        scheduler,
        quantizable_layers(unet),
        num_samples=2,
        layer_records_per_step=2,
        layer_io_gb=1.0,
        batch_size=2,
        eta=0.0,
        seed=0,
        chunk_records=4,
        attrs={},
        device=torch.device("cpu"),
    )


def test_dump_stops_at_a_non_finite_trajectory(tiny_unet, tmp_path):
    with torch.no_grad():
        tiny_unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"trajectory is not finite \(NaN or Inf\) at step 1"):
        dump(tiny_unet, tmp_path / "calib.zarr")


def test_dump_stops_at_a_float16_overflow_naming_layer_and_step(tiny_unet, tmp_path):
    with torch.no_grad():
        tiny_unet.down_blocks[0].resnets[0].conv1.weight.mul_(1e6)  # GroupNorm after it keeps the model finite
    with pytest.raises(
        FloatingPointError, match=r"layer 'down_blocks\.0\.resnets\.0\.conv1' output overflows float16 at step 0"
    ):
        dump(tiny_unet, tmp_path / "calib.zarr")


def quantized_pair(zero_channel=False):
    torch.manual_seed(0)
    fp = TwoConvs().eval()
    if zero_channel:
        with torch.no_grad():
            fp.a.weight[3] = 0  # an output channel whose weights are all zero
            fp.b.weight[:, 5] = 0  # an input channel that no weight reads
    q = copy.deepcopy(fp)
    layers = quantize(q, QuantSpec(w_bits=3, split=()))
    init_weight_quantizers(layers, grid=10, p=2.4)
    return fp, q, layers


def test_non_finite_adaround_loss_names_unit_and_iteration():
    fp, q, _ = quantized_pair()
    x, t = torch.randn(16, 4, 8, 8), torch.zeros(16, dtype=torch.long)
    x[3, 0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"AdaRound loss is (nan|inf) in a at iteration \d+"):
        adaround(q, fp, (x, t), SETTINGS)


@pytest.mark.parametrize(
    "calibrate",
    [
        lambda unet, layers, root: calibrate_activations(unet, layers, root, PER_STEP, PER_STEP, 0.95, CPU),
        lambda unet, layers, root: init_shared_activations(
            unet,
            layers,
            (torch.from_numpy(root["trajectory/x_t"][:]), torch.from_numpy(root["trajectory/t"][:])),
            torch.from_numpy(root["trajectory/step"][:]).long(),
            5,
            2.4,
        ),
    ],
    ids=["per-step", "shared"],
)
def test_non_finite_activation_range_names_layer_and_step(tiny_unet, tmp_path, calibrate):
    layers = quantize(tiny_unet, QuantSpec(w_bits=8, a_bits=8, num_steps=STEPS))
    root = trajectory_store(
        tmp_path / "calib.zarr",
        np.random.default_rng(0).standard_normal((STEPS * PER_STEP, 1, 16, 16), dtype=np.float32),
    )
    with torch.no_grad():
        tiny_unet.conv_in.bias[0] = float("nan")  # full precision, so the first quantized layer sees it
    with pytest.raises(
        FloatingPointError,
        match=r"activation calibration: the input range of down_blocks\.0\.resnets\.0\.conv1 "
        r"is not finite \(NaN or Inf\) at step 0",
    ):
        calibrate(tiny_unet, layers, root)


def test_zero_range_channels_and_layers_divide_nothing_by_zero():
    # LES on a layer with a dead input channel, and on a layer whose whole input is zero
    linear = nn.Linear(6, 4)
    x = torch.randn(STEPS * 8, 5, 6)
    x[..., 2] = 0
    for inputs in (x, torch.zeros_like(x)):
        layer = QuantLayer(linear, 4, 8, 1, None)
        with torch.no_grad():
            outputs = linear(inputs)
        gamma, before, after = learn_gamma(
            layer,
            inputs.half(),
            outputs.half(),
            STEPS,
            make_weighting("focal", STEPS),
            iters=20,
            lr=1e-2,
            batch_size=8,
            seed=0,
        )
        assert torch.isfinite(gamma).all() and np.isfinite([before, after]).all()

    # weight scales for an all-zero output channel, and AdaRound on it
    fp, q, layers = quantized_pair(zero_channel=True)
    scale, zero_point = search_weight_params(fp.a.weight, torch.zeros(4, dtype=torch.long), 1, 3, 10, 2.4)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    inputs = (torch.randn(16, 4, 8, 8), torch.zeros(16, dtype=torch.long))
    report = adaround(q, fp, inputs, SETTINGS)
    assert all(np.isfinite([r["before"], r["after"]]).all() for r in report.values())
    assert torch.equal(layers["a"].weight_quantizer(layers["a"].scaled_weight())[3], torch.zeros_like(fp.a.weight[3]))

    # activation ranges and PTS votes on a zero channel / a zero tensor
    scale, zero_point = affine_params(torch.tensor(0.0), torch.tensor(0.0), 8)
    assert scale > 0 and zero_point == 0
    aq = ActQuantizer(3, torch.zeros(3, dtype=torch.long), 1, 8, 1)
    aq.calibrating = True
    assert torch.equal(aq(torch.zeros(2, 3, 4, 4), channel_dim=1), torch.zeros(2, 3, 4, 4))
    x = torch.randn(16, 3, 4, 4)
    x[:, 1] = 0
    result = vote(x, torch.full((3,), 0.05), torch.full((3,), 128.0), 8, 4, 0.85, channel_dim=1)
    assert result["k"][1] == 3 and result["agreement"][1] == 1  # every k exact: the tie goes to the finest step
