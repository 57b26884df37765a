"""Where each artifact lives; dvc.yaml names the same paths."""

from pathlib import Path

ARTIFACTS = Path("artifacts")
REPORTS = Path("reports")
FP_MODEL = ARTIFACTS / "fp_model"
CLASSIFIER = ARTIFACTS / "classifier.safetensors"
CALIB = ARTIFACTS / "calib.zarr"
WEIGHTS = ARTIFACTS / "weights.safetensors"
ACT_PARAMS = ARTIFACTS / "act_params.safetensors"
SAMPLES = ARTIFACTS / "samples.zarr"
METRICS = Path("metrics.json")
