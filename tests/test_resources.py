"""Predicted memory (pipeline/resources.py): the simulated live bytes of a pass, and the per-stage
predictions that `cli.py doctor` and `cli.py run` check before a run."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from pipeline.calibration.capture import GB
from pipeline.config import parse_config
from pipeline.preflight import memory
from pipeline.resources import LiveBytes, forward_peak, stage_costs


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
        return UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=4,
            norm_num_groups=4,
        ).eval()


def test_the_meta_simulation_equals_the_live_bytes_of_a_real_cpu_pass():
    """The same accounting on real CPU tensors (whose attention is the CPU's fused kernel) and on the
    meta device (nothing allocated) gives the same peak."""
    cpu = tiny_text_unet("cpu")
    x, t, text = torch.randn(3, 4, 8, 8), torch.zeros(3, dtype=torch.long), torch.randn(3, 5, 16)
    with torch.no_grad(), LiveBytes() as live:
        cpu(x, t, encoder_hidden_states=text)
    assert live.peak == forward_peak(tiny_text_unet("meta"), 3, text_length=5) > 0


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
