"""Quantized attention matmuls: the explicit processor computes diffusers' attention, its matmul inputs
take at most 2^bits values per step once calibrated, follow the sampling step, travel in the activation
artifact, learn with Q-Diffusion's shared steps, and bad settings fail at load time naming the key."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from test_numerics import PER_STEP, STEPS, trajectory_store

from pipeline.config import Config
from pipeline.method.activation_ranges import (
    StepLearning,
    calibrate_activations,
    init_shared_activations,
    learn_unit_steps,
)
from pipeline.method.weight_init import init_weight_quantizers
from pipeline.models.quantized import build_quantized
from pipeline.preflight import notices
from pipeline.quant import QuantSpec, quantize
from pipeline.quant.artifacts import act_tensors, weight_tensors
from pipeline.quant.attention import MATMUL_INPUTS, attention_modules, matmul_inputs, quantize_attention
from pipeline.quant.model import quantization, set_step
from tiny_models import text_unet

A_BITS, SOFTMAX_BITS = 4, 8


def quantized_with_attention(unet, a_bits=A_BITS):
    """``unet`` with weights, activations and attention matmuls quantized (weights initialised)."""
    layers = quantize(unet, QuantSpec(w_bits=8, a_bits=a_bits, num_steps=STEPS))
    init_weight_quantizers(layers, grid=10, p=2.4)
    inputs = quantize_attention(unet, a_bits, SOFTMAX_BITS, STEPS)
    return layers, inputs


def records(tmp_path, seed=0):
    x = np.random.default_rng(seed).standard_normal((STEPS * PER_STEP, 1, 16, 16), dtype=np.float32)
    return trajectory_store(tmp_path / "calib.zarr", x)


def capture_inputs(unet, inputs, *args):
    """The tensors each matmul input's quantizer returned in one forward pass."""
    seen = {}
    handles = [m.register_forward_hook(lambda m, a, out, n=n: seen.setdefault(n, out)) for n, m in inputs.items()]
    try:
        unet(*args)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@torch.no_grad()
def test_the_explicit_processor_computes_diffusers_attention(tiny_unet):
    """Quantizers off, the self-attention of a pixel UNet and the self- and cross-attention of a text
    UNet give diffusers' fused results (float rounding apart)."""
    torch.manual_seed(0)
    text = text_unet().eval()
    cases = [
        (tiny_unet, (torch.randn(2, 1, 16, 16), torch.tensor([10, 500]))),
        (text, (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 16))),
    ]
    for unet, args in cases:
        for attn in attention_modules(unet).values():
            attn.set_processor(AttnProcessor2_0())
        expected = unet(*args).sample
        layers = quantize(unet, QuantSpec(w_bits=8, a_bits=8, num_steps=STEPS))
        inputs = quantize_attention(unet, 8, SOFTMAX_BITS, STEPS)
        assert len(inputs) == 4 * len(attention_modules(unet)) > 0
        assert not any(layer.quantize_weights or layer.quantize_acts for layer in layers.values())
        torch.testing.assert_close(unet(*args).sample, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_calibrated_matmul_inputs_take_their_grid_per_step(tiny_unet, tmp_path):
    layers, inputs = quantized_with_attention(tiny_unet)
    calibrate_activations(
        tiny_unet, {**layers, **inputs}, records(tmp_path), PER_STEP, PER_STEP, 0.9, torch.device("cpu")
    )
    x, t = torch.randn(3, 1, 16, 16), torch.full((3,), 400)
    for step in (0, STEPS - 1):
        set_step(tiny_unet, step)  # sets the layers' step; the matmul inputs follow their attention's
        with quantization(layers.values(), weights=True):
            seen = capture_inputs(tiny_unet, inputs, x, t)
        assert len(seen) == len(inputs)
        for name, out in seen.items():
            aq = inputs[name].act_quantizer
            bits = SOFTMAX_BITS if name.endswith("probs") else A_BITS
            assert aq.bits == bits and aq.step == step, name
            codes = torch.round(out / aq.scale[step, 0]) + aq.zero_point[step, 0]
            assert torch.allclose(codes, codes.round().clamp(0, 2**bits - 1), atol=1e-3), name
            assert codes.round().unique().numel() <= 2**bits, name
        probs = [inputs[n].act_quantizer for n in inputs if n.endswith("probs")]
        assert all(aq.zero_point[step, 0] == 0 for aq in probs)  # the softmax output's range starts at 0
    first = inputs[next(iter(inputs))].act_quantizer
    assert not torch.equal(first.scale[0], first.scale[-1])  # per-step ranges


@torch.no_grad()
def test_matmul_inputs_travel_in_the_activation_artifact(tiny_unet, tmp_path):
    fresh, without_attention = copy.deepcopy(tiny_unet), copy.deepcopy(tiny_unet)
    layers, inputs = quantized_with_attention(tiny_unet)
    calibrate_activations(
        tiny_unet, {**layers, **inputs}, records(tmp_path), PER_STEP, PER_STEP, 0.9, torch.device("cpu")
    )
    act = act_tensors({**layers, **inputs})
    assert {f"{name}.act_scale" for name in inputs} <= set(act)
    spec = QuantSpec(w_bits=8, a_bits=A_BITS, num_steps=STEPS)
    build_quantized(fresh, spec, SOFTMAX_BITS, weight_tensors(layers), act, "weights", "act")
    loaded = matmul_inputs(fresh)
    assert set(loaded) == set(inputs) and all(m.quantize_acts for m in loaded.values())
    for name, m in loaded.items():
        assert torch.equal(m.act_quantizer.scale, inputs[name].act_quantizer.scale), name
    x, t = torch.randn(2, 1, 16, 16), torch.full((2,), 300)
    set_step(tiny_unet, 1), set_step(fresh, 1)
    with quantization(layers.values(), weights=True):
        expected = tiny_unet(x, t).sample
    torch.testing.assert_close(fresh(x, t).sample, expected)
    with pytest.raises(ValueError, match=r"processor\.\w+\.act_scale' and \d+ more matches no layer"):
        build_quantized(without_attention, spec, None, weight_tensors(layers), act, "weights", "act")


def test_shared_steps_initialise_and_learn_the_matmul_inputs():
    """Q-Diffusion's shared steps on a text UNet: the initialisation fills the matmul inputs' ranges, and
    the learning of a cross-attention block moves their steps and lowers its error against FP."""
    torch.manual_seed(0)
    unet = text_unet().eval()
    layers, inputs = quantized_with_attention(unet)
    (name, block), *_ = [(n, m) for n, m in unet.named_modules() if n.endswith("attentions.0")]
    context = torch.randn(8, 5, 16)
    fp_inputs = ((torch.randn(4, 8, 4, 4),), {"encoder_hidden_states": context[:4], "return_dict": False})
    with torch.no_grad(), quantization(layers.values(), weights=False):
        target = block(*fp_inputs[0], **fp_inputs[1])[0]  # activations are not quantized yet
    args = (torch.randn(8, 4, 8, 8), torch.randint(0, 1000, (8,)), context)
    init_shared_activations(unet, {**layers, **inputs}, args, torch.zeros(8, dtype=torch.long), 40, 2.4)
    for path, m in inputs.items():
        aq = m.act_quantizer
        assert m.quantize_acts and aq.calibrated.all() and torch.equal(aq.scale, aq.scale[:1].expand_as(aq.scale)), path
    block_inputs = [m for n, m in inputs.items() if n.startswith(name)]
    assert {n.rsplit(".", 1)[1] for n in inputs if n.startswith(name)} == set(MATMUL_INPUTS)
    before = [m.act_quantizer.scale[0].clone() for m in block_inputs]
    losses = learn_unit_steps(name, block, fp_inputs, target, StepLearning(50, 4e-4, 4, 2.4, 0))
    assert losses["after"] < losses["before"]
    assert all(not torch.equal(b, m.act_quantizer.scale[0]) for b, m in zip(before, block_inputs))


def test_bad_attention_settings_fail_at_load_time_naming_the_key():
    base = dict(
        weights={"q": {"method": "qdiff", "w_bits": 4}, "d": {"method": "dmq", "w_bits": 4, "a_bits": 8}},
        rows={"q8": {"weights": "q", "a_bits": 8}, "d8": {"weights": "d", "a_bits": 8}},
    )
    cfg = Config.model_validate(base)
    assert cfg.row_attention("q8") == 8 and cfg.row_attention("d8") is None  # as the papers
    on = Config.model_validate(
        {**base, "rows": {**base["rows"], "d8": {"weights": "d", "a_bits": 8, "attention": True}}}
    )
    assert on.row_attention("d8") == 8
    with pytest.raises(ValueError, match=r"attention\.softmax_bits\s.*less than or equal to 8"):
        Config.model_validate({**base, "attention": {"softmax_bits": 9}})
    wide = {**base["rows"], "q16": {"weights": "q", "a_bits": 16}}
    with pytest.raises(ValueError, match=r"rows\.q16\.attention: the attention matmuls are quantized to at most 8"):
        Config.model_validate({**base, "rows": wide})
    assert Config.model_validate({**base, "rows": {**wide, "q16": {"weights": "q", "a_bits": 16, "attention": False}}})
    int8 = Config.model_validate({**base, "sample": {"backend": "int8"}})
    assert any("attention matmuls of q8 stay float32" in line for line in notices(int8))
