"""Q-Diffusion's shared activation parameters: one MSE-searched range per layer and part for every step."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_numerics import CPU, PER_STEP, STEPS, trajectory_store

from pipeline.method.activation_ranges import calibrate_activations, calibrate_shared_activations
from pipeline.method.weight_init import init_weight_quantizers
from pipeline.quant import QuantSpec, quantize
from pipeline.quant.layers import QuantLayer

A_BITS = 4
GRID = 60


class OneLayer(nn.Module):
    """One QuantLayer called as model(x, t): its act quantizer sees the records themselves (over γ)."""

    def __init__(self, split: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.conv = QuantLayer(nn.Conv2d(4, 2, 1), 8, A_BITS, STEPS, split)

    def forward(self, x, t):
        return self.conv(x)


def squared_error(x: torch.Tensor, lo: float, hi: float) -> float:
    """sum (x - Q(x))^2 with the asymmetric A_BITS-bit grid on [min(lo, 0), max(hi, 0)], in float64."""
    x = x.double()
    levels = 2**A_BITS - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / levels
    zero_point = round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, levels)
    return float((((q - zero_point) * scale - x) ** 2).sum())


def test_every_step_slot_holds_the_same_parameters_from_full_precision_inputs(tiny_unet, tmp_path):
    layers = quantize(tiny_unet, QuantSpec(w_bits=8, a_bits=8, num_steps=STEPS))
    init_weight_quantizers(layers, grid=10, p=2.4)
    x = np.random.default_rng(0).standard_normal((STEPS * PER_STEP, 1, 16, 16), dtype=np.float32)
    magnitude = np.repeat(np.float32([1, 3, 0.3, 2]), PER_STEP)[:, None, None, None]  # per step
    root = trajectory_store(tmp_path / "calib.zarr", x * magnitude)
    for layer in layers.values():  # per-step leftovers that the calibration must overwrite
        aq = layer.act_quantizer
        aq.scale.uniform_(1, 2)
        aq.zero_point.random_(0, 255)
        aq.exponent.random_(1, 3)
    assert any(layer.act_quantizer.num_parts == 2 for layer in layers.values())

    calibrate_shared_activations(tiny_unet, layers, root, PER_STEP, 2, GRID, CPU)
    first = {name: copy.deepcopy(layer.act_quantizer.state_dict()) for name, layer in layers.items()}
    for name, layer in layers.items():
        aq = layer.act_quantizer
        for buffer in (aq.scale, aq.zero_point, aq.running_min, aq.running_max):
            assert torch.equal(buffer, buffer[:1].expand_as(buffer)), name
        assert (aq.scale < 1).any() or (aq.scale > 2).any(), name  # not the leftovers
        assert not aq.exponent.any() and aq.calibrated.all() and layer.quantize_acts, name

    # again, now with activations quantized: the same parameters, so the inputs were full precision
    calibrate_shared_activations(tiny_unet, layers, root, PER_STEP, 2, GRID, CPU)
    for name, layer in layers.items():
        for key, value in layer.act_quantizer.state_dict().items():
            assert torch.equal(value, first[name][key]), (name, key)


def test_planted_outliers_are_clipped_to_the_least_squared_error(tmp_path):
    model = OneLayer(split=2)  # channels 0-1 are part 0, channels 2-3 part 1
    gamma = torch.tensor([1.0, 2.0, 0.5, 1.0])
    model.conv.gamma.copy_(gamma)
    x = torch.randn(STEPS * PER_STEP, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x[5, 0, 3, 3], x[9, 1, 0, 0], x[2, 0, 7, 1] = 40.0, -30.0, 35.0  # outliers in part 0
    root = trajectory_store(tmp_path / "calib.zarr", x.numpy())

    calibrate_shared_activations(model, {"conv": model.conv}, root, PER_STEP, 2, GRID, CPU)

    aq = model.conv.act_quantizer
    seen = x / gamma.view(1, -1, 1, 1)
    for part, channels in enumerate((slice(0, 2), slice(2, 4))):
        values = seen[:, channels]
        lo, hi = float(aq.running_min[0, part]), float(aq.running_max[0, part])
        chosen = squared_error(values, lo, hi)
        minmax = squared_error(values, float(values.min()), float(values.max()))
        best = min(
            squared_error(values, float(values.min()) * (1 - 0.01 * i), float(values.max()) * (1 - 0.01 * i))
            for i in range(GRID)
        )
        assert chosen <= minmax * (1 + 1e-6) and chosen <= best * (1 + 1e-5), (part, chosen, best, minmax)
        expected_scale = (max(hi, 0.0) - min(lo, 0.0)) / (2**A_BITS - 1)
        assert torch.allclose(aq.scale[:, part], torch.tensor(expected_scale), rtol=1e-5)
    outliers = seen[:, :2]
    assert aq.running_max[0, 0] < outliers.max() and aq.running_min[0, 0] > outliers.min()  # r < 1
    clipped = squared_error(outliers, float(aq.running_min[0, 0]), float(aq.running_max[0, 0]))
    assert clipped < squared_error(outliers, float(outliers.min()), float(outliers.max()))  # strictly better


def test_shared_parameters_are_not_the_per_step_ones(tmp_path):
    x = torch.randn(STEPS * PER_STEP, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    magnitude = torch.repeat_interleave(10.0 ** torch.arange(STEPS), PER_STEP)  # step s: 10^s
    root = trajectory_store(tmp_path / "calib.zarr", (x * magnitude.view(-1, 1, 1, 1)).numpy())
    per_step, shared = OneLayer(), OneLayer()

    calibrate_activations(per_step, {"conv": per_step.conv}, root, PER_STEP, PER_STEP, 0.95, CPU)
    calibrate_shared_activations(shared, {"conv": shared.conv}, root, PER_STEP, PER_STEP, GRID, CPU)

    per_step_scale, shared_scale = per_step.conv.act_quantizer.scale[:, 0], shared.conv.act_quantizer.scale[:, 0]
    assert per_step_scale[3] > 100 * per_step_scale[0]  # the steps differ as planted
    assert (shared_scale == shared_scale[0]).all()
    assert (shared_scale[:3] > 5 * per_step_scale[:3]).all()  # the early steps get the late steps' range


def test_a_scaled_input_that_overflows_names_the_layer_and_step(tmp_path):
    """(A NaN input of a UNet is named by tests/test_numerics.py, for both calibrations.)"""
    # a finite record that overflows in x / γ: the scaled input is what gets checked
    model = OneLayer()
    model.conv.gamma[1] = 1e-3
    x = np.ones((STEPS * PER_STEP, 4, 8, 8), dtype=np.float32)
    x[7, 1, 0, 0] = 1e38  # record 7 = step 2
    root = trajectory_store(tmp_path / "overflow.zarr", x)
    with pytest.raises(FloatingPointError, match=r"the input range of conv is not finite \(NaN or Inf\) at step 2"):
        calibrate_shared_activations(model, {"conv": model.conv}, root, PER_STEP, PER_STEP, GRID, CPU)


def test_the_ratio_chunks_do_not_change_the_choice(tiny_unet, tmp_path, monkeypatch):
    """All ratios in one chunk, or a few ratios per chunk (a large input's case, forced here with a
    small chunk budget): the same parameters, bit for bit."""
    layers = quantize(tiny_unet, QuantSpec(w_bits=8, a_bits=A_BITS, num_steps=STEPS))
    init_weight_quantizers(layers, grid=10, p=2.4)
    x = np.random.default_rng(3).standard_normal((STEPS * PER_STEP, 1, 16, 16), dtype=np.float32)
    root = trajectory_store(tmp_path / "calib.zarr", x)
    calibrate_shared_activations(tiny_unet, layers, root, PER_STEP, 2, GRID, CPU)
    whole = {name: copy.deepcopy(layer.act_quantizer.state_dict()) for name, layer in layers.items()}
    smallest_input = 2 * 16 * 8 * 8  # a batch of 2 with the tiny UNet's narrowest inputs, or more
    monkeypatch.setattr("pipeline.method.activation_ranges.RATIO_CHUNK_ELEMENTS", 7 * smallest_input)
    calibrate_shared_activations(tiny_unet, layers, root, PER_STEP, 2, GRID, CPU)
    for name, layer in layers.items():
        for key, value in layer.act_quantizer.state_dict().items():
            assert torch.equal(value, whole[name][key]), (name, key)
