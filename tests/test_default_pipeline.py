"""The embedded default end to end, with the shipped params.yaml (about 15 minutes on 2 cores).

Slow: CI runs the reduced configuration in test_dvc_pipeline.py instead; run this one with
``python -m pytest -m slow``."""

import json

import pytest

from helpers import init_repo, run


@pytest.mark.slow
def test_default_pipeline_makes_recognisable_digits(tmp_path):
    run(["dvc", "repro"], init_repo(tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # the digit classifier is confident on most FP samples: they are recognisable digits
    assert metrics["fp"]["confident_share"] > 0.8
    assert metrics["fp"]["recall"] > 0.5 and metrics["fp"]["isc"] > 7
    # the quantized model stays in the same league as FP
    assert metrics["quant"]["fid"] < 2 * metrics["fp"]["fid"]
    assert metrics["quant"]["confident_share"] > 0.7
