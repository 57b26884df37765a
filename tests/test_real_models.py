"""Real-checkpoint model classes end to end through the library, on tiny random models (tests/tiny_models.py):
import -> dump -> LES -> weight reconstruction -> activation calibration with PTS -> sampling, each
artifact written to disk and read back by the next step, as the stages do."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import ROOT, init_repo, reduced_params, run
from pipeline.calibration.capture import Budget
from pipeline.calibration.dump import dump_calibration, open_calibration, random_records, records_by_step, step_records
from pipeline.config import parse_config
from pipeline.deploy.export import export_checkpoint, load_checkpoint, pack_nibbles, read_checkpoint, unpack_nibbles
from pipeline.deploy.integer import int8_kernels_available, to_integer
from pipeline.eval.sampling import generate, read_samples
from pipeline.infra.fingerprint import model_hash
from pipeline.infra.storage import ArtifactError, atomic_store, read_tensors, write_tensors
from pipeline.method.activation_ranges import calibrate_activations
from pipeline.method.adaround import AdaRoundSettings, adaround
from pipeline.method.les import LESSettings, learn_all
from pipeline.method.pts import PTSVoter, select_pts_layers
from pipeline.method.weight_init import init_weight_quantizers
from pipeline.models.denoiser import NULL, Decoder, load_denoiser, read_prompts
from pipeline.models.diffusion import ddim_scheduler, load_fp_model
from pipeline.models.local import find_layout, import_model
from pipeline.models.quantized import load_quantized_unet
from pipeline.quant import QuantSpec, quantizable_layers, quantize
from pipeline.quant.artifacts import act_tensors, load_gamma, weight_tensors
from pipeline.quant.model import concat_splits, set_step
from tiny_models import KINDS, PROMPTS, save_tiny_clip, save_tiny_model, write_prompts

CPU = torch.device("cpu")
STEPS, SAMPLES, SEED, GUIDANCE = 4, 4, 7, {"class": 3.0, "text": 7.5}
# Relative RMS error, quantized vs FP, at W8A8, as measured on these models (test_w8a8_stays_close_to_fp
# prints it): one denoiser call 0.018-0.037 (W4A8: 0.10-0.16); the sampler output after 4 DDIM steps
# 0.06-0.10, 0.39 for the class model, whose guidance scale 3 multiplies the error (W4A8: 0.13-0.66).
# Random weights make these far larger than on trained models; the bounds leave about 1.6x headroom.
W8A8_CALL_BOUND, W8A8_SAMPLE_BOUND = 0.06, 0.6


def relative_error(quant: torch.Tensor, fp: torch.Tensor) -> float:
    return float((quant - fp).pow(2).mean().sqrt() / fp.pow(2).mean().sqrt())


class Quantized:
    """One tiny model taken through every step once per bit-width; artifacts live in ``folder``."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind, self.folder = kind, folder
        self.prompts = read_prompts(write_prompts(folder / "prompts.txt")) if kind == "text" else None
        self.model = folder / "fp_model"
        import_model(save_tiny_model(kind, folder / "source"), self.model)
        self.hash = model_hash(self.model)
        unet, train_scheduler = load_fp_model(self.model)
        self.fp = load_denoiser(self.model, unet, self.prompts)
        self.scheduler = ddim_scheduler(train_scheduler, STEPS)
        self.guidance = GUIDANCE.get(kind, 1.0)
        self.calib = folder / "calib.zarr"
        with atomic_store(self.calib) as tmp:
            dump_calibration(
                tmp,
                self.fp,
                self.scheduler,
                quantizable_layers(unet),
                num_samples=SAMPLES,
                layer_records_per_step=8,
                layer_io_gb=1.0,
                batch_size=4,
                eta=0.0,
                seed=1,
                chunk_records=16,
                attrs={"model_hash": self.hash},
                device=CPU,
                guidance_scale=self.guidance,
            )
        self.runs: dict[str, dict] = {}

    def run(self, w_bits: int, a_bits: int) -> dict:
        label = f"W{w_bits}A{a_bits}"
        if label not in self.runs:
            self.runs[label] = self._run(w_bits, a_bits, self.folder / label)
        return self.runs[label]

    def _run(self, w_bits: int, a_bits: int, out: Path) -> dict:
        out.mkdir()
        header = {
            "model_hash": self.hash,
            "w_bits": w_bits,
            "a_bits": a_bits,
            "split": ["conv1", "conv_shortcut"],
            "steps": STEPS,
        }
        # LES on layer I/O captured from the trajectories, with the records' conditions
        les_unet, _ = load_fp_model(self.model)
        layers = quantize(les_unet, QuantSpec(w_bits=w_bits, a_bits=a_bits, split=("conv1", "conv_shortcut")))
        calib = open_calibration(self.calib)
        gammas, _ = learn_all(
            layers,
            self.fp,
            quantizable_layers(self.fp.unet),
            records_by_step(calib, 4, seed=0),
            STEPS,
            LESSettings("focal", iters=4, lr=1e-2, batch_size=4),
            budget=Budget.of(1, 1),
        )
        write_tensors(out / "les.safetensors", {f"{n}.gamma": g for n, g in gammas.items()}, header)
        # weight reconstruction (AdaRound), block by block on records with their conditions
        q_unet = copy.deepcopy(self.fp.unet)
        layers = quantize(q_unet, QuantSpec(w_bits=w_bits, split=("conv1", "conv_shortcut")))
        load_gamma(layers, read_tensors(out / "les.safetensors")[0], "les")
        init_weight_quantizers(layers, grid=20, p=2.4)
        inputs, _ = random_records(open_calibration(self.calib), 8, seed=0)
        settings = AdaRoundSettings(
            iters=6, lr=1e-3, batch_size=4, reg_lambda=0.01, beta_start=20, beta_end=2, warmup=0.2, seed=0
        )
        units = adaround(self.fp.with_unet(q_unet), self.fp, inputs, settings)
        write_tensors(out / "weights.safetensors", weight_tensors(layers), header)
        # per-step activation calibration with PTS voting on the ResNet shortcuts
        q_unet, _, layers, _ = load_quantized_unet(
            self.model, out / "weights.safetensors", None, self.hash, STEPS, a_bits=a_bits
        )
        q = self.fp.with_unet(q_unet)
        voter = PTSVoter({n: layers[n] for n in select_pts_layers(list(layers), ["*conv_shortcut"])}, 4, 0.85)
        calibrate_activations(
            q, layers, open_calibration(self.calib), 8, 4, 0.95, CPU, lambda s, inputs: voter(q, s, inputs, 4)
        )
        write_tensors(out / "act_params.safetensors", act_tensors(layers), header)
        # sampling from the reloaded artifacts, FP and quantized from the same noise and conditions
        q_unet, *_ = load_quantized_unet(
            self.model, out / "weights.safetensors", out / "act_params.safetensors", self.hash, STEPS
        )
        fp = generate(self.fp, self.scheduler, SAMPLES, SAMPLES, 0.0, SEED, CPU, "fp", self.guidance)
        quant = generate(
            self.fp.with_unet(q_unet), self.scheduler, SAMPLES, SAMPLES, 0.0, SEED, CPU, "quant", self.guidance
        )
        return {
            "fp": fp,
            "quant": quant,
            "units": units,
            "error": relative_error(quant, fp),
            "eps_error": self._eps_error(q_unet),
            "dir": out,
        }

    @torch.no_grad()
    def _eps_error(self, q_unet) -> float:
        """Relative error of one denoiser call, quantized vs FP, on each step's calibration records
        (with that step's activation parameters), averaged over steps."""
        q, root = self.fp.with_unet(q_unet), open_calibration(self.calib)
        errors = []
        for s in range(STEPS):
            set_step(q, s)
            inputs = step_records(root, s, 8)
            errors.append(relative_error(q(*inputs), self.fp(*inputs)))
        return sum(errors) / STEPS


@pytest.fixture(scope="module", params=KINDS)
def quantized(request, tmp_path_factory):
    return Quantized(request.param, tmp_path_factory.mktemp(request.param))


def test_w8a8_stays_close_to_fp(quantized):
    w8, w4 = quantized.run(8, 8), quantized.run(4, 8)
    print(
        f"\n{quantized.kind}: relative RMS error quantized vs FP, sampler output W8A8 {w8['error']:.4f} W4A8 "
        f"{w4['error']:.4f}; "
        f"one denoiser call W8A8 {w8['eps_error']:.4f} W4A8 {w4['eps_error']:.4f}",
        file=sys.stderr,
    )
    assert w8["eps_error"] < W8A8_CALL_BOUND and w8["error"] < W8A8_SAMPLE_BOUND
    assert w4["eps_error"] > w8["eps_error"]  # 4-bit weights must cost something: the comparison is not vacuous
    assert torch.isfinite(w4["quant"]).all()


def test_every_block_kind_is_reconstructed(quantized):
    """Block-wise AdaRound reaches the ResNet blocks and the attention / transformer blocks."""
    units = quantized.run(8, 8)["units"]
    assert any(re.fullmatch(r"unet\..*resnets\.\d+", name) for name in units)
    # self-attention blocks of UNet2DModel, whole Transformer2DModel blocks (attn1, attn2, ff) of SD
    assert any(re.fullmatch(r"unet\..*attentions\.\d+", name) for name in units)


def test_quantization_covers_transformer_linears_and_up_block_concats(quantized):
    layers = quantizable_layers(quantized.fp.unet)
    names = " ".join(layers)
    for part in ("to_q", "to_k", "to_v", "to_out.0"):
        assert f".{part}" in names
    if quantized.kind == "text":
        assert any(n.endswith("attn2.to_k") for n in layers) and any(n.endswith("ff.net.2") for n in layers)
    assert not any(
        n.endswith("time_emb_proj") or n.startswith("time_embedding") or n.startswith("class_embedding") for n in layers
    )
    splits = concat_splits(quantized.fp.unet)
    assert splits and all(n.startswith("up_blocks.") for n in splits)
    # each split sits where the skip connection starts in the concatenated input
    first = quantized.fp.unet.up_blocks[0].resnets[0]
    assert (
        splits["up_blocks.0.resnets.0.conv1"]
        == first.conv1.in_channels - quantized.fp.unet.down_blocks[-1].resnets[-1].out_channels
    )


def test_calibration_records_conditional_and_unconditional_inputs(quantized):
    root = open_calibration(quantized.calib)
    inputs = step_records(root, 1, 6)
    if quantized.kind in ("pixel", "latent"):
        assert len(inputs) == 2 and not root.attrs["guided"]
        return
    x, t, cond = inputs
    assert root.attrs["guided"] and (cond[1::2] == NULL).all() and (cond[0::2] >= 0).all()
    torch.testing.assert_close(x[0::2], x[1::2])  # the unconditional twin sees the same x_t
    assert root["layers/up_blocks.0.resnets.0.conv1/input"].shape[0] == STEPS * root.attrs["layer_records_per_step"]


def test_decoding_to_pixels(quantized):
    images = Decoder(find_layout(quantized.model))(quantized.run(8, 8)["quant"])
    latent = quantized.kind in ("latent", "text")
    assert images.shape[1:] == ((3, 16, 16) if latent else (3, 8, 8))
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".json", ".coco.json"])
def test_prompt_files(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(PROMPTS) + "\n\n")
    elif suffix == ".csv":
        path.write_text("id,caption\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(PROMPTS)))
    elif suffix == ".json":
        path.write_text(json.dumps(PROMPTS))
    else:
        path.write_text(json.dumps({"annotations": [{"image_id": i, "caption": p} for i, p in enumerate(PROMPTS)]}))
    assert read_prompts(path) == PROMPTS and read_prompts(path, 2) == PROMPTS[:2]


def test_bad_model_folders_are_refused_with_the_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither unet/"):
        find_layout(tmp_path)
    folder = save_tiny_model("text", tmp_path / "sd")
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(FileNotFoundError, match="UNet2DConditionModel .* needs text_encoder/"):
        find_layout(folder)
    with pytest.raises(ValueError, match="text-to-image model: it needs prompts"):
        load_denoiser(save_tiny_model("text", tmp_path / "sd2"), None)


def test_nibble_packing_is_exact_and_two_per_byte():
    assert pack_nibbles(torch.tensor([1, 2, 3])).tolist() == [0x21, 0x03]  # low nibble first, odd count padded
    for shape in [(7, 3, 3, 3), (5, 6), (1,)]:
        values = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(len(shape)))
        packed = pack_nibbles(values)
        assert packed.dtype == torch.uint8 and packed.numel() == (values.numel() + 1) // 2
        assert torch.equal(unpack_nibbles(packed, shape), values)


def export(quantized, w_bits: int) -> tuple[Path, dict]:
    run = quantized.run(w_bits, 8)
    sample = {
        "seeds": [SEED],
        "eta": 0.0,
        "guidance_scale": quantized.guidance,
        "prompts": str(quantized.folder / "prompts.txt") if quantized.prompts else None,
    }
    config = parse_config({"diffusion": {"steps": STEPS}, "sample": sample}).model_dump(mode="json")
    path = run["dir"] / "checkpoint.safetensors"
    export_checkpoint(
        path,
        run["dir"] / "weights.safetensors",
        run["dir"] / "act_params.safetensors",
        quantized.model,
        quantized.hash,
        config,
    )
    return path, run


def test_checkpoint_round_trip_samples_like_the_pipeline_artifacts(quantized):
    path, run = export(quantized, 4)
    weights, _, header = read_checkpoint(path)
    stored = read_tensors(run["dir"] / "weights.safetensors")[0]
    assert header["packed_shapes"] and set(weights) == set(stored)
    assert all(torch.equal(weights[k], stored[k]) for k in stored)
    unet, *_ = load_checkpoint(path, quantized.model)
    images = generate(
        quantized.fp.with_unet(unet),
        quantized.scheduler,
        SAMPLES,
        SAMPLES,
        0.0,
        SEED,
        CPU,
        "checkpoint",
        quantized.guidance,
    )
    assert torch.equal(images, run["quant"])
    # 8-bit weights are stored one per byte, and read back the same way
    path8, run8 = export(quantized, 8)
    weights8, _, header8 = read_checkpoint(path8)
    assert not header8["packed_shapes"] and all(
        torch.equal(weights8[k], v) for k, v in read_tensors(run8["dir"] / "weights.safetensors")[0].items()
    )


@pytest.mark.skipif(not int8_kernels_available(), reason="oneDNN int8 kernels need an x86 build of torch")
def test_int8_backend_samples_the_checkpoint_like_the_fake_model(quantized, tmp_path):
    """The pipeline's own W4A8 artifacts (LES γ, AdaRound integers, PTS votes, splits) on every model class,
    sampled on int8 kernels, library call and CLI: within float rounding of the fake samples, which here
    means above 30 dB PSNR and 15 dB nearer to them than FP is (the figure is printed)."""
    path, run = export(quantized, 4)
    unet, *_ = load_checkpoint(path, quantized.model)
    assert to_integer(unet)
    images = generate(
        quantized.fp.with_unet(unet), quantized.scheduler, SAMPLES, SAMPLES, 0.0, SEED, CPU, "int8", quantized.guidance
    )
    fake = run["quant"]

    def psnr(a):
        return float(10 * torch.log10((fake.max() - fake.min()) ** 2 / ((a - fake) ** 2).mean()))

    print(f"\n{quantized.kind}: PSNR vs fake W4A8 samples: int8 {psnr(images):.1f} dB, FP {psnr(run['fp']):.1f} dB")
    assert psnr(images) > 30 and psnr(images) > psnr(run["fp"]) + 15, (psnr(images), psnr(run["fp"]))
    if quantized.kind != "latent":
        return
    out = tmp_path / "int8.safetensors"
    cmd = [sys.executable, str(ROOT / "cli.py"), "sample", "--quantized", str(path), "--model", str(quantized.model)]
    args = ["--out", str(out), "--num-samples", str(SAMPLES), "--batch-size", str(SAMPLES), "--backend", "int8"]
    done = subprocess.run(cmd + args, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    decoded = Decoder(find_layout(quantized.model))(images)
    torch.testing.assert_close(read_tensors(out)[0]["images"], decoded, atol=1e-5, rtol=1e-5)
    refused = subprocess.run([*cmd, *args[:-1], "int4"], cwd=tmp_path, capture_output=True, text=True)
    assert refused.returncode == 1 and "--backend 'int4': expected fake or int8" in refused.stderr


def test_checkpoint_for_another_model_is_refused(quantized, tmp_path):
    path, _ = export(quantized, 4)
    other = "latent" if quantized.kind == "pixel" else "pixel"
    folder = save_tiny_model(other, tmp_path / other)
    with pytest.raises(
        ArtifactError, match=r"was exported for another model: its UNet weights hash to \w+, the UNet in .* to \w+"
    ):
        load_checkpoint(path, folder)


def test_cli_samples_from_the_checkpoint_and_the_users_own_model_folder(quantized, tmp_path):
    """Outside the repository, on the model folder as the user has it (bare UNet, vqvae/, ...)."""
    path, run = export(quantized, 4)
    out = tmp_path / "samples.safetensors"
    cmd = [
        sys.executable,
        str(ROOT / "cli.py"),
        "sample",
        "--quantized",
        str(path),
        "--model",
        str(quantized.folder / "source"),
        "--out",
        str(out),
        "--num-samples",
        str(SAMPLES),
        "--batch-size",
        str(SAMPLES),
    ]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = Decoder(find_layout(quantized.model))(run["quant"])
    torch.testing.assert_close(read_tensors(out)[0]["images"], expected, atol=1e-5, rtol=1e-5)
    assert out.with_suffix(".png").exists()


def test_fid_with_local_inception_weights(inception_weights, tmp_path):
    from pipeline.eval.metrics import INCEPTION, evaluate_runs, feature_space, reference_set

    features = feature_space("unused-classifier", str(inception_weights))
    assert features.extractor == INCEPTION and features.note == "Inception-v3 features"
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 8, 8, generator=generator) * 2 - 1
    folder = tmp_path / "reference"
    folder.mkdir()
    from PIL import Image

    for i, image in enumerate(((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{i}.png")
    reference = reference_set("local", 8, str(folder), images)
    other = -images  # a different distribution of the same size
    same = evaluate_runs({0: images}, reference, features, kid_subset_size=6, isc_splits=2, prc_neighborhood=3)
    apart = evaluate_runs({0: other}, reference, features, kid_subset_size=6, isc_splits=2, prc_neighborhood=3)
    assert same["features"] == "Inception-v3 features" and "confident_share" not in same["mean"]
    assert all(torch.isfinite(torch.tensor(v)) for v in same["mean"].values())
    assert abs(same["mean"]["fid"]) < 1e-3 * apart["mean"]["fid"]  # the samples are the reference images
    assert abs(same["mean"]["sfid"]) < 1e-3 * apart["mean"]["sfid"]  # sFID beside FID, with Inception
    with pytest.raises(FileNotFoundError, match="eval.inception_weights: .* not found"):
        feature_space("unused", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="eval.reference_images: required for the metrics of a local model"):
        reference_set("local", 8, None, images)


def test_params_of_a_local_text_model_name_what_is_missing(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.params import load_config

    folder = save_tiny_model("text", tmp_path / "sd")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(source="local", path=str(folder))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    for key in ("calib.prompts: required for the text-to-image model", "sample.prompts: required"):
        assert key in str(error.value)
    assert "eval.inception_weights" not in str(error.value)  # optional: without it, the paired metrics
    params["calib"]["prompts"] = str(tmp_path / "missing.txt")
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"calib\.prompts: prompts file .*missing\.txt not found"):
        load_config(path)


def test_bad_evaluation_files_are_refused_at_load_time_naming_the_key(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.params import load_config

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    prompts = str(write_prompts(tmp_path / "prompts.txt"))
    params["model"].update(source="local", path=str(save_tiny_model("text", tmp_path / "sd")))
    params["calib"]["prompts"] = params["sample"]["prompts"] = prompts
    (empty := tmp_path / "empty").mkdir()
    clip = save_tiny_clip(tmp_path / "clip")
    (clip / "model.safetensors").unlink()
    params["eval"].update(reference_images=str(empty), clip_model=str(clip))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert re.search(r"eval\.reference_images: .*empty is not a folder of images", str(error.value))
    assert re.search(r"eval\.clip_model: .*clip is not a CLIP model folder: it lacks model weights", str(error.value))
    params["model"]["path"] = str(save_tiny_model("pixel", tmp_path / "pixel"))
    params["eval"].update(reference_images=None, clip_model=str(save_tiny_clip(tmp_path / "clip2")))
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"eval\.clip_model: the CLIP score is for text-to-image models"):
        load_config(path)


def test_check_params_accepts_a_local_model_without_inception_with_a_notice(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(source="local", path=str(save_tiny_model("pixel", tmp_path / "pixel")))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    done = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "check-params", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == f"{path}: ok" and len(lines) == 3
    assert "FID / sFID will not be computed (no eval.inception_weights and eval.reference_images)" in lines[0]
    assert "the guards compare pixel MSE, not features" in lines[1]


@pytest.mark.slow
def test_a_local_model_without_inception_weights_runs_every_stage_and_says_fid_was_not_computed(tmp_path):
    """The stage scripts on a tiny pixel-space model folder with neither eval.inception_weights nor
    eval.reference_images: the metrics are the paired error against FP, and the tables say FID / sFID
    were not computed, naming the keys; with protocol_samples the header says the sample count is short."""
    repo = init_repo(tmp_path / "repo", reduced_params())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update(source="local", path=str(save_tiny_model("pixel", tmp_path / "pixel")))
    params["calib"].update(num_samples=4, layer_records_per_step=4, batch_size=4)
    params["sample"].update(num_samples=6, batch_size=6, seeds=[1, 2])
    params["weights"] = {"qdiff-w4": {"method": "qdiff", "w_bits": 4}}
    params["rows"] = {"qdiff-w4a8": {"weights": "qdiff-w4", "a_bits": 8}}
    params["peers"] = {}
    params["report"] = {
        "table": ["qdiff-w4a8"],
        "ablation": ["qdiff-w4a8"],
        "grid_bits": "W4A8",
        "protocol_samples": 50000,
    }
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in (
        "fp_model",
        "classifier",
        "dump",
        "stats",
        "les qdiff-w4",
        "recon qdiff-w4",
        "pts qdiff-w4a8",
        "sample fp",
        "sample qdiff-w4a8",
        "eval_files",
        "reference",
        "fid fp",
        "fid qdiff-w4a8",
        "report",
    ):
        run([sys.executable, "-m", *f"stages.{stage}".split()], repo)
    metrics = json.loads((repo / "metrics/qdiff-w4a8.json").read_text())
    assert set(metrics["mean"]) == {"num_samples", "paired_mse", "paired_psnr_db"} and metrics["mean"]["paired_mse"] > 0
    assert "not computed" in metrics["features"]
    for name in ("paper_table", "ablation"):
        text = (repo / f"reports/{name}.md").read_text()
        assert "FID and sFID were not computed" in text and "`eval.inception_weights`" in text, name
        assert "| MSE vs FP ↓ | PSNR vs FP (dB) ↑ |" in text and "FID ↓" not in text, name
        assert "Samples (protocol: 50000)" in text and "fewer than the protocol's 50000" in text, name


@pytest.mark.slow
def test_every_stage_runs_on_a_local_text_to_image_model(tmp_path, inception_weights):
    """The DVC stage scripts, in dvc.yaml's order, on a tiny Stable-Diffusion-like folder: import,
    dump with guidance, stats, LES, AdaRound, PTS, sampling with decoding, FID with Inception features."""
    from PIL import Image

    repo = init_repo(tmp_path / "repo", reduced_params())
    source = save_tiny_model("text", tmp_path / "sd")
    prompts = write_prompts(tmp_path / "prompts.txt")
    (references := tmp_path / "reference").mkdir()
    for i in range(6):
        Image.fromarray(
            torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8).numpy()
        ).save(references / f"{i}.png")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update(source="local", path=str(source))
    params["calib"].update(prompts=str(prompts), num_samples=4, layer_records_per_step=4, batch_size=4)
    params["sample"].update(prompts=str(prompts), num_samples=6, batch_size=6, seeds=[1])
    clip = save_tiny_clip(tmp_path / "clip")
    params["eval"].update(
        inception_weights=str(inception_weights),
        reference_images=str(references),
        kid_subset_size=6,
        clip_model=str(clip),
    )
    params["weights"] = {"dmq-w4a8": {"method": "dmq", "w_bits": 4, "a_bits": 8}}
    params["rows"] = {"dmq-w4a8": {"weights": "dmq-w4a8", "a_bits": 8}}
    params["peers"], params["report"] = {}, {"table": ["dmq-w4a8"], "ablation": ["dmq-w4a8"]}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in (
        "fp_model",
        "classifier",
        "dump",
        "stats",
        "les dmq-w4a8",
        "recon dmq-w4a8",
        "pts dmq-w4a8",
        "sample fp",
        "sample dmq-w4a8",
        "eval_files",
        "reference",
        "fid fp",
        "fid dmq-w4a8",
        "report",
    ):
        run([sys.executable, "-m", *f"stages.{stage}".split()], repo)
    metrics = json.loads((repo / "metrics/dmq-w4a8.json").read_text())
    assert metrics["features"] == "Inception-v3 features" and metrics["mean"]["paired_mse"] > 0
    assert metrics["mean"]["sfid"] >= 0 and 0 <= metrics["mean"]["clip_score"] <= 100
    table = (repo / "reports/paper_table.md").read_text()
    assert "| sFID ↓ |" in table and "| CLIP score ↑ |" in table
    root = open_calibration(repo / "artifacts/calib.zarr")
    assert root.attrs["guided"] and root.attrs["prompts"] == PROMPTS
    # the row as a portable checkpoint, sampled outside the repository on the user's own model folder
    run([sys.executable, "cli.py", "export", "--row", "dmq-w4a8", str(tmp_path / "sd-w4a8.safetensors")], repo)
    run(
        [
            sys.executable,
            str(repo / "cli.py"),
            "sample",
            "--quantized",
            str(tmp_path / "sd-w4a8.safetensors"),
            "--model",
            str(source),
            "--num-samples",
            "6",
            "--batch-size",
            "6",
            "--seed",
            "1",
            "--out",
            str(tmp_path / "out.safetensors"),
        ],
        tmp_path,
    )
    row_samples = read_samples(repo / "artifacts/samples/dmq-w4a8.zarr")[0][1]
    torch.testing.assert_close(
        read_tensors(tmp_path / "out.safetensors")[0]["images"], row_samples, atol=1e-5, rtol=1e-5
    )
