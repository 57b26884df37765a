"""Params of the reduced configuration (see test_dvc_pipeline.py): LES params reach only the LES stages, sampling
seeds only sampling, a weights entry the rows that share it. What DVC finds stale after each change (``dvc
status``) is checked on every run; the reruns themselves, which show where the stages downstream stop because
an output came out byte-identical, are the longest of the reduced repository (1:49 and 2:38 on a 2-core AVX2
machine) and run with the end-to-end tests (``slow``)."""

import json

import pytest
from test_dvc_pipeline import ALWAYS, GUARD, ROWS, SHARED_WEIGHTS_CHANGE, SHARING

from helpers import copy_repo, ran_stages, run, set_params, stale_stages

LES_ITERS = {"les": {"iters": 6}}
SAMPLE_SEEDS = {"sample": {"seeds": [1, 3]}}


@pytest.mark.parametrize(
    "change, stale",
    [
        (LES_ITERS, {"les@qdiff-w4", "les@dmq-w4a6"}),  # every entry's les declares the section
        (SAMPLE_SEEDS, {"sample_fp", "peer@quanto-w4a8", *(f"sample@{row}" for row in ROWS)}),
        # its rerun (slow) is test_dvc_pipeline.py's test_a_weights_entry_reruns_the_rows_that_share_it
        (SHARED_WEIGHTS_CHANGE, {"les@qdiff-w4", "recon@qdiff-w4", *(f"pts@{row}" for row in SHARING)}),
    ],
    ids=["les", "sample-seeds", "weights-entry"],
)
def test_a_param_makes_only_the_stages_that_read_it_stale(pipeline_copy, change, stale):
    set_params(pipeline_copy, change)
    assert stale_stages(pipeline_copy) == ALWAYS | stale


@pytest.fixture(scope="module")
def repo(reproduced, tmp_path_factory):
    """A copy of the reproduced repository that this module's reruns change step by step."""
    return copy_repo(reproduced[0], tmp_path_factory.mktemp("repo"))


@pytest.mark.slow
def test_les_params_rerun_the_methods_with_les_only(repo):
    set_params(repo, LES_ITERS)
    # γ = 1 of qdiff comes out byte-identical, so nothing downstream of it reruns
    assert ran_stages(run(["dvc", "repro"], repo)) == ALWAYS | {
        "les@qdiff-w4",
        "les@dmq-w4a6",
        "recon@dmq-w4a6",
        "pts@dmq-w4a6",
        "sample@dmq-w4a6",
        "fid@dmq-w4a6",
        GUARD,
        "report",
    }


@pytest.mark.slow
def test_sample_seeds_rerun_sampling_and_metrics_not_quantization(repo):
    set_params(repo, SAMPLE_SEEDS)
    ran = ran_stages(run(["dvc", "repro"], repo))
    # the guard reruns on its rows' new metrics; its held-out noise (guard.seed) is another
    assert ran == ALWAYS | {"sample_fp", "fid_fp", "peer@quanto-w4a8", GUARD, "report"} | {
        f"{s}@{r}" for s in ("sample", "fid") for r in ROWS
    }
    metrics = json.loads((repo / "metrics/dmq-w4a6.json").read_text())
    assert all(set(found["seeds"]) == {"1", "3"} for found in metrics["quant_seeds"].values())
