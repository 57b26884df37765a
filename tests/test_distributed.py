"""Sharding over torchrun ranks: the plan of batches, and 2 gloo ranks on loopback against 1 process."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, tree_hash
from pipeline.infra.distributed import World, my_batches, plan_batches
from pipeline.infra.storage import read_tensors
from pipeline.method.les import assign_layers


def test_batches_never_straddle_a_chunk_or_a_period_and_ranks_cover_them_once():
    plan = plan_batches(12, batch_size=3, chunk=2, period=4)
    batches = [b for group in plan for b in group]
    assert batches == [(0, 2), (2, 3), (3, 4), (4, 6), (6, 7), (7, 8), (8, 10), (10, 11), (11, 12)]
    assert all(a // 2 == (b - 1) // 2 for a, b in batches)  # one chunk each
    assert all(a // 4 == (b - 1) // 4 for a, b in batches)  # one period (sampling step) each
    for size in (1, 2, 3, 5, 8):
        shares = [my_batches(plan, World(rank, size)) for rank in range(size)]
        assert [b for share in shares for b in share] == batches, size  # contiguous, in order, no gaps
        starts = [share[0][0] for share in shares if share]
        assert all(s % 2 == 0 for s in starts), size  # ranks own whole chunks


def test_plan_of_one_chunk_per_batch_is_the_plain_batching():
    assert [b for g in plan_batches(10, 4, 4) for b in g] == [(0, 4), (4, 8), (8, 10)]
    assert [b for g in plan_batches(10, 4, 10) for b in g] == [(0, 4), (4, 8), (8, 10)]


def test_layers_go_costliest_first_to_the_least_loaded_rank():
    owner = assign_layers({"a": 8, "b": 4, "c": 2, "d": 2}, 2)
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 1}  # loads 8 and 8


def run_job(out, ranks: int) -> None:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        if ranks > 1
        else [sys.executable]
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, str(ROOT / "tests/dist_job.py"), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def one_and_two_ranks(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    run_job(one, 1)
    run_job(two, 2)
    return one, two


@pytest.mark.parametrize("store", ["calib.zarr", "samples.zarr"])
def test_two_gloo_ranks_write_the_same_store_as_one_process_byte_for_byte(one_and_two_ranks, store):
    one, two = one_and_two_ranks
    assert tree_hash(one / store) == tree_hash(two / store)
    assert not list(two.glob(f".{store}.tmp-*"))  # rank 0 renamed the one shared temporary


def test_two_gloo_ranks_learn_the_same_gamma_as_one_process(one_and_two_ranks):
    one, two = one_and_two_ranks
    (g1, h1), (g2, h2) = read_tensors(one / "les.safetensors"), read_tensors(two / "les.safetensors")
    assert list(g1) == list(g2) and len(g1) == 4
    assert all(torch.equal(g1[name], g2[name]) for name in g1) and h1 == h2
    assert sorted(p.name for p in (two / "les.ckpt/key").iterdir()) == sorted(f"{name}.safetensors" for name in g1)


def test_a_rank_fills_only_the_whole_chunks_of_its_share(tiny_unet, tmp_path):
    import numpy as np
    import zarr
    from diffusers import DDPMScheduler

    from pipeline.eval.sampling import fill_samples
    from pipeline.models.diffusion import ddim_scheduler

    scheduler = ddim_scheduler(DDPMScheduler(num_train_timesteps=1000), steps=2)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    for name in ("rank1", "alone"):
        root.create_array(name, shape=(10, 1, 16, 16), chunks=(4, 1, 16, 16), dtype="float32", fill_value=np.nan)
    # chunks [0, 4) [4, 8) [8, 10) over 2 ranks: rank 1 owns the last one (no collective is needed here)
    fill_samples(tiny_unet, scheduler, root["rank1"], 3, 0.0, 5, torch.device("cpu"), "rank 1", World(1, 2))
    fill_samples(tiny_unet, scheduler, root["alone"], 3, 0.0, 5, torch.device("cpu"), "alone")
    assert np.isnan(root["rank1"][:8]).all()
    np.testing.assert_array_equal(root["rank1"][8:], root["alone"][8:])


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, entry, output",
    [
        ("les", "dmq-w4a6", "artifacts/les/dmq-w4a6"),
        ("sample", "dmq-w4a6", "artifacts/samples/dmq-w4a6"),
        ("dump", None, "artifacts/calib.zarr"),
    ],
)
def test_a_stage_under_torchrun_writes_what_dvc_repro_wrote(pipeline_copy, stage, entry, output):
    """The stage scripts themselves, launched by torchrun with 2 gloo ranks in a reproduced repository:
    the output equals the one-process output byte for byte, so DVC sees nothing changed."""
    assert (pipeline_copy / output).is_dir()
    before = tree_hash(pipeline_copy / output)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        f"stages.{stage}",
        *([entry] if entry else []),
    ]
    done = subprocess.run(cmd, cwd=pipeline_copy, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert tree_hash(pipeline_copy / output) == before
