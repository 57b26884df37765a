"""The commands people use around the pipeline: run (dvc repro with an account), table, compare."""

import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest
import typer

import cli
from helpers import ROOT, imported_packages, init_repo, reduced_params, run, set_params

CLI = [sys.executable, str(ROOT / "cli.py")]


def test_table_prints_fp_first_then_the_configured_rows(pipeline_copy):
    lines = run([*CLI, "table"], pipeline_copy).splitlines()
    assert lines[0] == "Paper table"
    assert [line.split(" | ")[0] for line in lines[4:9]] == [
        "| FP",
        "| qdiff+attn",
        "| optimum-quanto",
        "| qdiff+attn",
        "| dmq",
    ]
    ablation = run([*CLI, "table", "--ablation"], pipeline_copy)
    assert "MSE vs FP" in ablation and "| dmq | W4A6 |" in ablation


def test_the_table_reads_the_records_without_the_model_or_torch_fidelity(reproduced):
    # seconds of imports each: `cli.py table` took 12 s on a 2-core AVX2 machine when it checked the params
    # against the model as a stage does
    imported = imported_packages("import cli; cli._table(cli.Path('params.yaml'), False)", reproduced[0])
    assert "pipeline" in imported and not {"diffusers", "torch_fidelity"} & imported


def test_run_with_nothing_changed_says_so_and_prints_the_table(pipeline_copy):
    output = run([*CLI, "run"], pipeline_copy)
    assert "everything is up to date" in output and "0 stage(s) ran" in output and "| FP | 32/32 |" in output
    assert "predicted peak" not in output  # nothing to run, nothing to predict


def test_run_stops_when_dvc_cannot_say_what_it_would_run(pipeline_copy):
    """Another DVC process holding the repository's lock fails ``dvc status``: that is not "up to date"
    (it once started a whole run cold, without the memory check, saying so)."""
    lock = pipeline_copy / ".dvc/tmp/lock"
    lock.parent.mkdir(exist_ok=True)
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `dvc repro` holds it
        done = subprocess.run([*CLI, "run"], cwd=pipeline_copy, capture_output=True, text=True)
    assert done.returncode == 1 and "up to date" not in done.stdout and "stage(s) ran" not in done.stdout
    assert done.stderr.startswith("error: `dvc status --json` failed (exit") and "lock" in done.stderr


def test_run_stops_when_dvc_cannot_say_what_is_downstream(pipeline_copy, tmp_path):
    """``dvc dag`` failing: planned from an empty graph, the run once skipped the memory check of every stage
    downstream of the changed ones."""
    shim = tmp_path / "bin/dvc"  # the real dvc, except that `dvc dag` fails
    shim.parent.mkdir()
    fail_dag = '[ "$1" = dag ] && { echo "dag: no graph" >&2; exit 3; }'
    shim.write_text(f'#!/bin/sh\n{fail_dag}\nexec {shutil.which("dvc")} "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([*CLI, "run"], cwd=pipeline_copy, capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "stage(s) ran" not in done.stdout
    assert done.stderr.startswith("error: `dvc dag --dot` failed (exit 3): dag: no graph")


def test_run_plans_every_stage_of_a_repository_where_nothing_has_run(tmp_path, monkeypatch):
    """A fresh clone: ``dvc repro --dry`` fails there at the first stage whose input is yet to be written
    (``cli.py run`` planned from it and refused every fresh clone's main job)."""
    monkeypatch.chdir(init_repo(tmp_path, reduced_params()))
    always = cli._always_changed()
    every, _ = cli._plan([], force=True, always=always)
    changed, planned = cli._plan([], force=False, always=always)
    assert changed == every and planned == set(every)  # nothing has run: all changed, in the pipeline's order
    assert every.index("fp_model") < every.index("dump") < every.index("stats") < every.index("report")
    changed, planned = cli._plan(["fid@dmq-w4a6"], force=False, always=always)
    assert {"dump", "les@dmq-w4a6", "sample_fp", "fid@dmq-w4a6"} <= set(changed) and set(changed) == planned
    assert not {"fid@qdiff-w4a6", "report"} & planned  # a target's run reaches only its own pipeline
    with pytest.raises(typer.Exit):
        cli._plan(["fid@no-such-row"], force=False, always=always)


def test_the_plan_names_a_foreach_group_once():
    stages = ["dump", "les@qdiff-w4", "les@dmq-w4a6", "sample_fp", "sample@dmq-w4a6", "report"]
    assert cli._grouped(stages) == "dump, les@* (2), sample_fp, sample@dmq-w4a6, report"


def test_run_of_targets_succeeds_when_other_rows_are_from_another_fp_model(pipeline_copy):
    """A partial run (TARGETS) leaves the other rows' metrics as they were: no table, and no failure."""
    path = pipeline_copy / "metrics/qdiff-w4a6.json"
    row = json.loads(path.read_text())
    row["provenance"]["model_hash"] = "0" * 16  # as the row's record after `cli.py run fid@qdiff-w4a6` on another model
    path.write_text(json.dumps(row))
    stale = "but the current FP model is 0000000000000000"
    output = run([*CLI, "run", "fid_fp"], pipeline_copy)
    assert "0 stage(s) ran" in output and "no table: the FP record was made for model" in output and stale in output
    failed = subprocess.run([*CLI, "table"], cwd=pipeline_copy, capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stderr.startswith("error: ") and stale in failed.stderr  # no traceback


def test_run_refuses_a_run_that_cannot_fit_this_machine_naming_the_param(pipeline_copy):
    """Sampling 4 M images a batch is predicted beyond this machine's memory: refused before dvc runs."""
    set_params(pipeline_copy, {"sample": {"batch_size": 2**22}})
    lock = (pipeline_copy / "dvc.lock").read_text()
    done = subprocess.run([*CLI, "run"], cwd=pipeline_copy, capture_output=True, text=True)
    assert done.returncode == 1 and "refused: a stage would not fit this machine" in done.stderr
    sample = next(line for line in done.stdout.splitlines() if "predicted peak of sample" in line)
    assert sample.lstrip().startswith("PROBLEM") and "too much for the host, lower sample.batch_size" in sample
    assert (pipeline_copy / "dvc.lock").read_text() == lock


def test_compare_shows_the_params_and_the_metric_that_differ(pipeline_copy):
    repo = pipeline_copy
    run(["git", "init", "-q"], repo)
    run(["dvc", "config", "core.no_scm", "false"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"], repo)
    set_params(repo, {"rows": {"qdiff-w4a6": {"a_bits": 5}}})
    path = repo / "metrics/qdiff-w4a6.json"
    metrics = json.loads(path.read_text())
    old = metrics["mean"]["fid"]
    metrics["mean"]["fid"] = old + 10  # as a rerun of the row would change it
    path.write_text(json.dumps(metrics))
    lines = run([*CLI, "compare", "HEAD"], repo).splitlines()
    assert "  rows.qdiff-w4a6.a_bits: 6 → 5" in lines
    row = next(line for line in lines if line.startswith("qdiff-w4a6 "))
    assert row.split() == ["qdiff-w4a6", f"{old:.4g}", f"{old + 10:.4g}", "+10"]
    assert next(line for line in lines if line.startswith("dmq-w4a6 ")).split()[-1] == "+0"
