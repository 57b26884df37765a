"""The two longest reruns of the reduced configuration's ``dvc repro`` (see test_dvc_pipeline.py), in a file of
their own so that, under pytest-xdist, another worker runs them beside test_dvc_pipeline.py's, each on its
own copy of the reproduced repository: LES params rerun only the methods with LES, sampling seeds only
sampling and metrics."""

import json

import pytest
from test_dvc_pipeline import ALWAYS, GUARD, ROWS

from helpers import copy_repo, ran_stages, run, set_params, stale_stages


@pytest.fixture(scope="module")
def repo(reproduced, tmp_path_factory):
    """A copy of the reproduced repository that this module's tests change step by step."""
    return copy_repo(reproduced[0], tmp_path_factory.mktemp("repo")), reproduced[1]


def test_les_params_rerun_the_methods_with_les_only(repo):
    repo, _ = repo
    set_params(repo, {"les": {"iters": 6}})
    # DVC reruns les for every entry (it declares the les section), but γ = 1 of qdiff comes out
    # byte-identical, so nothing downstream of it reruns
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


def test_sample_seeds_rerun_sampling_and_metrics_not_quantization(repo):
    repo, _ = repo
    set_params(repo, {"sample": {"seeds": [1, 3]}})
    assert stale_stages(repo) == ALWAYS | {"sample_fp", "peer@quanto-w4a8", *(f"sample@{row}" for row in ROWS)}
    ran = ran_stages(run(["dvc", "repro"], repo))
    # the guard reruns on its rows' new metrics; its held-out noise (guard.seed) is another
    assert ran == ALWAYS | {"sample_fp", "fid_fp", "peer@quanto-w4a8", GUARD, "report"} | {
        f"{s}@{r}" for s in ("sample", "fid") for r in ROWS
    }
    metrics = json.loads((repo / "metrics/dmq-w4a6.json").read_text())
    assert all(set(found["seeds"]) == {"1", "3"} for found in metrics["quant_seeds"].values())
