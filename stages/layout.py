"""Where each artifact lives; dvc.yaml names the same paths. Per-entry artifacts are named after their
``weights`` entry (les, recon) or their row (pts, sample, fid, guard, peer); "fp" names the FP model's.
An entry's quantized artifacts are a folder (its stage's DVC output) with one file per quantization
seed, ``q<seed>``."""

import sys
from pathlib import Path

ARTIFACTS = Path("artifacts")
REPORTS = Path("reports")
METRICS = Path("metrics")
FP_MODEL = ARTIFACTS / "fp_model"
FP_PROVENANCE = FP_MODEL / "provenance.json"
CLASSIFIER = ARTIFACTS / "classifier.safetensors"
EVAL_FILES = ARTIFACTS / "eval_files"
REFERENCE_FILES = EVAL_FILES / "reference.json"  # listing of the reference folder and the Inception weights
CLIP_FILES = EVAL_FILES / "clip.json"  # listing of the CLIP model folder
REFERENCE = ARTIFACTS / "reference.safetensors"  # the reference set's features
CALIB = ARTIFACTS / "calib.zarr"
STATS = ARTIFACTS / "stats.zarr"
SAMPLES = ARTIFACTS / "samples"
STATS_JSON = REPORTS / "stats.json"
STATS_TABLE = REPORTS / "stats_outlier_ratio.csv"
FIGURES = REPORTS / "figures"
STATS_RANGES_FIG = FIGURES / "stats_channel_ranges.png"
STATS_HEATMAP_FIG = FIGURES / "stats_outlier_heatmap.png"
PAPER_TABLE = REPORTS / "paper_table.md"
ABLATION = REPORTS / "ablation.md"
FID_FIG = FIGURES / "fid_vs_activation_bits.png"
GRIDS_FIG = FIGURES / "samples_by_method.png"
LES_EFFECT_FIG = FIGURES / "les_effect_vs_outlier_ratio.png"
COMPARISONS = REPORTS / "comparisons.md"
FP = "fp"


def les_dir(weights: str) -> Path:
    return ARTIFACTS / "les" / weights


def les_path(weights: str, seed: int) -> Path:
    return les_dir(weights) / f"q{seed}.safetensors"


def weights_dir(weights: str) -> Path:
    return ARTIFACTS / "weights" / weights


def weights_path(weights: str, seed: int) -> Path:
    return weights_dir(weights) / f"q{seed}.safetensors"


def act_params_path(row: str, seed: int) -> Path:
    return ARTIFACTS / "act_params" / row / f"q{seed}.safetensors"


def votes_path(row: str, seed: int) -> Path:
    return ARTIFACTS / "votes" / row / f"q{seed}.zarr"


def samples_path(row: str, seed: int | None = None) -> Path:
    """FP's samples store, or a row's for one quantization seed."""
    return SAMPLES / f"{row}.zarr" if seed is None else SAMPLES / row / f"q{seed}.zarr"


def metrics_path(row: str) -> Path:
    return METRICS / f"{row}.json"


def report_path(stage: str, name: str, seed: int | None = None) -> Path:
    return REPORTS / stage / (f"{name}.json" if seed is None else f"{name}/q{seed}.json")


def grid_path(row: str) -> Path:
    return REPORTS / "samples" / f"{row}.png"


def entry_checkpoints_path(stage: str, name: str) -> Path:
    """Every quantization seed's per-unit checkpoints of an unfinished les / recon / pts stage for an
    entry or row (:func:`stages.lineage.seed_checkpoints`, removed when the whole stage is written)."""
    return ARTIFACTS / f".{stage}.ckpt" / name


def checkpoints_path(stage: str, name: str, seed: int) -> Path:
    """Per-unit checkpoints of quantization seed ``seed`` (:func:`entry_checkpoints_path`)."""
    return entry_checkpoints_path(stage, name) / f"q{seed}"


def entry_argument() -> str:
    """The entry a per-entry stage runs for: ``python -m stages.recon qdiff-w4``."""
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m {sys.modules['__main__'].__spec__.name} NAME  (an entry of params.yaml)")
    return sys.argv[1]
