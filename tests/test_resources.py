"""Predicted memory (pipeline/resources.py): the simulated live bytes of a pass, and the per-stage
predictions that `cli.py doctor` and `cli.py run` check before a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, VQModel

from pipeline.calibration.capture import GB
from pipeline.config import parse_config
from pipeline.method.adaround import attach_rounding
from pipeline.models.local import find_layout, load_text_encoder, unet_skeleton_from
from pipeline.preflight import memory, process_baseline
from pipeline.quant import QuantSpec, quantize
from pipeline.resources import LiveBytes, decode_peak, forward_peak, stage_costs, unit_training_peak
from tiny_models import save_tiny_model, text_unet


def test_live_bytes_follow_tensors_as_they_are_made_and_dropped():
    """Linear -> ReLU -> Linear on 4 rows: the first output (320 B) and the ReLU's (320 B) are alive
    together; the first is dropped before the last layer runs."""
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5)).to("meta")
    x = torch.empty(4, 10, device="meta")
    with torch.no_grad(), LiveBytes() as live:
        y = model(x)
    assert live.peak == 640 and live.now == 80
    del y
    assert live.now == 0


class Attention(nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q)


def test_attention_is_simulated_as_the_fused_kernel_without_a_score_matrix():
    q = torch.empty(1, 2, 1024, 8, device="meta")
    with torch.no_grad(), LiveBytes() as live:
        Attention()(q)
    assert live.peak < 2 * 1024 * 1024 * 4 / 10  # a score matrix alone would be 8 MiB


def tiny_text_unet(device: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    with torch.device(device):
        return text_unet().eval()


def test_the_meta_simulation_equals_the_live_bytes_of_a_real_cpu_pass():
    """The same accounting on real CPU tensors (whose attention is the CPU's fused kernel) and on the
    meta device (nothing allocated) gives the same peak."""
    cpu = tiny_text_unet("cpu")
    x, t, text = torch.randn(3, 4, 8, 8), torch.zeros(3, dtype=torch.long), torch.randn(3, 5, 16)
    with torch.no_grad(), LiveBytes() as live:
        cpu(x, t, encoder_hidden_states=text)
    assert live.peak == forward_peak(tiny_text_unet("meta"), 3, text_length=5) > 0


def rounded_unit(device: str) -> tuple[nn.Module, int]:
    """Two 4-bit convolutions with AdaRound's rounding variables attached; the variables' bytes."""
    torch.manual_seed(0)
    with torch.device(device):
        unit = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))
        layers = quantize(unit, QuantSpec(w_bits=4)).values()
        for layer in layers:
            layer.quantize_weights = True
            attach_rounding(layer)
    return unit, sum(4 * layer.module.weight.numel() for layer in layers)


def test_an_adaround_iteration_is_simulated_with_its_gradients_and_adam_moments():
    """Soft rounding forward, backward into the rounding variables and Adam's step: the meta simulation
    equals the live bytes of the real CPU iteration, and holds at least the gradients and both moments."""
    peaks = []
    for device in ("cpu", "meta"):
        unit, rounding = rounded_unit(device)
        x = torch.randn(2, 4, 6, 6, device=device)
        peaks.append(unit_training_peak({"unit": (unit, ((x,), {}), None)}))
    assert peaks[0] == peaks[1] >= 3 * rounding


def test_the_sample_stage_counts_the_autoencoder_and_its_decoding(tmp_path):
    """A latent model's autoencoder stays on the device while samples are decoded: its weights and the
    decoding's peak (the meta simulation equal to a real CPU decode) enter the sample stage's figure."""
    folder = save_tiny_model("latent", tmp_path / "model")
    config = json.loads((folder / "vqvae/config.json").read_text())
    real = VQModel.from_pretrained(folder / "vqvae").eval()
    with torch.no_grad(), LiveBytes() as live:
        real.decode(torch.randn(3, 3, 8, 8))
    with torch.device("meta"):
        skeleton = VQModel.from_config(config)
    assert decode_peak(skeleton, (3, 3, 8, 8)) == live.peak > 0
    params = {**MATRIX, "model": {"source": "local", "path": str(folder)}}
    latent = {c.stage: c for c in stage_costs(parse_config(params), unet_skeleton_from(folder), text_length=5)}
    bare = {c.stage: c for c in stage_costs(parse_config(MATRIX), unet_skeleton_from(folder), text_length=5)}
    autoencoder = sum(4 * p.numel() for p in real.parameters())
    assert latent["sample"].device >= bare["sample"].device + autoencoder
    assert latent["pts"].device == bare["pts"].device  # only sampling decodes


def test_stages_that_embed_prompts_hold_the_text_encoder_while_they_load(tmp_path):
    folder = save_tiny_model("text", tmp_path / "model")
    encoder, _ = load_text_encoder(find_layout(folder))
    text = sum(4 * p.numel() for p in encoder.parameters())
    params = {**MATRIX, "model": {"source": "local", "path": str(folder)}}
    with_text = {c.stage: c for c in stage_costs(parse_config(params), unet_skeleton_from(folder), text_length=16)}
    without = {c.stage: c for c in stage_costs(parse_config(MATRIX), unet_skeleton_from(folder), text_length=16)}
    for stage in ("dump", "les", "recon", "pts"):
        assert with_text[stage].staged == without[stage].staged + text
    assert with_text["sample"].staged > without["sample"].staged + text  # and the autoencoder
    for stage in with_text:
        assert with_text[stage].host_peak(cuda=True) == with_text[stage].host + with_text[stage].staged


MATRIX = {
    "weights": {"qdiff-w4": {"method": "qdiff", "w_bits": 4}},
    "rows": {"qdiff-w4a8": {"weights": "qdiff-w4", "a_bits": 8}},
    "guards": {},
    "peers": {},
    "report": {"table": ["qdiff-w4a8"], "ablation": []},
}


def test_stage_predictions_keep_captures_within_the_budget_and_grow_with_the_batch():
    cfg = parse_config({**MATRIX, "capture": {"device_gb": 1e-4, "host_gb": 2e-4}})
    unet = tiny_text_unet("meta")
    costs = {cost.stage: cost for cost in stage_costs(cfg, unet, text_length=5)}
    assert set(costs) == {"dump", "stats", "les", "recon", "pts", "sample"}
    weights = sum(4 * p.numel() for p in unet.parameters())
    for stage in ("stats", "les", "recon"):
        assert costs[stage].host <= 2e-4 * GB  # the rest spills to scratch files
        assert costs[stage].disk > 0
    bigger = parse_config({**MATRIX, "capture": {"device_gb": 1e-4, "host_gb": 2e-4}, "sample": {"batch_size": 1000}})
    sample = next(c for c in stage_costs(bigger, unet, text_length=5) if c.stage == "sample")
    assert sample.device - 2 * weights > 2 * (costs["sample"].device - 2 * weights)


def test_doctor_refuses_a_gpu_too_small_naming_what_to_lower():
    findings = {f.check: f for f in memory(parse_config({}), gpu_gb=0.001)}
    sample = findings["predicted peak of sample"]
    assert not sample.ok and "too much for the GPU, lower sample.batch_size" in sample.detail
    assert all(f.ok for f in memory(parse_config({}), gpu_gb=80))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a child inherits ru_maxrss on Linux")
def test_the_process_baseline_is_the_process_own_peak_not_its_parent_s():
    """A stage started by a larger process (dvc, a benchmark) must not report that process's peak."""
    ballast = torch.ones(2**27)  # 512 MiB in this process
    child = subprocess.run(
        [sys.executable, "-c", "from pipeline.preflight import process_baseline; print(process_baseline())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(child.stdout) < process_baseline() - ballast.nbytes // 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loaded_weights_are_mapped_from_their_file_as_the_cpu_prediction_assumes(tmp_path):
    """pts and sample never read the FP weights of the layers that run on integer weights; the CPU
    prediction leaves them out because they stay in the file until read."""
    from pipeline.models.diffusion import load_fp_model

    folder = save_tiny_model("pixel", tmp_path / "model")
    unet, _ = load_fp_model(folder)
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[5].endswith(".safetensors"):
            mapped.append([int(x, 16) for x in fields[0].split("-")])
    assert all(any(a <= p.data_ptr() < b for a, b in mapped) for p in unet.parameters())
