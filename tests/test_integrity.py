"""Damaged, foreign and stale artifacts are refused with a message that names the file and what does
not match; atomic writes leave nothing behind."""

import copy
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
import zarr
from diffusers import DDPMScheduler
from safetensors.torch import save_file

from helpers import ROOT, dvc_stages, set_params
from pipeline.calibration.dump import open_calibration
from pipeline.config import Variant, parse_config
from pipeline.infra.fingerprint import check_provenance, model_hash
from pipeline.infra.storage import ArtifactError, atomic_path, atomic_store, create_array, read_tensors, write_tensors
from pipeline.method.weight_init import init_weight_quantizers
from pipeline.models.diffusion import save_fp_model
from pipeline.models.quantized import load_quantized_unet
from pipeline.quant import QuantSpec, quantize
from pipeline.quant.artifacts import act_tensors, load_gamma, weight_tensors
from stages.lineage import ENTRY_PARAMS, INPUTS, PARAMS, stage_provenance


@pytest.fixture
def store(tmp_path):
    """A small sealed calibration-like store: several chunks per array."""
    path = tmp_path / "calib.zarr"
    with atomic_store(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        create_array(root, "trajectory/x_t", data=np.arange(64, dtype=np.float32).reshape(16, 4), chunks=(4, 4))
        create_array(root, "layers/conv/input", data=np.ones((8, 3), dtype=np.float16), chunks=(2, 3))
        root.attrs.update({"steps": 2})
    return path


def chunk(store):
    return store / "trajectory/x_t/c.1.0"


def truncate(store):
    data = chunk(store).read_bytes()
    chunk(store).write_bytes(data[: len(data) // 2])


def flip_a_byte(store):
    data = bytearray(chunk(store).read_bytes())
    data[-1] ^= 0xFF
    chunk(store).write_bytes(bytes(data))


def add_a_file(store):
    (store / "trajectory/x_t/c.9").write_bytes(b"\0" * 16)


def unseal(store):
    root = zarr.open_group(str(store), mode="r+")
    del root.attrs["manifest"]


def break_metadata(store):
    (store / "zarr.json").write_text("{not json")


@pytest.mark.parametrize(
    "damage, expected",
    [
        (truncate, r"is damaged: trajectory/x_t/c\.1\.0 has \d+ bytes, the manifest says \d+ \(truncated\?\)"),
        (flip_a_byte, r"is damaged: trajectory/x_t/c\.1\.0 does not match its checksum \(corrupt\)"),
        (lambda s: chunk(s).unlink(), r"is damaged: trajectory/x_t/c\.1\.0 is missing"),
        (add_a_file, r"is damaged: trajectory/x_t/c\.9 is not in the store's manifest"),
        (unseal, r"has no manifest, so it was not completely written by this pipeline"),
        (break_metadata, r"is unreadable"),
    ],
)
def test_damaged_store_is_refused_naming_the_file(store, damage, expected):
    open_calibration(store)
    damage(store)
    with pytest.raises(ArtifactError, match=rf"calibration store {re.escape(str(store))} {expected}"):
        open_calibration(store)


@pytest.fixture
def tensors_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    write_tensors(path, {"conv.weight_int": torch.arange(600, dtype=torch.uint8).reshape(20, 30)}, {"w_bits": 4})
    return path


def test_damaged_or_foreign_safetensors_are_refused(tensors_file, tmp_path):
    assert read_tensors(tensors_file)[1] == {"w_bits": 4}
    data = tensors_file.read_bytes()
    tensors_file.write_bytes(data[:-100])
    with pytest.raises(
        ArtifactError, match=r"weights\.safetensors is unreadable \(truncated, or not a safetensors file\)"
    ):
        read_tensors(tensors_file)
    tensors_file.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(ArtifactError, match=r"weights\.safetensors is corrupt: its tensors do not match the checksum"):
        read_tensors(tensors_file)
    save_file({"conv.weight_int": torch.zeros(2)}, str(tensors_file))
    with pytest.raises(ArtifactError, match=r"weights\.safetensors has no header: it was not written by this pipeline"):
        read_tensors(tensors_file)


def test_tensors_for_layers_the_model_lacks_are_refused(tiny_unet):
    layers = quantize(tiny_unet, QuantSpec(w_bits=4))
    gammas = {f"{name}.gamma": torch.ones_like(layer.gamma) for name, layer in layers.items()}
    gammas["down_blocks.3.resnets.0.conv1.gamma"] = torch.ones(8)
    with pytest.raises(
        ValueError, match=r"les\.safetensors: tensor 'down_blocks\.3\.resnets\.0\.conv1\.gamma' matches no layer"
    ):
        load_gamma(layers, gammas, "les.safetensors")


@pytest.fixture
def quantized_artifacts(tiny_unet, tmp_path):
    """An FP model folder and weight / activation artifacts made from it for 2 sampling steps."""
    save_fp_model(tiny_unet, DDPMScheduler(num_train_timesteps=1000), tmp_path / "fp_model")
    fp_hash = model_hash(tmp_path / "fp_model")
    q = copy.deepcopy(tiny_unet)
    layers = quantize(q, QuantSpec(w_bits=4, a_bits=8, num_steps=2))
    init_weight_quantizers(layers, grid=2, p=2.4)
    write_tensors(
        tmp_path / "weights.safetensors",
        weight_tensors(layers),
        {"model_hash": fp_hash, "w_bits": 4, "split": ["conv_shortcut"]},
    )
    header = {"model_hash": fp_hash, "a_bits": 8, "steps": 2}
    write_tensors(tmp_path / "act_params.safetensors", act_tensors(layers), header)
    return tmp_path, fp_hash


def test_activation_parameters_for_other_steps_than_the_sampler_are_refused(quantized_artifacts):
    folder, fp_hash = quantized_artifacts
    load_quantized_unet(
        folder / "fp_model", folder / "weights.safetensors", folder / "act_params.safetensors", fp_hash, steps=2
    )
    with pytest.raises(
        ArtifactError,
        match=r"act_params\.safetensors holds activation parameters for 2 sampling steps, "
        r"but the sampler runs 20 \(diffusion\.steps\)",
    ):
        load_quantized_unet(
            folder / "fp_model", folder / "weights.safetensors", folder / "act_params.safetensors", fp_hash, steps=20
        )
    with pytest.raises(
        ValueError, match=r"weights\.safetensors was made for model \w+, but the current FP model is other"
    ):
        load_quantized_unet(folder / "fp_model", folder / "weights.safetensors", None, "other", steps=2, a_bits=8)


DMQ, QDIFF = Variant("dmq", 4, 6), Variant("qdiff", 4, None)


def test_stale_artifact_names_the_parameter_that_changed():
    cfg = parse_config({"les": {"iters": 5}, "recon": {"lr": 0.002}})
    made = stage_provenance(cfg, "recon", "abc", DMQ)
    check_provenance(made, stage_provenance(cfg, "recon", "abc", DMQ), "weights.safetensors")
    now = parse_config({"les": {"iters": 5}, "recon": {"lr": 0.01}})
    with pytest.raises(
        ValueError,
        match=r"weights\.safetensors was made with other parameters than the current ones: "
        r"recon\.lr = 0\.002 there, 0\.01 now",
    ):
        check_provenance(made, stage_provenance(now, "recon", "abc", DMQ), "weights.safetensors")
    with pytest.raises(ValueError, match=r"variant\.a_bits = 6 there, 8 now"):
        check_provenance(made, stage_provenance(cfg, "recon", "abc", DMQ._replace(a_bits=8)), "weights.safetensors")
    with pytest.raises(ValueError, match="made for model abc, but the current FP model is def"):
        check_provenance(made, stage_provenance(cfg, "recon", "def", DMQ), "weights.safetensors")
    with pytest.raises(ValueError, match="has no provenance"):
        check_provenance({"model_hash": "abc"}, made, "weights.safetensors")


def test_weights_of_a_method_without_les_do_not_depend_on_les_params_or_activation_bits():
    """So rows with other a_bits share them, and an les change reruns nothing downstream of them."""
    before, after = parse_config({"les": {"iters": 5}}), parse_config({"les": {"iters": 7}})
    assert stage_provenance(before, "recon", "abc", QDIFF) == stage_provenance(after, "recon", "abc", QDIFF)
    assert not any(
        key.startswith("les.") and key not in {"les.focal_r", "les.focal_momentum"}
        for key in stage_provenance(before, "recon", "abc", QDIFF)["params"]
    )
    assert stage_provenance(before, "recon", "abc", DMQ) != stage_provenance(after, "recon", "abc", DMQ)


def paths(entries) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def resolved(path: str, foreach: str | None) -> str:
    """A path with its entry placeholder written as the params section the entry comes from: a
    foreach stage's ${key} is an entry of its own section, ${item.weights} one of ``weights``, a guard's
    ${item.les} and ${item.no_les} ones of ``rows``."""
    for placeholder, section in (("${key}", foreach), ("${item.weights}", "${weights}")):
        path = path.replace(placeholder, f"<{section}>")
    return path.replace("${item.les}", "<${rows}>").replace("${item.no_les}", "<${rows}>")


def within(path: str, folder: str) -> bool:
    return path.startswith(folder + "/")


def test_provenance_follows_dvc_yaml():
    """stages/lineage.py declares what dvc.yaml declares: each stage's params (a foreach stage's entry
    params apart), and the stages whose outputs it depends on (a directory dependency covers the
    outputs inside it; a file dependency inside an output directory, such as a store's zarr.json,
    depends on that output)."""
    raw = dvc_stages()
    dvc = {stage: (spec.get("do", spec), spec.get("foreach")) for stage, spec in raw.items()}
    outputs = {
        stage: {resolved(o, foreach) for kind in ("outs", "metrics", "plots") for o in paths(spec.get(kind, []))}
        for stage, (spec, foreach) in dvc.items()
    }
    assert set(PARAMS) == set(INPUTS) == set(dvc)
    for stage, (spec, foreach) in dvc.items():
        assert set(PARAMS[stage]) | set(ENTRY_PARAMS.get(stage, ())) == set(spec["params"]), stage
        deps = {resolved(d, foreach) for d in spec["deps"]}
        found = {
            other
            for other, outs in outputs.items()
            if any(o in deps or any(within(o, d) or within(d, o) for d in deps) for o in outs)
        }
        assert set(INPUTS[stage]) == found, stage


@pytest.mark.parametrize(
    "change, stage, expected",
    [
        (
            {"diffusion": {"steps": 5}},
            "sample",
            r"artifacts/act_params/dmq-w4a6/q0\.safetensors holds activation parameters for 4 sampling steps, but the "
            r"sampler runs 5 \(diffusion\.steps\)",
        ),
        (
            {"les": {"iters": 7}},
            "recon",
            # the seeds run side by side (recon.workers): whichever reads its LES file first refuses
            r"artifacts/les/dmq-w4a6/q\d\.safetensors was made with other parameters than the current ones: les\.iters "
            r"= 5 there, 7 now",
        ),
        ("truncate", "les", r"calibration store artifacts/calib\.zarr is damaged: .* \(truncated\?\)"),
    ],
    ids=["act-params-for-other-steps", "stale-les", "truncated-calib"],
)
def test_stage_refuses_a_stale_or_damaged_input(pipeline_copy, change, stage, expected):
    if change == "truncate":
        biggest = max((pipeline_copy / "artifacts/calib.zarr").rglob("c.*"), key=lambda p: p.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[:100])
    else:
        set_params(pipeline_copy, change)
    done = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "dmq-w4a6"], cwd=pipeline_copy, capture_output=True, text=True
    )
    assert done.returncode != 0 and re.search(expected, done.stderr), done.stderr[-2000:]


def test_failed_write_leaves_nothing_and_stale_temporaries_of_dead_writers_go(tmp_path):
    target = tmp_path / "out.zarr"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".out.zarr.tmp-{dead.pid}-0123abcd").mkdir()  # left by a writer that was killed
    (tmp_path / f".out.zarr.tmp-{os.getpid()}-4567cdef").mkdir()  # a writer still running
    with atomic_path(target) as tmp:
        tmp.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.zarr.tmp-{os.getpid()}-4567cdef", "out.zarr"]


def matrix_stages() -> dict[str, dict]:
    """The stages of today's matrix by the name DVC gives them (a foreach stage once per entry of its
    params section, ``stage@entry``), each with the body dvc.yaml writes for it."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = {}
    for name, spec in dvc_stages().items():
        foreach = spec.get("foreach")
        for key in params[foreach.strip("${}")] if foreach else [None]:
            stages[name if key is None else f"{name}@{key}"] = (spec["do"], key) if foreach else (spec, None)
    return stages


def test_every_committed_report_and_metric_is_a_stage_output():
    """A retired entry's report stays in git after the stage that wrote it is gone (a clean repro does
    not delete it): every file under reports/ and metrics/ must be an output of some stage of today's
    matrix, or lie inside an output directory."""
    outputs = {
        out if key is None else out.replace("${key}", key)
        for body, key in matrix_stages().values()
        for kind in ("outs", "metrics", "plots")
        for out in paths(body.get(kind, []))
    }
    found = [
        p.relative_to(ROOT).as_posix() for d in ("reports", "metrics") for p in (ROOT / d).rglob("*") if p.is_file()
    ]
    orphans = [f for f in found if f not in outputs and not any(within(f, out) for out in outputs)]
    assert found and not orphans, f"files no stage writes: {orphans}"


def test_dvc_lock_records_only_stages_of_todays_matrix():
    """DVC never drops the lock entry of a stage that dvc.yaml no longer defines (treeverse/dvc#5293), and
    DVC round-trips the whole lock after every stage it runs: retired rows' entries made every stage of a
    clean run pay for a third more lock than it needs. Delete the entries this names from the lock."""
    from cli import PIPELINE_FILES

    stages = matrix_stages()
    locks = [(ROOT / file).with_suffix(".lock") for file in PIPELINE_FILES]
    recorded = [name for lock in locks for name in yaml.safe_load(lock.read_text())["stages"]]
    retired = [name for name in recorded if name not in stages]
    assert recorded and not retired, f"lock entries of stages dvc.yaml no longer defines: {retired}"


def test_the_shipped_fp_model_and_classifier_are_what_dvc_lock_records():
    """A fresh clone's `dvc repro` starts from the FP model and classifier in git: their bytes, code and params
    are the ones dvc.lock records, so neither stage reruns (a change to either without retraining fails here)."""
    found = subprocess.run(
        ["dvc", "status", "--json", "fp_model", "classifier"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(found.stdout) == {}
