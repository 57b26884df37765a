"""The embedded default end to end, with the shipped params.yaml (about an hour on 2 cores: the whole
paper-table matrix).

Slow: CI runs the reduced configuration in test_dvc_pipeline.py instead; run this one with
``python -m pytest -m slow``."""

import json

import pytest

from helpers import init_repo, run


@pytest.mark.slow
def test_default_pipeline_makes_recognisable_digits(tmp_path):
    run(["dvc", "repro"], init_repo(tmp_path))
    fp = json.loads((tmp_path / "metrics/fp.json").read_text())["mean"]
    dmq = json.loads((tmp_path / "metrics/dmq-w4a6.json").read_text())["mean"]
    # the digit classifier is confident on most FP samples: they are recognisable digits
    assert fp["confident_share"] > 0.8
    assert fp["recall"] > 0.5 and fp["isc"] > 7
    # the quantized model stays in the same league as FP
    assert dmq["fid"] < 2 * fp["fid"]
    assert dmq["confident_share"] > 0.7
    assert "| dmq | W4A6 |" in (tmp_path / "reports/paper_table.md").read_text()
