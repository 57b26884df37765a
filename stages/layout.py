"""Where each artifact lives; dvc.yaml names the same paths."""

from pathlib import Path

ARTIFACTS = Path("artifacts")
REPORTS = Path("reports")
FP_MODEL = ARTIFACTS / "fp_model"
FP_PROVENANCE = FP_MODEL / "provenance.json"
CLASSIFIER = ARTIFACTS / "classifier.safetensors"
CALIB = ARTIFACTS / "calib.zarr"
LES = ARTIFACTS / "les.safetensors"
WEIGHTS = ARTIFACTS / "weights.safetensors"
ACT_PARAMS = ARTIFACTS / "act_params.safetensors"
SAMPLES = ARTIFACTS / "samples.zarr"
METRICS = Path("metrics.json")
STATS = ARTIFACTS / "stats.zarr"
STATS_JSON = REPORTS / "stats.json"
STATS_TABLE = REPORTS / "stats_outlier_ratio.csv"
FIGURES = REPORTS / "figures"
STATS_RANGES_FIG = FIGURES / "stats_channel_ranges.png"
STATS_HEATMAP_FIG = FIGURES / "stats_outlier_heatmap.png"
VOTES = ARTIFACTS / "votes.zarr"
# per-layer / per-block checkpoints of an unfinished les / recon stage (removed when it completes)
LES_CHECKPOINTS = ARTIFACTS / ".les.ckpt"
RECON_CHECKPOINTS = ARTIFACTS / ".recon.ckpt"
