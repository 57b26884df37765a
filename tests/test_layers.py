import copy

import pytest
import torch
import torch.nn as nn

from pipeline.method.adaround import RoundingOffsets, soft_rounding
from pipeline.quant import QuantSpec, calibrating, quant_layers, quantization, quantize
from pipeline.quant.layers import QuantLayer
from pipeline.quant.model import concat_splits


def test_gamma_leaves_the_fp_result_unchanged():
    torch.manual_seed(0)
    for module, x in (
        (nn.Conv2d(8, 5, 3, padding=1), torch.randn(2, 8, 6, 6)),
        (nn.Linear(8, 5), torch.randn(2, 7, 8)),
    ):
        expected = module(x)
        layer = QuantLayer(module, w_bits=4, a_bits=8, num_steps=2, split=None)
        layer.gamma.copy_(torch.rand(8) * 10 + 0.05)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_placement_keeps_embeddings_and_outer_convs_in_full_precision(tiny_unet):
    layers = quantize(tiny_unet, QuantSpec(w_bits=4, a_bits=8, num_steps=3))
    names = set(layers)
    assert names == set(quant_layers(tiny_unet))
    for kept in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"):
        assert kept not in names and not isinstance(tiny_unet.get_submodule(kept), QuantLayer)
    assert not any(n.endswith("time_emb_proj") for n in names)
    assert all(isinstance(m, nn.Linear) for n, m in tiny_unet.named_modules() if n.endswith("time_emb_proj"))
    assert "down_blocks.1.resnets.0.conv_shortcut" in names
    assert "mid_block.attentions.0.to_q" in names and "up_blocks.2.resnets.1.conv2" in names
    left_fp = {
        n for n, m in tiny_unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and not n.endswith(".module")
    }
    time_proj = {n for n in left_fp if n.endswith("time_emb_proj")}
    assert left_fp == {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"} | time_proj


def test_split_index_is_where_the_skip_starts(tiny_unet):
    seen = {}

    def hook(name):
        def pre(module, args):
            seen[name] = args[0].shape[1]

        return pre

    handles = []
    for b, block in enumerate(tiny_unet.up_blocks):
        for r, resnet in enumerate(block.resnets):
            handles.append(resnet.register_forward_pre_hook(hook(f"up_blocks.{b}.resnets.{r}")))
    # the h part of concat(h, skip) is the output of the block run just before: record its width
    h_width = {}
    order = [tiny_unet.mid_block.resnets[-1]] + [r for block in tiny_unet.up_blocks for r in block.resnets]
    for prev, nxt in zip(order, order[1:]):
        h_width[id(nxt)] = prev.out_channels
    splits = concat_splits(tiny_unet)
    for b, block in enumerate(tiny_unet.up_blocks):
        for r, resnet in enumerate(block.resnets):
            assert splits[f"up_blocks.{b}.resnets.{r}.conv1"] == h_width[id(resnet)]
            assert splits[f"up_blocks.{b}.resnets.{r}.conv_shortcut"] == h_width[id(resnet)]
    tiny_unet(torch.randn(1, 1, 16, 16), torch.tensor([10]))
    for handle in handles:
        handle.remove()
    assert all(seen[k] > splits[f"{k}.conv1"] for k in seen)  # the skip part is non-empty


def test_quantized_unet_is_close_to_fp_at_8_bits(tiny_unet):
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([500] * 4)
    with torch.no_grad():
        expected = tiny_unet(x, t).sample
        quantized = copy.deepcopy(tiny_unet)
        layers = quantize(quantized, QuantSpec(w_bits=8, a_bits=8, num_steps=1))
        for layer in layers.values():
            layer.weight_quantizer.init_params(layer.scaled_weight(), grid=10, p=2.4)
        with quantization(layers.values(), weights=True, acts=True):
            with calibrating(layers.values()):
                quantized(x, t)
            got = quantized(x, t).sample
        torch.testing.assert_close(quantized(x, t).sample, expected, atol=1e-5, rtol=1e-5)
    error = (got - expected).norm() / expected.norm()
    assert 0 < error < 0.05


def test_an_exception_inside_a_mode_leaves_every_layer_as_it_was(tiny_unet):
    quantized = copy.deepcopy(tiny_unet)
    layers = quantize(quantized, QuantSpec(w_bits=8, a_bits=8, num_steps=1))
    first = next(iter(layers.values()))
    first.quantize_acts = True  # a mixed state: the modes must come back per layer, not as one value
    before = {name: (m.quantize_weights, m.quantize_acts, m.act_quantizer.calibrating) for name, m in layers.items()}
    with pytest.raises(RuntimeError, match="inside"):
        with quantization(layers.values(), weights=True, acts=False), calibrating(layers.values()):
            assert all(m.quantize_weights and m.act_quantizer.calibrating for m in layers.values())
            assert not first.quantize_acts
            raise RuntimeError("inside")
    after = {name: (m.quantize_weights, m.quantize_acts, m.act_quantizer.calibrating) for name, m in layers.items()}
    assert after == before


def test_an_exception_inside_soft_rounding_leaves_rounding_hard():
    offsets = [RoundingOffsets(torch.randn(4, 3) * 3) for _ in range(2)]
    assert not any(o.soft for o in offsets)
    with pytest.raises(RuntimeError):
        with soft_rounding(offsets):
            assert all(o.soft for o in offsets)
            raise RuntimeError("inside")
    assert not any(o.soft for o in offsets)


def test_walking_a_quantized_unet_with_module_apply(tiny_unet):
    quantized = copy.deepcopy(tiny_unet)
    quantize(quantized, QuantSpec(4, 8, 4))
    seen = []
    quantized.apply(lambda module: seen.append(type(module).__name__))
    assert seen.count("QuantLayer") == len(quant_layers(quantized)) > 0


def test_integer_weights_follow_the_layer_to_another_device():
    """pts and sample move the quantized network to the device after loading its integer weights; the
    meta device stands in for CUDA."""
    model = nn.Sequential(nn.Linear(4, 4))
    layer = quantize(model, QuantSpec(w_bits=4))["0"]
    layer.load_integer_weight(layer.integer_weight())
    model.to("meta")
    assert layer.module.weight.device.type == "meta"
    assert layer.frozen_weight.device.type == "meta"
