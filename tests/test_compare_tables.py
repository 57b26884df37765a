"""benchmarks/compare_tables.py: two workspaces on the same FP model, paired row by row and seed by seed."""

import json
import sys

from helpers import ROOT, reduced_params, run, set_params


def compare(a, b, out, *rows) -> dict:
    command = [sys.executable, "benchmarks/compare_tables.py", str(a), str(b), "--json", str(out)]
    run([*command, *(["--rows", *rows] if rows else [])], ROOT)
    return json.loads(out.read_text())


def test_a_workspace_against_itself_differs_nowhere_and_a_params_change_is_named(reproduced, pipeline_copy, tmp_path):
    repo = reproduced[0]
    same = compare(repo, repo, tmp_path / "same.json")
    report = reduced_params()["report"]
    assert list(same["rows"]) == list(dict.fromkeys(report["table"] + report["ablation"]))  # the default rows
    assert same["params_a_to_b"] == {}
    for name, row in same["rows"].items():
        assert row["fid_diff"] == 0 and row["mse_diff"] == 0, name
        assert row["fid_verdict"] == row["verdict"] == "within the spread", name
    set_params(pipeline_copy, {"les": {"iters": 6}})
    changed = compare(repo, pipeline_copy, tmp_path / "changed.json", "dmq-w4a6")
    assert list(changed["rows"]) == ["dmq-w4a6"]
    assert changed["params_a_to_b"] == {"les.iters": [5, 6]}
