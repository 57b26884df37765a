"""The public API (pipeline.api): quantize() makes what the stages make, its checkpoint round-trips, the
result samples in a diffusers pipeline, and the README's example runs on a tiny model."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

import pipeline
from helpers import ROOT
from pipeline.api import Calibration, load, preset, quantize, save
from pipeline.config import read_params
from pipeline.deploy.integer import int8_kernels_available
from pipeline.infra.storage import read_tensors
from pipeline.quant.artifacts import act_tensors, weight_tensors
from pipeline.quant.attention import matmul_inputs
from pipeline.quant.model import quant_layers
from tiny_models import save_tiny_model

TINY = dict(
    diffusion={"steps": 3},
    calib={"num_samples": 4, "layer_records_per_step": 2, "batch_size": 4},
    les={"iters": 2, "batch_size": 4},
    recon={"iters": 2, "batch_size": 4, "records": 8},
    pts={"calib_records": 4, "batch_size": 4},
)


def test_the_package_exports_the_api_only_when_asked():
    assert pipeline.__all__ == ["Calibration", "Config", "load", "preset", "quantize", "save"]
    assert pipeline.quantize is quantize
    code = "import sys, pipeline.infra.storage; print('pipeline.api' in sys.modules)"
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "False"


def test_preset_validates_its_sections_like_params():
    config = preset("dmq", w_bits=4, a_bits=6, les={"iters": 7})
    assert config.row_variant("dmq-w4a6") == ("dmq", 4, 6)
    assert config.les.iters == 7
    with pytest.raises(ValueError, match="les.iterz: unknown key"):
        preset("dmq", les={"iterz": 7})


def test_calibration_is_a_store_or_samples_not_both():
    with pytest.raises(ValueError, match="store alone"):
        Calibration(num_samples=4, store="calib.zarr")


@pytest.fixture(scope="module")
def stage_repo(reproduced):
    """The reduced config's repository, whose stages made dmq-w4a6's and qdiff-w4a8's artifacts: quantize()
    takes the first of its quantization seeds, as q0 does (read only: quantize() writes to its workdir)."""
    return reproduced[0]


@pytest.mark.parametrize(
    "row, dumped_by", [("dmq-w4a6", "stage"), ("dmq-w4a6", "api"), ("qdiff-w4a8", "stage")]
)  # DMQ on the dump stage's store and on one quantize() samples; Q-Diffusion's learned shared steps
def test_quantize_gives_the_integers_gammas_and_ranges_of_the_stages(stage_repo, row, dumped_by, tmp_path):
    cfg = read_params(stage_repo / "params.yaml")
    store = stage_repo / "artifacts/calib.zarr"
    calibration = (
        Calibration(store=store)
        if dumped_by == "stage"
        else Calibration(num_samples=cfg.calib.num_samples, seed=cfg.calib.seed)
    )
    quantized = quantize(stage_repo / "artifacts/fp_model", cfg, calibration, row=row, workdir=tmp_path)
    if dumped_by == "api":  # the store quantize() dumped holds the dump stage's trajectories
        ours_store, stages_store = zarr.open_group(str(tmp_path / "calib.zarr"), mode="r"), zarr.open_group(str(store))
        assert np.array_equal(ours_store["trajectory/x_t"][:], stages_store["trajectory/x_t"][:])
    layers = quant_layers(quantized)
    entry = cfg.rows[row].weights
    weights, _ = read_tensors(stage_repo / f"artifacts/weights/{entry}/q0.safetensors")
    acts, _ = read_tensors(stage_repo / f"artifacts/act_params/{row}/q0.safetensors")
    gammas, _ = read_tensors(stage_repo / f"artifacts/les/{entry}/q0.safetensors")
    ours = {**weight_tensors(layers), **act_tensors({**layers, **matmul_inputs(quantized)})}
    assert set(ours) == set(weights) | set(acts)
    for key, value in {**weights, **acts, **gammas}.items():
        assert torch.equal(ours[key].cpu(), value), key
    # what makes each row itself: PTS chose a finer step somewhere; the shared steps equal at every step
    if row.startswith("dmq"):
        assert any(key.endswith("pts_exponent") and value.any() for key, value in acts.items())
    else:
        assert all((value == value[:1]).all() for key, value in acts.items() if key.endswith("act_scale"))


@pytest.fixture(scope="module")
def tiny_quantized(tmp_path_factory):
    folder = save_tiny_model("pixel", tmp_path_factory.mktemp("pixel") / "model")
    return folder, quantize(folder, preset("dmq", 4, 8, **TINY), Calibration(num_samples=4, seed=3))


def _outputs(unet) -> list[torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        return [unet(x, t).sample for t in (999, 500, 0)]


def test_a_saved_checkpoint_loads_to_the_same_outputs_and_saves_to_the_same_file(tiny_quantized, tmp_path):
    folder, quantized = tiny_quantized
    header = save(quantized, tmp_path / "a.safetensors")
    assert (header["w_bits"], header["a_bits"], header["steps"], header["method"]) == (4, 8, 3, "dmq")
    loaded = load(tmp_path / "a.safetensors", folder)
    for ours, theirs in zip(_outputs(quantized), _outputs(loaded)):
        assert torch.equal(ours, theirs)
    save(loaded, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_each_call_uses_the_activation_ranges_of_its_timesteps_step(tiny_quantized):
    _, quantized = tiny_quantized
    for timestep, step in ((999, 0), (0, 2)):  # 3 DDIM steps: the first is the noisiest, the last nearest 0
        with torch.no_grad():
            quantized(torch.zeros(1, 3, 8, 8), timestep)
        assert {layer.act_quantizer.step for layer in quant_layers(quantized).values()} == {step}


def test_the_quantized_unet_samples_in_a_diffusers_pipeline(tiny_quantized, tmp_path):
    from diffusers import DDIMPipeline, DDIMScheduler

    folder, quantized = tiny_quantized
    pipe = DDIMPipeline(unet=quantized, scheduler=DDIMScheduler.from_pretrained(folder))
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()


@pytest.mark.skipif(not int8_kernels_available(), reason="the int8 backend needs oneDNN's x86 kernels")
def test_the_int8_backend_matches_the_fake_quantized_unet(tiny_quantized, tmp_path):
    folder, quantized = tiny_quantized
    save(quantized, tmp_path / "q.safetensors")
    integer = load(tmp_path / "q.safetensors", folder, backend="int8")
    for ours, theirs in zip(_outputs(quantized), _outputs(integer)):
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="save before"):
        save(integer, tmp_path / "r.safetensors")


def test_a_unet_changed_after_loading_is_refused(tmp_path):
    from diffusers import UNet2DModel

    folder = save_tiny_model("pixel", tmp_path / "model")
    unet = UNet2DModel.from_pretrained(folder)
    with torch.no_grad():
        unet.conv_in.weight.add_(1)
    with pytest.raises(ValueError, match="differs from the one in"):
        quantize(unet, preset("dmq", 4, 8, **TINY), Calibration(num_samples=4, seed=3))


def test_the_readme_example_quantizes_saves_reloads_and_samples(tmp_path):
    folder = save_tiny_model("pixel", tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        str(ROOT / "examples/quantize_diffusers.py"),
        str(folder),
        str(tmp_path / "q.safetensors"),
    ]
    command += ["--steps", "3", "--calibration-samples", "4", "--les-iters", "2", "--recon-iters", "2"]
    command += ["--images", str(tmp_path / "samples.npy")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    images = np.load(tmp_path / "samples.npy")
    assert images.shape == (4, 8, 8, 3) and np.isfinite(images).all()
