"""``dvc repro`` of a reduced configuration in a temporary copy of the repository."""

import json

import pytest
import yaml

from helpers import copy_repo, ran_stages, run, set_param, stale_stages


@pytest.fixture(scope="module")
def repo(reproduced, tmp_path_factory):
    """A copy of the reproduced repository that this module's tests change step by step."""
    source, output = reproduced
    return copy_repo(source, tmp_path_factory.mktemp("repo")), output


def test_repro_runs_every_stage_and_writes_metrics(repo):
    repo, output = repo
    stages = set(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    assert ran_stages(output) == stages
    metrics = json.loads((repo / "metrics.json").read_text())
    assert metrics["features"] == "digit-classifier features"
    for row in ("fp", "quant"):
        assert set(metrics[row]) >= {"fid", "kid", "isc", "precision", "recall"}
        assert metrics[row]["fid"] >= 0 and metrics[row]["num_samples"] == 48
    assert (repo / "reports/samples_quant.png").stat().st_size > 0


def test_nothing_changed_reruns_nothing(repo):
    repo, _ = repo
    assert stale_stages(repo) == set()
    assert ran_stages(run(["dvc", "repro"], repo)) == set()


# `dvc status` lists the stages whose own deps changed; `dvc repro` also runs the stages downstream
# whose inputs then change.
def test_sample_param_reruns_only_sample_and_fid(repo):
    repo, _ = repo
    set_param(repo, "sample", "seed", 99)
    assert stale_stages(repo) == {"sample"}
    assert ran_stages(run(["dvc", "repro"], repo)) == {"sample", "fid"}
    assert stale_stages(repo) == set()


def test_pts_threshold_reruns_pts_sample_fid_not_les_or_recon(repo):
    repo, _ = repo
    set_param(repo, "pts", "ratio_threshold", 0.5)
    assert stale_stages(repo) == {"pts"}
    assert ran_stages(run(["dvc", "repro"], repo)) == {"pts", "sample", "fid"}
