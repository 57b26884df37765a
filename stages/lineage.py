"""What each stage reads: its params (dvc.yaml declares the same lists; tests/test_integrity.py keeps
them in step) and the stages whose artifacts it reads. An artifact's provenance covers the params of
its stage and of every stage upstream, plus what its entry quantizes (the method and bit-widths, not
the entry's name: two entries that quantize alike make the same artifact), so a reader can tell a
stale artifact from the current params."""

from __future__ import annotations

import torch

from pipeline.config import Config, Variant
from pipeline.infra.checkpoint import Checkpoints
from pipeline.infra.fingerprint import check_provenance, config_values, provenance
from pipeline.infra.machine import environment
from pipeline.infra.storage import read_tensors, remove_path, write_json
from pipeline.methods import METHODS
from stages.layout import CLASSIFIER, checkpoints_path, entry_checkpoints_path

PARAMS = {
    "fp_model": ("seed", "model"),
    "classifier": ("classifier", "model.image_size"),
    "dump": ("device", "diffusion", "calib", "capture.device_gb"),
    "stats": ("device", "calib.layer_records_per_step", "capture", "stats"),
    "les": ("device", "capture", "les", "quant.seeds"),
    "recon": ("device", "autocast", "capture", "quant", "recon", "les.focal_r", "les.focal_momentum"),
    "pts": ("device", "autocast", "capture", "pts", "shared_acts", "attention", "quant.seeds"),
    "sample_fp": ("device", "autocast", "diffusion.steps", "sample"),
    "sample": ("device", "autocast", "diffusion.steps", "sample", "quant.seeds"),
    "eval_files": ("eval.reference_images", "eval.inception_weights", "eval.clip_model"),
    "reference": ("device", "eval.reference_images", "eval.inception_weights", "model.image_size"),
    "fid_fp": ("device", "eval", "model.image_size", "sample.prompts"),
    "fid": ("device", "eval", "model.image_size", "sample.prompts", "quant.seeds"),
    "guard": ("device", "autocast", "diffusion.steps", "sample.eta", "guard", "eval.inception_weights", "quant.seeds"),
    "peer": ("device", "diffusion.steps", "sample", "eval", "model.image_size", "quant.seeds"),
    "report": ("report",),
}

# The entry params of the per-entry stages, as dvc.yaml's foreach templates write them.
ENTRY_PARAMS = {
    "les": ("weights.${key}",),
    "recon": ("weights.${key}",),
    "pts": ("rows.${key}", "weights.${item.weights}"),
    "guard": ("guards.${key}",),
    "peer": ("peers.${key}",),
}

INPUTS = {
    "fp_model": (),
    "classifier": (),
    "dump": ("fp_model",),
    "stats": ("fp_model", "dump"),
    "les": ("fp_model", "dump"),
    "recon": ("fp_model", "dump", "les"),
    "pts": ("fp_model", "dump", "stats", "recon"),
    "sample_fp": ("fp_model",),
    "sample": ("fp_model", "recon", "pts"),
    "eval_files": (),
    "reference": ("fp_model", "classifier", "eval_files"),
    "fid_fp": ("sample_fp", "classifier", "reference", "eval_files"),
    "fid": ("sample", "sample_fp", "classifier", "reference", "eval_files"),
    # guard: pts's inputs (recon among them) stand for the weights; the classifier gives its feature space
    "guard": ("fp_model", "classifier", "eval_files", "pts", "fid"),
    "peer": ("fp_model", "dump", "sample_fp", "classifier", "reference", "eval_files"),
    "report": ("les", "stats", "fid_fp", "fid", "guard", "peer", "sample_fp", "sample"),
}


def lineage_params(stage: str, variant: Variant | None = None) -> set[str]:
    """The params of ``stage`` and of every stage upstream of it. The les stage of a method without
    LES reads no params (it writes γ = 1), so its lineage is empty."""
    if stage == "les" and variant is not None and not METHODS[variant.method].les:
        return set()
    keys = set(PARAMS[stage])
    for upstream in INPUTS[stage]:
        keys |= lineage_params(upstream, variant)
    return keys


# Params that change how a stage runs, not what it writes (γ and the weights are bit-identical for any
# number of LES, recon or pts workers; captures are the same wherever the capture budget keeps them; the
# seed list says which artifacts there are, each depends on its own seed): left out of provenance, so
# changing them neither makes other artifacts stale nor discards checkpoints.
RESULT_INDEPENDENT = {
    "les.workers",
    "recon.workers",
    "pts.workers",
    "quant.seeds",
    "capture.device_gb",
    "capture.host_gb",
    "capture.scratch",
}


def stage_provenance(
    cfg: Config, stage: str, model: str | None, variant: Variant | None = None, quant_seed: int | None = None
) -> dict:
    """The provenance header of an artifact that ``stage`` writes under the parameters ``cfg`` for an
    entry that quantizes ``variant`` (None for the stages that quantize nothing) with quantization seed
    ``quant_seed`` (None for the artifacts of all seeds, or of none)."""
    values = config_values(cfg.model_dump(mode="json"), sorted(lineage_params(stage, variant)))
    values = {key: value for key, value in values.items() if key not in RESULT_INDEPENDENT}
    if variant is not None:
        values.update({f"variant.{key}": value for key, value in variant._asdict().items() if value is not None})
    if quant_seed is not None:
        values["quant.seed"] = quant_seed
    return provenance(values, model)


def checkpoint_key(provenance: dict) -> str:
    """Checkpoints are valid for one model and one set of params."""
    return f"{provenance['model_hash']}-{provenance['params_hash']}"


def seed_checkpoints(stage: str, name: str, seed: int, provenance: dict) -> Checkpoints:
    """The per-unit checkpoints of ``stage`` (les, recon, pts) for entry or row ``name`` and quantization
    seed ``seed``, made under ``provenance``. They outlive the seed's output until
    :func:`drop_checkpoints`: DVC deletes a stage's outputs before it reruns the stage, so a finished
    seed's checkpoints are all that a killed run keeps of it."""
    return Checkpoints(checkpoints_path(stage, name, seed), checkpoint_key(provenance))


def drop_checkpoints(stage: str, name: str) -> None:
    """Every seed's checkpoints of ``stage`` for ``name``, once the whole stage is written."""
    remove_path(entry_checkpoints_path(stage, name))


def check_input(
    header: dict,
    cfg: Config,
    stage: str,
    model: str | None,
    path,
    variant: Variant | None = None,
    quant_seed: int | None = None,
) -> None:
    """Refuse an artifact of ``stage`` that another model, other parameters than ``cfg`` or another
    quantization seed made."""
    check_provenance(header, stage_provenance(cfg, stage, model, variant, quant_seed), str(path))


def check_classifier(cfg: Config) -> None:
    """Refuse a digit classifier that other params trained (the metrics' and the guard's features)."""
    check_input(read_tensors(CLASSIFIER)[1], cfg, "classifier", None, CLASSIFIER)


def write_report(path, record: dict, device: torch.device | None = None) -> None:
    """A stage's report, with the environment it was computed in (versions, threads, CPU kind); ``device``:
    where its learners ran, for a stage whose learners run on one thread each on the CPU
    (pipeline.infra.workers)."""
    learner_threads = 1 if device is not None and device.type == "cpu" else None
    write_json(path, {**record, "environment": environment(learner_threads)})
