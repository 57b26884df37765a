"""benchmarks/compare_tables.py: two workspaces on the same FP model, paired row by row and seed by seed."""

import json
import math
import shutil
import subprocess
import sys

from helpers import ROOT, reduced_params, run, set_params
from pipeline.params import load_config


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


def test_a_committed_table_without_samples_is_compared_by_fid_only(reproduced, tmp_path):
    repo = reproduced[0]
    bare = tmp_path / "checkout"  # what git holds of a run: its params and metrics, no artifacts
    bare.mkdir()
    shutil.copy(repo / "params.yaml", bare)
    shutil.copytree(repo / "metrics", bare / "metrics")
    found = compare(bare, repo, tmp_path / "bare.json", "dmq-w4a6", "qdiff-w4a6")
    for name, row in found["rows"].items():
        assert row["fid_diff"] == 0 and row["fid_verdict"] == "within the spread", name
        assert row["verdict"] == "no samples" and math.isnan(row["mse_diff"]), name
    fp = json.loads((bare / "metrics/fp.json").read_text())  # FP's record left from a run on another FP model
    fp["provenance"]["model_hash"] = "0" * 16
    (bare / "metrics/fp.json").write_text(json.dumps(fp))
    refused = subprocess.run(
        [sys.executable, "benchmarks/compare_tables.py", str(repo), str(bare), "--rows", "dmq-w4a6"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and f"{bare / 'metrics/fp.json'} was made for model {'0' * 16}" in refused.stderr


def test_the_budget_curve_reads_each_workspace_budget_and_pairs_it_with_the_largest(
    reproduced, pipeline_copy, tmp_path
):
    repo = reproduced[0]
    # the same artifacts, other labels
    set_params(pipeline_copy, {"les": {"iters": 6}, "recon": {"iters": 9, "lr": 0.004}})
    out = tmp_path / "curve.json"
    command = [sys.executable, "benchmarks/budget_curve.py", str(repo), str(pipeline_copy), "--rows", "dmq-w4a6"]
    pairs = ["qdiff-w4a6", "--pairs", "dmq-w4a6:qdiff-w4a6"]
    table = tmp_path / "curve.md"
    run([*command, *pairs, "--json", str(out), "--figure", str(tmp_path / "curve.png"), "--markdown", str(table)], ROOT)
    found = json.loads(out.read_text())
    assert [(p["les_iters"], p["recon_iters"], p["recon_lr"]) for p in found["points"]] == [
        (5, reduced_params()["recon"]["iters"], load_config(repo / "params.yaml").recon.learning_rate),
        (6, 9, 0.004),
    ]
    for point in found["points"]:
        row = point["rows"]["dmq-w4a6"]
        assert row["against_largest"]["fid_diff"] == 0 and point["changes_no_verdict"]
        low, high = row["gamma_range"]
        assert 0 < low <= 1 <= high and row["mse_vs_fp"][0] > 0
        pair = point["pairs"]["dmq-w4a6 vs qdiff-w4a6"]  # the table's claim, within the budget
        qdiff_fid = point["rows"]["qdiff-w4a6"]["fid_vs_fp"][0]
        assert math.isclose(pair["fid_diff"], row["fid_vs_fp"][0] - qdiff_fid, abs_tol=1e-9)
        assert point["keeps_pair_verdicts"]  # the same artifacts under other labels: the same claims
    assert (tmp_path / "curve.png").stat().st_size > 0
    header, alignment, smaller, largest = table.read_text().splitlines()
    assert header.split(" | ")[1:5] == ["`dmq-w4a6`", "`qdiff-w4a6`", "moved", "`dmq-w4a6` vs `qdiff-w4a6`"]
    assert alignment == "|---|---|---|---:|---|---:|---:|"  # with the seconds of LES and AdaRound, both varied
    assert smaller.startswith("| LES 5 at lr ") and "| within; within | within; within | 0 |" in smaller
    pair = found["points"][1]["pairs"]["dmq-w4a6 vs qdiff-w4a6"]
    assert f"ΔFID {found['points'][1]['rows']['dmq-w4a6']['fid_vs_fp'][0]:.1f} ± " in largest
    assert f"({pair['fid_diff']:+.1f} ± {pair['fid_diff_std']:.1f})" in largest and "(largest)" in largest
    seconds = found["points"][0]["seconds"]["recon"]  # qdiff-w4 and dmq-w4a6 both reconstruct
    assert len(seconds) == 2 and smaller.endswith(f"| {min(seconds):.0f}–{max(seconds):.0f} |")
    by_seed = []  # each quantization seed alone (--seeds: positions in quant.seeds) averages to both together
    for seed in (0, 1):
        run([*command[:3], "--rows", "dmq-w4a6", "--seeds", str(seed), "--json", str(out)], ROOT)
        by_seed.append(json.loads(out.read_text())["points"][0]["rows"]["dmq-w4a6"])
    fids = [row["fid_vs_fp"] for row in by_seed]
    assert [spread for _, spread in fids] == [0.0, 0.0] and fids[0][0] != fids[1][0]
    both = found["points"][0]["rows"]["dmq-w4a6"]
    assert math.isclose((fids[0][0] + fids[1][0]) / 2, both["fid_vs_fp"][0], rel_tol=1e-12)
    lows, highs = zip(*(row["gamma_range"] for row in by_seed))  # γ's range too is the kept seeds'
    assert [min(lows), max(highs)] == both["gamma_range"] and (lows[0], highs[0]) != (lows[1], highs[1])


def test_tables_of_two_fp_models_are_refused_unless_unpaired_and_then_compared_by_fid_only(reproduced, tmp_path):
    repo = reproduced[0]
    other = tmp_path / "other"  # the same rows, recorded as made on another FP model
    other.mkdir()
    shutil.copy(repo / "params.yaml", other)
    shutil.copytree(repo / "metrics", other / "metrics")
    for path in (other / "metrics").glob("*.json"):
        record = json.loads(path.read_text())
        record["provenance"]["model_hash"] = "1" * 16
        path.write_text(json.dumps(record))
    command = [sys.executable, "benchmarks/compare_tables.py", str(repo), str(other), "--rows", "dmq-w4a6"]
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "rows are not paired" in refused.stderr
    out = tmp_path / "unpaired.json"
    run([*command, "--unpaired", "--json", str(out)], ROOT)
    found = json.loads(out.read_text())
    assert found["model_hash"] == [
        json.loads((repo / "metrics/fp.json").read_text())["provenance"]["model_hash"],
        "1" * 16,
    ]
    row = found["rows"]["dmq-w4a6"]
    assert row["fid_diff"] == 0 and row["verdict"] == "no samples" and math.isnan(row["mse_diff"])
