import json
import subprocess
import sys

import pytest

from helpers import run, set_params
from pipeline.eval.report import Row, cell, markdown_table, rows_against_fp


def test_cell_formats_mean_and_spread():
    assert cell([], 2) == "–"
    assert cell([3.14159], 2) == "3.14"
    assert cell([1.0, 2.0, 3.0], 2) == "2.00 ± 1.00"


def test_table_rows_order_and_caption():
    fp = Row(
        "FP", "32/32", [{"fid": 10.0, "kid": 5.0, "isc": 8.0, "precision": 0.5, "recall": 0.9, "num_samples": 1000}]
    )
    dmq = Row(
        "dmq",
        "W4A6",
        [
            {"fid": 12.0, "kid": 6.0, "isc": 7.5, "precision": 0.4, "recall": 0.8, "num_samples": 1000},
            {"fid": 14.0, "kid": 8.0, "isc": 7.7, "precision": 0.6, "recall": 0.8, "num_samples": 1000},
        ],
    )
    text = markdown_table([fp, dmq], steps=20, feature_note="digit-classifier features")
    lines = text.splitlines()
    assert (
        lines[0]
        == "| Method | Bits | FID ↓ | ΔFID vs FP ↓ | KID ↓ | ISC ↑ | Precision ↑ | Recall ↑ | Steps | Samples |"
    )
    assert lines[2] == "| FP | 32/32 | 10.00 | – | 5.0 | 8.00 | 0.500 | 0.900 | 20 | 1000 |"
    assert (
        lines[3]
        == "| dmq | W4A6 | 13.00 ± 1.41 | – | 7.0 ± 1.4 | 7.60 ± 0.14 | 0.500 ± 0.141 | 0.800 ± 0.000 | 20 | 1000 × 2 quantization seeds |"
    )
    assert lines[-1] == "Metrics on digit-classifier features; DDIM with 20 steps."


def run_metrics(fid: float) -> dict:
    return {
        "fid": fid,
        "kid": 100.0,
        "isc": 2.0,
        "precision": 0.5,
        "recall": 0.25,
        "num_samples": 48,
        "paired_mse": fid,
    }


def record(method, w_bits, a_bits, fids, label=None, kept=None):
    """FP's record (one run per noise seed) or a row's (one run per quantization seed on noise seed 1)."""
    found = {"seeds": {"1": run_metrics(fids[0])}} if method == "FP" else {}
    if method != "FP":
        found["quant_seeds"] = {
            str(q): {"seeds": {"1": run_metrics(fid)}, "mean": run_metrics(fid), **({"row": kept[q]} if kept else {})}
            for q, fid in enumerate(fids)
        }
    return {
        "label": label or method,
        "method": method,
        "w_bits": w_bits,
        "a_bits": a_bits,
        "steps": 4,
        "features": "digit-classifier features",
        "mean": run_metrics(sum(fids) / len(fids)),
        **found,
    }


def test_report_stage_writes_the_table_from_the_metrics_in_the_configured_order(pipeline_copy):
    """Fixture metrics (the run's provenance kept, so they count as current) in, Markdown out."""
    repo = pipeline_copy
    fixtures = {
        "fp": record("FP", 32, 32, [10.0], "FP"),
        "qdiff-w4a8": record("qdiff", 4, 8, [11.0, 11.5]),
        "quanto-w4a8": record("optimum-quanto", 4, 8, [30.25, 30.25]),
        "qdiff-w4a6": record("qdiff", 4, 6, [13.0, 15.0]),
        "dmq-w4a6": record("dmq", 4, 6, [12.0, 13.0]),
        "dmq-no-les-w4a6": record("dmq-no-les", 4, 6, [14.0, 12.0]),
        "dmq-guard-w4a6": record("dmq+guard", 4, 6, [12.0, 12.0], kept=["dmq-w4a6", "dmq-no-les-w4a6"]),
    }
    for name, fixture in fixtures.items():
        path = repo / f"metrics/{name}.json"
        path.write_text(json.dumps({**fixture, "provenance": json.loads(path.read_text())["provenance"]}))
    run([sys.executable, "-m", "stages.report"], repo)
    lines = (repo / "reports/paper_table.md").read_text().splitlines()
    assert lines[0] == "# Paper table"
    assert lines[4:10] == [
        "| FP | 32/32 | 10.00 | – | 100.0 | 2.00 | 0.500 | 0.250 | 4 | 48 |",
        "| qdiff | W4A8 | 11.25 ± 0.35 | 1.25 ± 0.35 | 100.0 ± 0.0 | 2.00 ± 0.00 | 0.500 ± 0.000 | 0.250 ± 0.000 | 4 "
        "| 48 × 2 quantization seeds |",
        "| optimum-quanto | W4A8 | 30.25 ± 0.00 | 20.25 ± 0.00 | 100.0 ± 0.0 | 2.00 ± 0.00 | 0.500 ± 0.000 | 0.250 ± "
        "0.000 | 4 | 48 × 2 quantization seeds |",
        "| qdiff | W4A6 | 14.00 ± 1.41 | 4.00 ± 1.41 | 100.0 ± 0.0 | 2.00 ± 0.00 | 0.500 ± 0.000 | 0.250 ± 0.000 | 4 "
        "| 48 × 2 quantization seeds |",
        "| dmq | W4A6 | 12.50 ± 0.71 | 2.50 ± 0.71 | 100.0 ± 0.0 | 2.00 ± 0.00 | 0.500 ± 0.000 | 0.250 ± 0.000 | 4 | "
        "48 × 2 quantization seeds |",
        "| dmq+guard | W4A6 | 12.00 ± 0.00 | 2.00 ± 0.00 | 100.0 ± 0.0 | 2.00 ± 0.00 | 0.500 ± 0.000 | 0.250 ± 0.000 | 4 "
        "| 48 × 2 quantization seeds |",
    ]
    assert "optimum-quanto (quanto-w4a8) is a peer row" in "\n".join(lines)
    ablation = (repo / "reports/ablation.md").read_text().splitlines()
    assert [line.split(" | ")[:3] for line in ablation[4:7]] == [
        ["| FP", "32/32", "10.00"],
        ["| dmq", "W4A6", "12.50 ± 0.71"],
        ["| dmq-no-les", "W4A6", "13.00 ± 1.41"],
    ]
    comparisons = (repo / "reports/comparisons.md").read_text()
    # ΔFID per quantization seed: dmq 12, 13 against the best other W4A6 row by mean error, qdiff 13, 15
    assert "| dmq-w4a6 | qdiff-w4a6 |" in comparisons and "| -1.50 ± 0.71 | A closer to FP |" in comparisons
    assert "| dmq-no-les-w4a6 | dmq-w4a6 |" in comparisons and "| +0.50 ± 2.12 | within the spread |" in comparisons


def test_report_refuses_metrics_of_other_params(pipeline_copy):
    set_params(pipeline_copy, {"sample": {"eta": 0.5}})
    done = subprocess.run([sys.executable, "-m", "stages.report"], cwd=pipeline_copy, capture_output=True, text=True)
    assert (
        done.returncode != 0 and "metrics/fp.json was made with other parameters than the current ones" in done.stderr
    )


def test_a_fp_record_of_another_fp_model_is_refused_naming_it():
    def record(method, model_hash, seeds):
        return {
            "method": method,
            "label": method,
            "w_bits": 4,
            "a_bits": 8,
            "provenance": {"model_hash": model_hash},
            **seeds,
        }

    fp = record("FP", "a" * 16, {"seeds": {"0": {"fid": 1.0}}})
    row = record("dmq", "b" * 16, {"quant_seeds": {"0": {"seeds": {"0": {"fid": 2.0}}}}})
    with pytest.raises(ValueError, match=f"metrics/fp.json was made for model {'a' * 16}, but the current FP model is"):
        rows_against_fp([fp, row], "metrics/fp.json")
    row["provenance"]["model_hash"] = "a" * 16
    assert rows_against_fp([fp, row], "metrics/fp.json")[1].runs[0]["fid_vs_fp"] == 1.0
