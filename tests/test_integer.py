"""The int8 backend (pipeline/deploy/integer.py) against the fake-quantized model it replaces, and against an
independent float64 computation of a layer with planted PTS exponents and a split."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from diffusers import DDPMScheduler

from helpers import ROOT, run, set_params
from pipeline.config import ConfigError, parse_config
from pipeline.deploy.integer import (
    IntegerLayer,
    int8_kernels_available,
    integer_layers,
    kernels_add_pairs_in_int16,
    to_integer,
    weight_bytes,
)
from pipeline.eval.sampling import read_samples
from pipeline.method.weight_init import init_weight_quantizers
from pipeline.models.diffusion import ddim_sample, ddim_scheduler, sample_noise
from pipeline.models.embedded import build_unet
from pipeline.quant import QuantSpec, quant_layers, quantize, set_step
from pipeline.quant.layers import QuantLayer
from tiny_models import _unet2d

pytestmark = pytest.mark.skipif(not int8_kernels_available(), reason="oneDNN int8 kernels need an x86 build of torch")

STEPS = 4
# Measured on this code: one layer on the same input differs from the fake path by at most 3e-7 of the
# output's range (float32 rounding of the dequantized GEMM); the bound leaves a margin of 30.
LAYER_BOUND = 1e-5


def _scheduler():
    return ddim_scheduler(DDPMScheduler(num_train_timesteps=1000), STEPS)


def fake_quantized(fp: nn.Module, w_bits: int = 4, a_bits: int = 8, batch: int = 4, seed: int = 0) -> nn.Module:
    """A W/A copy of ``fp`` as the sample stage runs it: random LES γ, stored integer weights, per-step
    activation parameters from one calibration run, random PTS exponents on the shortcut convs."""
    q = copy.deepcopy(fp)
    # both decoder splits, the case the bounds below were measured on (docs/method.md §7: split parts are summed)
    layers = quantize(q, QuantSpec(w_bits=w_bits, a_bits=a_bits, num_steps=STEPS, split=("conv1", "conv_shortcut")))
    g = torch.Generator().manual_seed(seed)
    for layer in layers.values():
        layer.gamma.copy_(torch.rand(layer.gamma.shape, generator=g) + 0.5)
    init_weight_quantizers(layers, 10, 2.4)
    for name, layer in layers.items():
        layer.load_integer_weight(layer.integer_weight())
        layer.quantize_acts = True
        layer.act_quantizer.calibrating = True
        if name.endswith("conv_shortcut"):
            exponent = layer.act_quantizer.exponent
            exponent.copy_(torch.randint(0, 4, exponent.shape, generator=g))
    cfg = fp.config
    noise = sample_noise(seed, torch.arange(batch), STEPS, (cfg.in_channels, cfg.sample_size, cfg.sample_size))
    with torch.no_grad():
        ddim_sample(q, _scheduler(), noise, 0.0, lambda s, t, x: set_step(q, s))
    for layer in layers.values():
        layer.act_quantizer.calibrating = False
    return q


def _grouped(layer: IntegerLayer) -> bool:
    """Whether some step of ``layer`` runs as exponent groups (more GEMMs than parts)."""
    return any(len(gemms) > layer.act_quantizer.parts.max() + 1 for gemms in layer.gemms)


# The path this machine's kernels take (None), and the decision for kernels that add pairs in int16 forced on
# (True): on a VNNI / AMX machine the second runs the non-VNNI decision on real kernels, on another it is the first.
@pytest.fixture(scope="module", params=[("tiny", None), ("default", None), ("tiny", True)], ids=str)
def models(request):
    model, int16_pairs = request.param
    torch.manual_seed(0)
    fp = _unet2d(3) if model == "tiny" else build_unet(16, (32, 64, 64), 1, 8)
    fp = fp.eval().requires_grad_(False)
    fake = fake_quantized(fp)
    integer = copy.deepcopy(fake)
    layers = to_integer(integer, int16_pairs)
    if int16_pairs or kernels_add_pairs_in_int16():  # A8 with PTS: some fold exceeds the int16 bound
        assert any(_grouped(layer) for layer in layers.values())
    return fp, fake, integer


def _inputs(unet, batch=4, seed=5):
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)


def test_every_quantized_layer_runs_integer_and_the_others_stay_float(models):
    fp, fake, integer = models
    # no fake layer is left: every QuantLayer of the converted model is an IntegerLayer
    assert set(integer_layers(integer)) == set(quant_layers(fake)) == set(quant_layers(integer))
    for name, module in integer.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):  # what is left as float is what the pipeline keeps FP
            assert name not in quant_layers(fake), name


@torch.no_grad()
def test_each_layer_equals_the_fake_layer_on_the_same_input(models):
    _, fake, integer = models
    fake_layers, int_layers = quant_layers(fake), integer_layers(integer)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0])) for n, m in fake_layers.items()]
    x = _inputs(fake)
    worst = 0.0
    try:
        for s, t in enumerate(_scheduler().timesteps):
            set_step(fake, s), set_step(integer, s)
            fake(x, t)
            for name, layer in fake_layers.items():
                a, b = layer(inputs[name].clone()), int_layers[name](inputs[name].clone())
                worst = max(worst, float((a - b).abs().max() / (a.max() - a.min())))
    finally:
        for hook in hooks:
            hook.remove()
    assert worst < LAYER_BOUND, worst


def _in_float64(fake: nn.Module) -> nn.Module:
    """The fake-quantized model computed in float64: the same codes but where float32 rounding puts a value
    on the other side of a rounding boundary."""
    wide = copy.deepcopy(fake).double()
    for layer in quant_layers(wide).values():
        layer.frozen_weight = layer.frozen_weight.double()
    return wide


@torch.no_grad()
def test_one_denoiser_call_matches_the_fake_model(models):
    """Each layer is exact up to float32 rounding (above); through the whole UNet that rounding now and then
    puts a value on the other side of a later quantizer's rounding boundary, in the fake model as much as in
    the int8 one. So both are held against the fake model in float64. Measured (default UNet, 4 steps):
    int8 median 7e-6, mean 1.1e-3, max 1.6e-2 of the output range; fake float32 median 2.2e-3, mean 3.3e-3,
    max 2.3e-2."""
    fp, fake, integer = models
    wide = _in_float64(fake)
    x = _inputs(fake)
    for s, t in enumerate(_scheduler().timesteps):
        set_step(fake, s), set_step(integer, s), set_step(wide, s)
        a, b, ref = fake(x, t).sample, integer(x, t).sample, wide(x.double(), t).sample.float()
        span = float(ref.max() - ref.min())
        int8, fake32 = (b - ref).abs() / span, (a - ref).abs() / span
        assert float(int8.median()) < 1e-4 and float(int8.max()) < 0.05, (s, int8.median(), int8.max())
        assert float(int8.mean()) <= float(fake32.mean()) + 2e-3, (s, int8.mean(), fake32.mean())
        # far closer to the fake model than the fake model is to FP: the integer path is not merely "close to FP"
        assert float((a - b).abs().mean()) < 0.1 * float((a - fp(x, t).sample).abs().mean())


def _psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10((ref.max() - ref.min()) ** 2 / ((a.float() - ref.float()) ** 2).mean()))


@torch.no_grad()
def test_full_sampling_agrees_with_fake_quantized_samples(models):
    """Measured (4 DDIM steps, 8 samples, seeds 7 and 8): int8 vs fake 94 / 59 dB on the tiny UNet,
    35.5 / 34.6 dB on the default one, where the fake model in float32 is itself 34.1 / 33.4 dB from the
    fake model in float64 and int8 is 38.1 / 36.1 dB from it; fake vs FP: 14-15 dB."""
    fp, fake, integer = models
    wide = _in_float64(fake)
    cfg = fake.config
    noise = sample_noise(7, torch.arange(4), STEPS, (cfg.in_channels, cfg.sample_size, cfg.sample_size))
    out = {
        name: ddim_sample(m, _scheduler(), noise.to(dtype), 0.0, lambda s, t, x, m=m: set_step(m, s))
        for name, m, dtype in [
            ("fake", fake, torch.float32),
            ("int8", integer, torch.float32),
            ("wide", wide, torch.float64),
            ("fp", fp, torch.float32),
        ]
    }
    assert _psnr(out["int8"], out["wide"]) >= min(_psnr(out["fake"], out["wide"]) - 3, 40)
    assert _psnr(out["int8"], out["fake"]) > 30
    assert _psnr(out["int8"], out["fake"]) > _psnr(out["fp"], out["fake"]) + 15


def test_integer_model_holds_int8_weights_not_float_copies(models):
    fp, fake, integer = models
    fake_layers = quant_layers(fake)
    for name, layer in integer_layers(integer).items():
        weight_numel = fake_layers[name].module.weight.numel()
        assert not list(layer.parameters())
        assert all(t.numel() < weight_numel for t in layer.buffers()), name  # per-channel / per-step numbers only
        assert all(gemm.packed.dtype == torch.int8 for pattern in layer.gemms for gemm in pattern)
    quantized_weights = sum(layer.module.weight.numel() for layer in fake_layers.values())
    sizes = weight_bytes(integer)
    # one byte per weight, times the PTS exponent patterns of the shortcuts (at most STEPS)
    assert quantized_weights <= sizes["integer"] <= STEPS * quantized_weights
    layer_buffers = sum(t.nbytes for layer in integer_layers(integer).values() for t in layer.buffers())
    assert sizes["float"] <= weight_bytes(fp)["float"] - 4 * quantized_weights + layer_buffers
    # the fake model holds two float32 copies of every quantized weight (FP and frozen)
    assert weight_bytes(fake)["float"] >= weight_bytes(fp)["float"] + 4 * quantized_weights


# ---------------------------------------------------------------- one layer against float64 by hand


def _planted_layer(module: nn.Module, split: int | None, w_bits: int = 4, a_bits: int = 8) -> QuantLayer:
    g = torch.Generator().manual_seed(11)
    layer = QuantLayer(module, w_bits, a_bits, num_steps=3, split=split)
    c_in = module.weight.shape[1]
    with torch.no_grad():
        layer.gamma.copy_(torch.rand(c_in, generator=g) + 0.5)
        layer.weight_quantizer.init_params(layer.scaled_weight(), 10, 2.4)
        layer.load_integer_weight(layer.integer_weight())
        act = layer.act_quantizer
        act.scale.copy_(torch.rand(act.scale.shape, generator=g) * 0.05 + 0.01)
        act.zero_point.copy_(torch.randint(0, 2**a_bits, act.zero_point.shape, generator=g).float())
        act.exponent.copy_(torch.randint(0, 4, act.exponent.shape, generator=g))
        act.exponent[1] = 0  # a step without PTS next to steps with it
    layer.quantize_weights = layer.quantize_acts = True
    return layer


def _by_hand(layer: QuantLayer, x: torch.Tensor, step: int) -> torch.Tensor:
    """Float64, from the layer's stored numbers and docs/method.md#the-quantized-layer, not from its code."""
    act, wq = layer.act_quantizer, layer.weight_quantizer
    parts = act.parts
    delta = act.scale[step].double()[parts] * 2.0 ** -act.exponent[step].double()
    zero = act.zero_point[step].double()[parts]
    shape = [1, -1, 1, 1] if layer.is_conv else [1, -1]
    xs = x.double() / layer.gamma.double().view(shape)
    codes = torch.clamp(torch.round(xs / delta.view(shape)) + zero.view(shape), 0, 2**act.bits - 1)
    x_hat = (codes - zero.view(shape)) * delta.view(shape)
    w_scale = wq.scale.double()[:, parts]
    w_zero = wq.zero_point.double()[:, parts]
    w_int = layer.integer_weight().double()
    w_shape = (*w_scale.shape, *([1] * (w_int.ndim - 2)))
    w_hat = (w_int - w_zero.view(w_shape)) * w_scale.view(w_shape)
    m = layer.module
    bias = None if m.bias is None else m.bias.double()
    return F.conv2d(x_hat, w_hat, bias, m.stride, m.padding) if layer.is_conv else F.linear(x_hat, w_hat, bias)


@pytest.mark.parametrize("int16_pairs", [None, True], ids=["this-machine", "int16-pairs"])
@pytest.mark.parametrize("kind", ["conv3x3-split", "conv1x1-split", "linear"])
@torch.no_grad()
def test_planted_pts_and_split_through_the_integer_path(kind, int16_pairs):
    torch.manual_seed(3)
    if kind == "linear":
        module, split, x = nn.Linear(24, 16), None, torch.randn(2, 10, 24)
    else:
        k = 3 if kind == "conv3x3-split" else 1
        module, split, x = nn.Conv2d(24, 16, k, padding=k // 2), 10, torch.randn(2, 24, 6, 6)
    layer = _planted_layer(module, split)
    int16_pairs = kernels_add_pairs_in_int16() if int16_pairs is None else int16_pairs
    integer = IntegerLayer(copy.deepcopy(layer), "planted", int16_pairs)
    parts = 2 if split else 1
    assert len(integer.gemms) == 3 and len(integer.gemms[integer.step_pattern[1]]) == parts  # step 1: no PTS
    assert int16_pairs or not _grouped(integer)  # W4: kernels that accumulate in int32 never need the groups
    without_pts = copy.deepcopy(layer)
    without_pts.act_quantizer.exponent.zero_()
    for step in range(3):
        integer.act_quantizer.step = step
        ref = _by_hand(layer, x, step)
        out = integer(x).double()
        span = float(ref.max() - ref.min())
        assert float((out - ref).abs().max()) < LAYER_BOUND * span, step
        if step != 1:  # the planted exponents matter: ignoring them is far outside the bound
            assert float((out - _by_hand(without_pts, x, step)).abs().max()) > 100 * LAYER_BOUND * span


# ---------------------------------------------------------------- refusals


def test_w8_with_pts_is_refused_naming_the_layer():
    layer = _planted_layer(nn.Conv2d(8, 8, 1), None, w_bits=8)
    with pytest.raises(ValueError, match=r"planted: W8 weights .* outside int8"):
        IntegerLayer(layer, "planted", int16_pairs=False)


def test_each_layer_takes_one_gemm_per_part_where_the_int16_bound_allows_and_refuses_what_no_grouping_fits():
    """The decision for kernels that add pairs in int16, forced on any machine: 2 (2^a - 1) max|w| <= 32 767."""
    no_pts = _planted_layer(nn.Conv2d(8, 8, 1), None)
    no_pts.act_quantizer.exponent.zero_()
    assert all(len(gemms) == 1 for gemms in IntegerLayer(no_pts, "w4a8", True).gemms)  # 2 * 255 * 15 = 7650
    a6 = IntegerLayer(_planted_layer(nn.Conv2d(8, 8, 1), None, a_bits=6), "w4a6", True)  # 2 * 63 * 120 = 15120
    assert not _grouped(a6)
    w7 = _planted_layer(nn.Conv2d(8, 8, 1), None, w_bits=7)
    with pytest.raises(ValueError, match=r"w7a8: W7 weights .* 2 · 255 · \d+ = \d+ > 32767, .* int16"):
        IntegerLayer(copy.deepcopy(w7), "w7a8", True)
    IntegerLayer(w7, "w7a8", False)  # int32 accumulation: the groups (|w| <= 127) fit int8


@torch.no_grad()
def test_a_fold_that_saturates_int16_pairs_runs_exactly_as_exponent_groups():
    """Positive W4 weights folded by 8 (up to 120) on codes 255: each pair of products is up to 61 200, past
    int16. The grouped layer is exact on any machine; the folded one is exact only on kernels that accumulate
    in int32, and on the others it is saturated far outside float rounding."""
    module = nn.Conv2d(16, 8, 1)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.0)
    layer = _planted_layer(module, None)
    exponent = layer.act_quantizer.exponent
    exponent.zero_()
    exponent[:, :2] = 3  # e = 3: the other channels' weights folded by 8
    layer.act_quantizer.zero_point.zero_()
    x = torch.cat([torch.full((1, 16, 3, 3), 1e4), torch.rand(1, 16, 3, 3)])  # all codes 255, then mixed
    grouped = IntegerLayer(copy.deepcopy(layer), "grouped", int16_pairs=True)
    folded = IntegerLayer(copy.deepcopy(layer), "folded", int16_pairs=False)
    assert [len(g) for g in grouped.gemms] == [2] and [len(g) for g in folded.gemms] == [1]
    centered = layer.integer_weight() - layer.weight_quantizer.zero_point.view(-1, 1, 1, 1)
    assert 2 * 255 * int(centered[:, 2:].max()) * 8 > 32767  # the plant does reach past int16
    for step in range(3):
        grouped.act_quantizer.step = folded.act_quantizer.step = step
        ref = _by_hand(layer, x, step)
        span = float(ref.max() - ref.min())
        assert float((grouped(x).double() - ref).abs().max()) < LAYER_BOUND * span
        folded_error = float((folded(x).double() - ref).abs().max())
        if kernels_add_pairs_in_int16():
            assert folded_error > 0.1 * span, step
        else:
            assert folded_error < LAYER_BOUND * span, step


def test_a_refusal_leaves_the_model_unchanged():
    fp = _unet2d(3).eval().requires_grad_(False)
    fake = fake_quantized(fp, w_bits=8)
    before = {name: layer for name, layer in quant_layers(fake).items()}
    with pytest.raises(ValueError, match="outside int8"):
        to_integer(fake)
    assert quant_layers(fake) == before


def test_the_sample_stage_runs_a_row_on_int8_kernels(pipeline_copy):
    """sample.backend int8: the stage samples the reduced pipeline's dmq row on the integer backend, and
    its samples agree with the fake-quantized ones of the same quantization seed and noise."""
    fake, _ = read_samples(pipeline_copy / "artifacts/samples/dmq-w4a6/q0.zarr")
    set_params(pipeline_copy, {"sample": {"backend": "int8"}})
    run([sys.executable, "-m", "stages.sample", "dmq-w4a6"], pipeline_copy)
    integer, attrs = read_samples(pipeline_copy / "artifacts/samples/dmq-w4a6/q0.zarr")
    assert attrs["params"]["sample.backend"] == "int8"
    for seed, images in fake.items():
        mse = (integer[seed] - images).pow(2).mean()
        assert 10 * torch.log10(4 / mse) > 20  # dB against the fake samples (peak-to-peak 2)
        assert not torch.equal(integer[seed], images)  # another path, not the fake one again


def test_int8_backend_is_refused_for_w8_rows_and_cuda_at_load_time():
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["sample"]["backend"] = "int8"
    data["weights"]["qdiff-w8"] = {"method": "qdiff", "w_bits": 8}
    data["rows"]["qdiff-w8a8"] = {"weights": "qdiff-w8", "a_bits": 8}
    with pytest.raises(ConfigError, match=r"sample\.backend: int8 cannot run rows\.qdiff-w8a8 \(W8\)"):
        parse_config(data)
    del data["rows"]["qdiff-w8a8"]
    parse_config(data)
    data["device"] = "cuda"
    with pytest.raises(ConfigError, match=r"sample\.backend: int8 runs on the CPU's int8 kernels"):
        parse_config(data)
