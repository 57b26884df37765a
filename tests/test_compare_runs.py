"""benchmarks/compare_runs.py: two runs of the table on different FP models, from their committed metrics/
and reports/ alone (no artifacts, no pipeline run)."""

import json
import shutil
import sys

import pytest

from helpers import ROOT, run

VERDICT_KEYS = ("mse_verdict", "fid_verdict")


def compare(a, b, out) -> tuple[str, dict]:
    output = run([sys.executable, "benchmarks/compare_runs.py", str(a), str(b), "--json", str(out)], ROOT)
    return output, json.loads(out.read_text())


def committed_outputs(folder):
    """A copy of what the script reads of the committed run: metrics/ and the three reports."""
    shutil.copytree(ROOT / "metrics", folder / "metrics")
    (folder / "reports").mkdir()
    for name in ("paper_table.md", "ablation.md", "comparisons.md"):
        shutil.copy(ROOT / "reports" / name, folder / "reports" / name)
    return folder


def test_the_committed_run_against_itself_holds_every_verdict_and_every_row(tmp_path):
    output, same = compare(ROOT, ROOT, tmp_path / "same.json")
    assert same["rows"] and same["pairs"] and same["rankings_by_fid_vs_fp"]
    for name, row in same["rows"].items():
        assert row["status"] == "within the spreads" and row["difference"] == 0, name
    assert all(pair[key]["holds"] for pair in same["pairs"] for key in VERDICT_KEYS)
    assert all(ranked["holds"] for ranked in same["rankings_by_fid_vs_fp"].values())
    verdicts = len(VERDICT_KEYS) * len(same["pairs"])
    assert f"{verdicts} of {verdicts} verdicts hold; moved: none" in output
    assert same["runs"]["a"]["cpu"] == same["runs"]["b"]["cpu"]


def test_an_edited_verdict_and_a_far_moved_fid_are_named_as_moved(tmp_path):
    moved = committed_outputs(tmp_path / "moved")
    comparisons = moved / "reports" / "comparisons.md"
    lines = comparisons.read_text().splitlines()
    first_pair = [number for number, line in enumerate(lines) if line.startswith("|")][2]  # after header, separator
    cells = lines[first_pair].split("|")
    cells[-2] = " edited by the test "  # the FID verdict, the last column
    lines[first_pair] = "|".join(cells)
    comparisons.write_text("\n".join(lines) + "\n")
    edited_pair = [cells[1].strip(), cells[2].strip()]

    record_path = moved / "metrics" / "dmq-w4a8.json"
    record = json.loads(record_path.read_text())
    for quant_seed in record["quant_seeds"].values():
        for noise_seed in quant_seed["seeds"].values():
            noise_seed["fid"] += 1000  # far beyond any seed spread, and behind every other row of its bit-width
    record_path.write_text(json.dumps(record))

    output, found = compare(ROOT, moved, tmp_path / "moved.json")
    assert [name for name, row in found["rows"].items() if row["status"] != "within the spreads"] == ["dmq-w4a8"]
    assert found["rows"]["dmq-w4a8"]["difference"] == pytest.approx(-1000)
    changed = [(pair["pair"], key) for pair in found["pairs"] for key in VERDICT_KEYS if not pair[key]["holds"]]
    assert changed == [(edited_pair, "fid_verdict")]
    rankings = found["rankings_by_fid_vs_fp"]
    bits = f"W{record['w_bits']}A{record['a_bits']}"
    assert [b for b, ranked in rankings.items() if not ranked["holds"]] == [bits]
    assert rankings[bits]["b"][-1] == record["method"]
    assert "moved: dmq-w4a8" in output
    assert f"moved: {' vs '.join(edited_pair)} (FID verdict)" in output
