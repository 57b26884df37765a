"""Q-Diffusion's shared activation parameters: one range per layer and part for every step, initialised
by an Lp search at each layer's first call (the layers before quantized), then learned block by block."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_numerics import CPU, PER_STEP, STEPS, trajectory_store

from helpers import TwoConvs
from pipeline.method.activation_ranges import (
    StepLearning,
    calibrate_activations,
    init_shared_activations,
    learn_unit_steps,
)
from pipeline.method.weight_init import init_weight_quantizers
from pipeline.quant import QuantSpec, quantize
from pipeline.quant.layers import QuantLayer

A_BITS = 4
GRID = 60
P = 2.4


class OneLayer(nn.Module):
    """One QuantLayer called as model(x, t): its act quantizer sees the records themselves (over γ)."""

    def __init__(self, split: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.conv = QuantLayer(nn.Conv2d(4, 2, 1), 8, A_BITS, STEPS, split)

    def forward(self, x, t):
        return self.conv(x)


def every_record(root):
    """All records of a trajectory store as model inputs (x, t), and their step indices."""
    x = torch.from_numpy(root["trajectory/x_t"][:])
    t = torch.from_numpy(root["trajectory/t"][:])
    return (x, t), torch.from_numpy(root["trajectory/step"][:]).long()


def lp_error(x: torch.Tensor, lo: float, hi: float) -> float:
    """sum |x - Q(x)|^P with the asymmetric A_BITS-bit grid on [min(lo, 0), max(hi, 0)], in float64."""
    x = x.double()
    levels = 2**A_BITS - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / levels
    zero_point = round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, levels)
    return float(((q - zero_point) * scale - x).abs().pow(P).sum())


def test_every_step_slot_holds_the_same_parameters(tiny_unet, tmp_path):
    layers = quantize(tiny_unet, QuantSpec(w_bits=8, a_bits=8, num_steps=STEPS))
    init_weight_quantizers(layers, grid=10, p=2.4)
    x = np.random.default_rng(0).standard_normal((STEPS * PER_STEP, 1, 16, 16), dtype=np.float32)
    root = trajectory_store(tmp_path / "calib.zarr", x * 2)
    for layer in layers.values():  # per-step leftovers that the initialisation must overwrite
        aq = layer.act_quantizer
        aq.scale.uniform_(1, 2)
        aq.zero_point.random_(0, 255)
        aq.exponent.random_(1, 3)
    assert any(layer.act_quantizer.num_parts == 2 for layer in layers.values())

    init_shared_activations(tiny_unet, layers, *every_record(root), GRID, P)
    for name, layer in layers.items():
        aq = layer.act_quantizer
        for buffer in (aq.scale, aq.zero_point, aq.running_min, aq.running_max):
            assert torch.equal(buffer, buffer[:1].expand_as(buffer)), name
        assert (aq.scale < 1).any() or (aq.scale > 2).any(), name  # not the leftovers
        assert not aq.exponent.any() and aq.calibrated.all() and layer.quantize_acts, name


def test_planted_outliers_are_clipped_to_the_least_lp_error(tmp_path):
    model = OneLayer(split=2)  # channels 0-1 are part 0, channels 2-3 part 1
    gamma = torch.tensor([1.0, 2.0, 0.5, 1.0])
    model.conv.gamma.copy_(gamma)
    x = torch.randn(STEPS * PER_STEP, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x[5, 0, 3, 3], x[9, 1, 0, 0], x[2, 0, 7, 1] = 40.0, -30.0, 35.0  # outliers in part 0
    root = trajectory_store(tmp_path / "calib.zarr", x.numpy())

    init_shared_activations(model, {"conv": model.conv}, *every_record(root), GRID, P)

    aq = model.conv.act_quantizer
    seen = x / gamma.view(1, -1, 1, 1)
    for part, channels in enumerate((slice(0, 2), slice(2, 4))):
        values = seen[:, channels]
        lo, hi = float(aq.running_min[0, part]), float(aq.running_max[0, part])
        chosen = lp_error(values, lo, hi)
        best = min(
            lp_error(values, float(values.min()) * (1 - 0.01 * i), float(values.max()) * (1 - 0.01 * i))
            for i in range(GRID)
        )
        assert chosen <= best * (1 + 1e-5), (part, chosen, best)
        expected_scale = (max(hi, 0.0) - min(lo, 0.0)) / (2**A_BITS - 1)
        assert torch.allclose(aq.scale[:, part], torch.tensor(expected_scale), rtol=1e-5)
    outliers = seen[:, :2]
    assert aq.running_max[0, 0] < outliers.max() and aq.running_min[0, 0] > outliers.min()  # r < 1


def test_a_layer_chooses_on_the_quantized_output_of_the_layers_before():
    """Layer b's range is searched on what b gets with a quantized: the same as a search on a's quantized
    output, and not the one on a's full-precision output."""
    torch.manual_seed(0)
    model = TwoConvs()
    layers = quantize(model, QuantSpec(w_bits=8, a_bits=2, num_steps=1))
    init_weight_quantizers(layers, grid=10, p=2.4)
    x, t = torch.randn(16, 4, 8, 8), torch.zeros(16)
    init_shared_activations(model, layers, (x, t), torch.zeros(16, dtype=torch.long), GRID, P)
    b_range = layers["b"].act_quantizer.running_max.clone()

    with torch.no_grad():
        fp_input = torch.relu(model.a.module(x))
        q_input = torch.relu(model.a(x))
    for seen, expected in ((q_input, True), (fp_input, False)):
        alone = QuantLayer(copy.deepcopy(model.b.module), 8, 2, 1, None)
        init_shared_activations(alone, {"b": alone}, (seen,), torch.zeros(16, dtype=torch.long), GRID, P)
        assert torch.equal(alone.act_quantizer.running_max, b_range) is expected


def test_shared_parameters_are_not_the_per_step_ones(tmp_path):
    x = torch.randn(STEPS * PER_STEP, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    magnitude = torch.repeat_interleave(10.0 ** torch.arange(STEPS), PER_STEP)  # step s: 10^s
    root = trajectory_store(tmp_path / "calib.zarr", (x * magnitude.view(-1, 1, 1, 1)).numpy())
    per_step, shared = OneLayer(), OneLayer()

    calibrate_activations(per_step, {"conv": per_step.conv}, root, PER_STEP, PER_STEP, 0.95, CPU)
    init_shared_activations(shared, {"conv": shared.conv}, *every_record(root), GRID, P)

    per_step_scale, shared_scale = per_step.conv.act_quantizer.scale[:, 0], shared.conv.act_quantizer.scale[:, 0]
    assert per_step_scale[3] > 100 * per_step_scale[0]  # the steps differ as planted
    assert (shared_scale == shared_scale[0]).all()
    assert (shared_scale[:3] > 5 * per_step_scale[:3]).all()  # the early steps get the late steps' range


def test_a_scaled_input_that_overflows_names_the_layer_and_step(tmp_path):
    """(A NaN input of a UNet is named by tests/test_numerics.py, for both calibrations.)"""
    model = OneLayer()
    model.conv.gamma[1] = 1e-3
    x = np.ones((STEPS * PER_STEP, 4, 8, 8), dtype=np.float32)
    x[7, 1, 0, 0] = 1e38  # record 7 = step 2
    root = trajectory_store(tmp_path / "overflow.zarr", x)
    with pytest.raises(FloatingPointError, match=r"the input range of conv is not finite \(NaN or Inf\) at step 2"):
        init_shared_activations(model, {"conv": model.conv}, *every_record(root), GRID, P)


def test_the_ratio_chunks_do_not_change_the_choice(tiny_unet, tmp_path, monkeypatch):
    """All ratios in one chunk, or a few ratios per chunk (a large input's case, forced here with a
    small chunk budget): the same parameters, bit for bit."""
    layers = quantize(tiny_unet, QuantSpec(w_bits=8, a_bits=A_BITS, num_steps=STEPS))
    init_weight_quantizers(layers, grid=10, p=2.4)
    x = np.random.default_rng(3).standard_normal((STEPS * PER_STEP, 1, 16, 16), dtype=np.float32)
    records = every_record(trajectory_store(tmp_path / "calib.zarr", x))
    init_shared_activations(tiny_unet, layers, *records, GRID, P)
    whole = {name: copy.deepcopy(layer.act_quantizer.state_dict()) for name, layer in layers.items()}
    smallest_input = STEPS * PER_STEP * 16 * 8 * 8  # all records with the tiny UNet's narrowest inputs, or more
    monkeypatch.setattr("pipeline.method.activation_ranges.RATIO_CHUNK_ELEMENTS", 7 * smallest_input)
    init_shared_activations(tiny_unet, layers, *records, GRID, P)
    for name, layer in layers.items():
        for key, value in layer.act_quantizer.state_dict().items():
            assert torch.equal(value, whole[name][key]), (name, key)


def test_learned_steps_lower_a_planted_blocks_error_against_the_initialisation():
    """A block of two convs, weights frozen to integers, activations at 3 bits on heavy-tailed inputs:
    the steps learned on its FP inputs and outputs give a lower Lp error of the block output than the
    initialisation's, on held-out records; every step slot keeps one shared step."""
    torch.manual_seed(0)
    fp = TwoConvs().eval()
    block = copy.deepcopy(fp)
    layers = quantize(block, QuantSpec(w_bits=8, a_bits=3, num_steps=STEPS))
    init_weight_quantizers(layers, grid=10, p=2.4)
    for layer in layers.values():
        layer.load_integer_weight(layer.integer_weight())
        layer.quantize_weights = True
    x = torch.distributions.StudentT(3.0).sample((96, 4, 8, 8))
    train, held_out = x[:64], x[64:]
    t = torch.zeros(64)
    init_shared_activations(block, layers, (train, t), torch.zeros(64, dtype=torch.long), GRID, P)

    def held_out_error() -> float:
        with torch.no_grad():
            return float((block(held_out, t[:32]) - fp(held_out, t[:32])).abs().pow(P).sum())

    initialised = held_out_error()
    with torch.no_grad():
        target = fp(train, t)
    settings = StepLearning(iters=300, lr=1e-2, batch_size=16, p=P, seed=0)
    report = learn_unit_steps("block", block, ((train, t), {}), target, settings)

    assert report["after"] < report["before"]
    assert held_out_error() < 0.97 * initialised  # 0.94 when written
    for layer in layers.values():
        aq = layer.act_quantizer
        assert aq.learned_scale is None and torch.equal(aq.scale, aq.scale[:1].expand_as(aq.scale))
