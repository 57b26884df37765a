"""The real topologies end to end: Stable Diffusion v1's UNet (4 levels, 2 layers a block,
cross-attention transformers with conv proj_in / proj_out and GEGLU feed-forwards, classifier-free
guidance) and LDM-4's, at 1/8 of their widths with random weights (benchmarks/scale.py builds them),
through every stage script with tiny budgets that make captures spill to scratch files, sampled on the
int8 backend."""

from __future__ import annotations

import sys

import pytest
import torch

from helpers import ROOT, run
from pipeline.deploy.integer import int8_kernels_available
from pipeline.eval.sampling import read_samples

sys.path.insert(0, str(ROOT / "benchmarks"))
from scale import ENTRY, ROW, topology_repo  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["sd-v1", "ldm-4"])
def test_every_stage_runs_on_the_real_topology_at_small_width(topology, tmp_path):
    repo = topology_repo(topology, 8, tmp_path, {"sample": {"backend": "int8", "num_samples": 4, "batch_size": 4}})
    for stage in ("fp_model", "dump", "stats", f"les {ENTRY}", f"recon {ENTRY}", f"pts {ROW}", "sample fp"):
        run([sys.executable, "-m", *f"stages.{stage}".split()], repo)
    if not int8_kernels_available():  # this machine's path: the backend refuses, naming the param
        with pytest.raises(AssertionError, match="sample.backend int8"):
            run([sys.executable, "-m", "stages.sample", ROW], repo)
        return
    run([sys.executable, "-m", "stages.sample", ROW], repo)
    fp = read_samples(repo / "artifacts/samples/fp.zarr")[0][1]
    quantized = read_samples(repo / f"artifacts/samples/{ROW}/q0.zarr")[0][1]
    assert quantized.shape == fp.shape and torch.isfinite(quantized).all()
    assert (quantized - fp).pow(2).mean() > 0  # quantized, and not a copy of FP
