"""The embedded default end to end, with the shipped params.yaml (about 15 minutes on 2 cores).

Slow: CI runs the reduced configuration in test_dvc_pipeline.py instead; run this one with
``python -m pytest -m slow``."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_pipeline_makes_recognisable_digits(tmp_path):
    for item in ("pipeline", "stages", "dvc.yaml", "params.yaml"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / item)
    for cmd in (["dvc", "init", "--no-scm", "-q"], ["dvc", "repro"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # the digit classifier is confident on most FP samples: they are recognisable digits
    assert metrics["fp"]["confident_share"] > 0.8
    assert metrics["fp"]["recall"] > 0.5 and metrics["fp"]["isc"] > 7
    # the quantized model stays in the same league as FP
    assert metrics["quant"]["fid"] < 2 * metrics["fp"]["fid"]
    assert metrics["quant"]["confident_share"] > 0.7
