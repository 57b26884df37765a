import copy

import pytest
import torch

from pipeline.infra.storage import read_tensors, write_tensors
from pipeline.method.weight_init import init_weight_quantizers
from pipeline.quant import QuantSpec, quantize
from pipeline.quant.artifacts import act_tensors, load_act_tensors, load_weight_tensors, weight_tensors
from pipeline.quant.model import calibrating, set_step


def calibrated(unet, steps=2):
    layers = quantize(unet, QuantSpec(w_bits=4, a_bits=6, num_steps=steps))
    for layer in layers.values():
        layer.gamma.uniform_(0.5, 2.0)
    init_weight_quantizers(layers, grid=5, p=2.4)
    for layer in layers.values():
        layer.quantize_acts = True
    with torch.no_grad(), calibrating(layers.values()):
        for s in range(steps):
            set_step(unet, s)
            unet(torch.randn(2, 1, 16, 16) * (s + 1), torch.tensor([900 - 400 * s] * 2))
    for layer in layers.values():
        layer.act_quantizer.exponent[1, ::3] = 1
    return layers


def test_saved_quantized_state_reproduces_the_model(tiny_unet, tmp_path):
    fresh = copy.deepcopy(tiny_unet)
    layers = calibrated(tiny_unet)
    write_tensors(tmp_path / "w.safetensors", weight_tensors(layers), {"w_bits": 4})
    write_tensors(tmp_path / "a.safetensors", act_tensors(layers), {"a_bits": 6})
    w, header = read_tensors(tmp_path / "w.safetensors")
    assert header == {"w_bits": 4} and w["up_blocks.0.resnets.0.conv1.weight_int"].dtype == torch.uint8
    a, _ = read_tensors(tmp_path / "a.safetensors")
    reloaded = quantize(fresh, QuantSpec(w_bits=4, a_bits=6, num_steps=2))
    load_weight_tensors(reloaded, w, "w.safetensors")
    load_act_tensors(reloaded, a, "a.safetensors")
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        for s in range(2):
            set_step(tiny_unet, s)
            set_step(fresh, s)
            torch.testing.assert_close(fresh(x, torch.tensor(500)).sample, tiny_unet(x, torch.tensor(500)).sample)


def test_artifact_for_another_model_is_refused(tiny_unet):
    from pipeline.models.embedded import build_unet

    layers = calibrated(tiny_unet)
    other = quantize(build_unet(16, (16, 32, 48), 1, 8), QuantSpec(w_bits=4, a_bits=6, num_steps=2))
    with pytest.raises(ValueError, match="w.safetensors: 'down_blocks.2.*has shape"):
        load_weight_tensors(other, weight_tensors(layers), "w.safetensors")
    missing = {k: v for k, v in act_tensors(layers).items() if not k.startswith("mid_block")}
    with pytest.raises(ValueError, match="missing tensor 'mid_block"):
        load_act_tensors(layers, missing, "a.safetensors")
