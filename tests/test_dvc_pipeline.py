"""``dvc repro`` of a reduced configuration in a temporary copy of the repository."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, cwd):
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def ran_stages(output):
    return set(re.findall(r"Running stage '([^']+)'", output))


def stale_stages(repo):
    status = json.loads(run(["dvc", "status", "--json"], repo))
    return set(status)


def merge(base, override):
    for key, value in override.items():
        if isinstance(value, dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    for item in ("pipeline", "stages", "dvc.yaml", "params.yaml", "cli.py"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load((ROOT / "tests/reduced.yaml").read_text()))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "init", "--no-scm", "-q"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    output = run(["dvc", "repro"], repo)
    return repo, output


def set_param(repo, section, key, value):
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


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
