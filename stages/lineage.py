"""What each stage reads: its params (dvc.yaml declares the same lists; tests/test_integrity.py keeps
them in step) and the stages whose artifacts it reads. An artifact's provenance covers the params of
its stage and of every stage upstream, so a reader can tell a stale artifact from the current params."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.fingerprint import check_provenance, config_values, provenance

PARAMS = {
    "fp_model": ("seed", "model"),
    "classifier": ("classifier", "model.image_size"),
    "dump": ("device", "diffusion", "calib"),
    "stats": ("stats",),
    "les": ("device", "quant.method", "quant.w_bits", "quant.a_bits", "les"),
    "recon": (
        "device", "autocast", "quant.method", "quant.w_bits", "quant.weight_clip_grid", "quant.weight_clip_p",
        "recon", "les.focal_r", "les.focal_momentum",
    ),  # fmt: skip
    "pts": ("device", "quant.method", "quant.a_bits", "pts"),
    "sample": ("device", "autocast", "diffusion.steps", "sample"),
    "fid": ("eval", "model.image_size"),
}

INPUTS = {
    "fp_model": (),
    "classifier": (),
    "dump": ("fp_model",),
    "stats": ("dump",),
    "les": ("fp_model", "dump"),
    "recon": ("fp_model", "dump", "les"),
    "pts": ("fp_model", "dump", "stats", "recon"),
    "sample": ("fp_model", "recon", "pts"),
    "fid": ("sample", "classifier"),
}


def lineage_params(stage: str) -> set[str]:
    """The params of ``stage`` and of every stage upstream of it."""
    keys = set(PARAMS[stage])
    for upstream in INPUTS[stage]:
        keys |= lineage_params(upstream)
    return keys


# Params that change how a stage runs, not what it writes (γ are bit-identical for any number of LES
# workers): left out of provenance, so changing them neither makes downstream artifacts stale nor
# discards checkpoints.
RESULT_INDEPENDENT = {"les.workers"}


def stage_provenance(cfg: Config, stage: str, model: str | None) -> dict:
    """The provenance header of an artifact that ``stage`` writes under the parameters ``cfg``."""
    values = config_values(cfg.model_dump(mode="json"), sorted(lineage_params(stage)))
    return provenance({key: value for key, value in values.items() if key not in RESULT_INDEPENDENT}, model)


def checkpoint_key(provenance: dict) -> str:
    """Checkpoints are valid for one model and one set of params."""
    return f"{provenance['model_hash']}-{provenance['params_hash']}"


def check_input(header: dict, cfg: Config, stage: str, model: str | None, path) -> None:
    """Refuse an artifact of ``stage`` that another model or other parameters than ``cfg`` made."""
    check_provenance(header, stage_provenance(cfg, stage, model), str(path))
