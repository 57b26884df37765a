"""CompVis checkpoints read through pipeline/models/compvis.py, checked against the ORIGINAL code's outputs:
tests/fixtures/compvis/make_fixtures.py built each family's network at a tiny width from CompVis'
latent-diffusion / stable-diffusion / taming-transformers code and saved its outputs on fixed inputs; the
full-size key sets come from the original configs built on the meta device (keys.json.gz)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.infra.storage import ArtifactError
from pipeline.models.compvis import (
    FIRST_STAGE_PREFIX,
    PUBLISHED,
    UNET_PREFIX,
    build_first_stage,
    build_text_encoder,
    build_unet,
    check_supported,
    clip_vocabulary,
    detect_family,
    import_checkpoint,
    read_state_dict,
    save_clip_tokenizer,
)
from pipeline.models.denoiser import NULL, Decoder, load_denoiser
from pipeline.models.local import (
    HEADS_PER_LEVEL,
    import_model,
    load_scheduler,
    load_text_encoder,
    load_unet,
    unet_skeleton_from,
)
from pipeline.quant.attention import attention_modules

FIXTURES = Path(__file__).parent / "fixtures" / "compvis"
FAMILIES = {"ldm4-bedrooms": "first_stage.ckpt", "ldm8-churches": None, "ldm4-cin256": None, "sd-v1": None}
# float32 rounding: the original and the diffusers networks order their sums differently
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def imported(name: str, folder: Path):
    fixture = FIXTURES / name
    first_stage = fixture / FAMILIES[name] if FAMILIES[name] else None
    return import_checkpoint(fixture / "model.ckpt", folder, first_stage=first_stage, config=fixture / "config.yaml")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    return name, imported(name, tmp_path_factory.mktemp(name)), load_file(FIXTURES / name / "expected.safetensors")


@torch.no_grad()
def test_the_denoiser_predicts_the_original_eps(family):
    name, layout, expected = family
    unet = load_unet(layout)
    if name == "ldm4-cin256":  # class 2, and the null class (the table's last row) as the NULL key
        cond = torch.where(expected["class_label"] == 4, NULL, expected["class_label"])
        eps = load_denoiser(layout.unet.parent, unet)(expected["x_t"], expected["t"], cond)
    elif name == "sd-v1":  # the original's context: its text transformer's embedding of fixed ids
        eps = unet(expected["x_t"], expected["t"], encoder_hidden_states=expected["text_embedding"]).sample
    else:
        eps = load_denoiser(layout.unet.parent, unet)(expected["x_t"], expected["t"])
    torch.testing.assert_close(eps, expected["eps"], **TOLERANCE)


@torch.no_grad()
def test_the_first_stage_decodes_as_the_original(family):
    name, layout, expected = family
    decoder = Decoder(layout)
    if name == "ldm8-churches":  # scale_by_std: the factor the checkpoint stores
        assert decoder.autoencoder.config.scaling_factor == pytest.approx(expected["scale_factor"].item())
    # Decoder divides by the scaling factor and clamps, as LatentDiffusion.decode_first_stage and its samplers do
    scaled = expected["z"] * decoder.autoencoder.config.scaling_factor
    torch.testing.assert_close(decoder(scaled), expected["decoded"].clamp(-1, 1), **TOLERANCE)


def test_the_scheduler_has_the_checkpoints_schedule(family):
    _, layout, expected = family
    scheduler = load_scheduler(layout)
    torch.testing.assert_close(scheduler.betas, expected["betas"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(scheduler.alphas_cumprod, expected["alphas_cumprod"], rtol=1e-5, atol=1e-7)
    # CompVis' DDIM: timesteps 1 + k·T/S, the last step's previous ᾱ is ᾱ_0
    scheduler.set_timesteps(20)
    assert scheduler.timesteps[-1] == 1 and scheduler.timesteps[0] == 951
    assert scheduler.final_alpha_cumprod == scheduler.alphas_cumprod[0]


@torch.no_grad()
def test_the_text_encoder_embeds_as_the_original(tmp_path):
    layout = imported("sd-v1", tmp_path / "sd")
    encoder, tokenizer = load_text_encoder(layout)
    expected = load_file(FIXTURES / "sd-v1" / "expected.safetensors")
    torch.testing.assert_close(encoder(expected["text_ids"])[0], expected["text_embedding"], **TOLERANCE)
    assert tokenizer.model_max_length == 77


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="CLIP's BPE file comes with open-clip-torch")
def test_the_tokenizer_gives_openai_clips_ids(tmp_path):
    """Punctuation, the empty prompt and a prompt beyond 77 tokens (truncated, ending in <|endoftext|>)."""
    tokens = json.loads((FIXTURES / "tokens.json").read_text())
    tokenizer = save_clip_tokenizer(clip_vocabulary(), tmp_path / "tokenizer")
    ids = tokenizer(tokens["prompts"], padding="max_length", max_length=77, truncation=True).input_ids
    assert ids == tokens["input_ids"]


def full_size(family: str) -> dict[str, torch.Tensor]:
    with gzip.open(FIXTURES / "keys.json.gz", "rt") as f:
        shapes = json.load(f)[family]
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


@pytest.mark.parametrize("family", ["ldm4-lsun-bedrooms", "ldm8-lsun-churches", "ldm4-cin256-v2", "sd-v1"])
def test_every_key_of_the_real_checkpoints_maps(family):
    """The real configs' UNet and first-stage keys (from the original code on the meta device) all land in the
    diffusers models built from the family's published config, with matching shapes, and none is left over."""
    state = full_size(family)
    if family == "sd-v1":
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device("meta"):
            clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12))
        # sd-v1-4.ckpt's layout: transformers 4's text_model.* under cond_stage_model.transformer.
        state |= {
            f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v
            for k, v in clip.state_dict().items()
        }
        encoder = build_text_encoder(state, family, device="meta")
        assert encoder.config.num_attention_heads == 12 and encoder.config.vocab_size == 49408
    assert detect_family(state, Path(family)) == family
    params = PUBLISHED[family]
    unet = build_unet(state, params, family, device="meta")
    stage = {k.removeprefix(FIRST_STAGE_PREFIX): v for k, v in state.items() if k.startswith(FIRST_STAGE_PREFIX)}
    build_first_stage(stage, params, 1.0, family, device="meta")
    unet_keys = [k for k in state if k.startswith(UNET_PREFIX)]
    assert sum(p.numel() for p in unet.parameters()) == sum(state[k].numel() for k in unet_keys)


def test_ldm8_churches_has_8_heads_at_every_width():
    """num_heads: 8 with no num_head_channels, so heads 24, 48 and 96 channels wide across the levels (192 to
    768 channels), which diffusers' one attention_head_dim cannot say: the config's heads per level do."""
    unet = build_unet(full_size("ldm8-lsun-churches"), PUBLISHED["ldm8-lsun-churches"], "churches", device="meta")
    assert unet.config[HEADS_PER_LEVEL] == [8] * 5
    attentions = attention_modules(unet).values()
    assert {a.heads for a in attentions} == {8}
    assert {a.to_q.out_features // 8: a.scale for a in attentions} == {w: w**-0.5 for w in (24, 48, 96)}


def test_heads_per_level_are_set_wherever_a_stage_builds_the_unet_and_only_there(tmp_path):
    """The Churches UNet's heads per level survive its folder (save_pretrained, from_pretrained, fp_model's
    re-import) and are set on the loaded UNet and the meta skeleton; a UNet without the key has diffusers' own
    heads, as from_config builds it."""
    churches = imported("ldm8-churches", tmp_path / "churches")
    copied = import_model(churches.unet.parent, tmp_path / "copied")
    for unet in (load_unet(churches), unet_skeleton_from(churches.unet.parent), load_unet(copied)):
        assert unet.config[HEADS_PER_LEVEL] == [2, 2, 2]
        assert {a.heads for a in attention_modules(unet).values()} == {2}
    bedrooms = imported("ldm4-bedrooms", tmp_path / "bedrooms")
    for unet in (load_unet(bedrooms), unet_skeleton_from(bedrooms.unet.parent)):
        assert HEADS_PER_LEVEL not in unet.config
        plain = attention_modules(type(unet).from_config(unet.config))
        assert {n: (a.heads, a.scale) for n, a in attention_modules(unet).items()} == {
            n: (a.heads, a.scale) for n, a in plain.items()
        }
        assert {a.heads for a in plain.values()} == {4}  # 16 channels, heads 4 wide (num_head_channels)


def test_attention_the_conversion_does_not_know_is_refused():
    params = PUBLISHED["ldm4-lsun-bedrooms"]
    unet = params["unet_config"]["params"]
    for extra in ({"use_new_attention_order": True}, {"num_heads": 4, "num_heads_upsample": 2}):
        changed = params | {"unet_config": {"params": unet | extra}}
        with pytest.raises(ArtifactError, match="bedrooms.yaml: a UNet with use_new_attention_order or its own"):
            check_supported(changed, "bedrooms.yaml")


def test_the_cli_imports_a_checkpoint(tmp_path):
    fixture = FIXTURES / "ldm4-bedrooms"
    cmd = [sys.executable, str(Path(__file__).parents[1] / "cli.py"), "import-ckpt", str(fixture / "model.ckpt")]
    args = [str(tmp_path / "out"), "--config", str(fixture / "config.yaml")]
    done = subprocess.run(cmd + args + ["--first-stage", str(fixture / "first_stage.ckpt")], capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert b"unet, vae, scheduler; use it as model.source: local" in done.stdout
    refused = subprocess.run(cmd + [str(tmp_path / "out2"), *args[1:]], capture_output=True, text=True)
    assert refused.returncode == 1 and "holds no first stage (first_stage_model.*)" in refused.stderr


def doctor(tmp_path: Path, *options: str):
    from typer.testing import CliRunner

    from cli import app

    args = ["doctor", "--params", str(tmp_path / "params.yaml"), "--artifacts", str(tmp_path / "artifacts"), *options]
    return CliRunner().invoke(app, args)


def test_doctor_predicts_an_imported_checkpoints_stages(tmp_path):
    folder = imported("ldm4-cin256", tmp_path / "model").unet.parent
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    params["model"].update(source="local", path=str(folder))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = doctor(tmp_path)
    assert result.exit_code == 0, result.output[-3000:]
    for stage in ("dump", "stats", "les", "recon", "pts", "sample"):
        assert f"ok  predicted peak of {stage}: host" in result.output


@pytest.mark.parametrize("name", ["ldm4-bedrooms", "ldm8-churches"])
def test_doctor_predicts_from_a_checkpoint_not_imported_yet(tmp_path, name):
    """The same predictions as for the folder import-ckpt writes, with the params' model (embedded here) set aside."""
    fixture = FIXTURES / name
    (tmp_path / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    options = ["--config", str(fixture / "config.yaml")]
    options += ["--first-stage", str(fixture / FAMILIES[name])] if FAMILIES[name] else []
    result = doctor(tmp_path, "--ckpt", str(fixture / "model.ckpt"), *options)
    assert result.exit_code == 0, result.output[-3000:]
    assert f"ok  checkpoint: {fixture / 'model.ckpt'}: imported (scheduler, unet, vae)" in result.output
    assert re.search(r"ok  model: .*/model: UNet2DModel, \d+ quantizable layers", result.output)
    for stage in ("dump", "stats", "les", "recon", "pts", "sample"):
        assert f"ok  predicted peak of {stage}: host" in result.output


def test_doctor_names_a_missing_first_stage(tmp_path):
    fixture = FIXTURES / "ldm4-bedrooms"
    (tmp_path / "params.yaml").write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    refused = doctor(tmp_path, "--ckpt", str(fixture / "model.ckpt"), "--config", str(fixture / "config.yaml"))
    assert refused.exit_code == 1
    assert f"PROBLEM  checkpoint: {fixture / 'model.ckpt'} holds no first stage" in refused.output


# --- bad input: each refused with the file and what was found --------------------------------------


def unet_state() -> dict[str, torch.Tensor]:
    return {UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}


@pytest.mark.parametrize(
    "extra, found",
    [
        ({"cond_stage_model.model.token_embedding.weight": torch.zeros(1)}, "Stable Diffusion 2.x .*OpenCLIP"),
        ({"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1)}, "SDXL"),
    ],
)
def test_unsupported_families_are_refused_by_name(tmp_path, extra, found):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": unet_state() | extra}, path)
    with pytest.raises(ArtifactError, match=f"{path}.* is an? {found}"):
        import_checkpoint(path, tmp_path / "out")


def test_a_v_prediction_config_is_refused(tmp_path):
    fixture = FIXTURES / "sd-v1"
    config = yaml.safe_load((fixture / "config.yaml").read_text())
    config["model"]["params"]["parameterization"] = "v"
    (path := tmp_path / "v2-inference-v.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ArtifactError, match=r"v2-inference-v\.yaml: parameterization 'v'.*only ε-prediction"):
        import_checkpoint(fixture / "model.ckpt", tmp_path / "out", config=path)


def test_a_schedule_other_than_the_configs_is_refused(tmp_path):
    fixture = FIXTURES / "ldm4-cin256"
    config = yaml.safe_load((fixture / "config.yaml").read_text())
    config["model"]["params"]["linear_end"] = 0.012  # SD's schedule, not the one this model was trained on
    (path := tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    model = fixture / "model.ckpt"
    with pytest.raises(ArtifactError, match=rf"{model}: its β schedule \(betas: 1000 steps, .* 0\.0195\) is not"):
        import_checkpoint(model, tmp_path / "out", config=path)


def test_a_missing_or_unfitting_first_stage_is_refused(tmp_path):
    fixture = FIXTURES / "ldm4-bedrooms"
    model, config = fixture / "model.ckpt", fixture / "config.yaml"
    with pytest.raises(ArtifactError, match=f"{model} holds no first stage .*pass the autoencoder's checkpoint"):
        import_checkpoint(model, tmp_path / "a", config=config)
    sd = FIXTURES / "sd-v1" / "model.ckpt"  # a KL-f8 first stage: 4-channel latents
    with pytest.raises(ArtifactError, match=f"{sd}: its first stage has 4-channel latents, the UNet of .* takes 3"):
        import_checkpoint(model, tmp_path / "b", config=config, first_stage=sd)
    with pytest.raises(ArtifactError, match="holds a first-stage autoencoder .*not a latent diffusion checkpoint"):
        import_checkpoint(fixture / "first_stage.ckpt", tmp_path / "c")


def test_truncated_and_foreign_files_are_refused(tmp_path):
    data = (FIXTURES / "ldm4-bedrooms" / "model.ckpt").read_bytes()
    (truncated := tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (text := tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    (empty := tmp_path / "empty.ckpt").write_bytes(b"")
    for path in (truncated, text, empty):
        with pytest.raises(ArtifactError, match=f"{path} is not a readable PyTorch checkpoint"):
            read_state_dict(path)
    (bad := tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ArtifactError, match=f"{bad} is not a readable safetensors file"):
        read_state_dict(bad)
    torch.save({"step": 3}, no_tensors := tmp_path / "counter.ckpt")
    with pytest.raises(ArtifactError, match=f"{no_tensors} holds no tensors"):
        read_state_dict(no_tensors)


class RunsCode:
    def __reduce__(self):
        return os.system, (f"touch {RunsCode.marker}",)


def test_a_pickle_that_would_run_code_is_refused_unexecuted(tmp_path):
    RunsCode.marker = tmp_path / "executed"
    path = tmp_path / "evil.ckpt"
    with path.open("wb") as f:
        pickle.dump({"state_dict": RunsCode()}, f, protocol=2)  # as torch.save writes
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callback": RunsCode()}, zipped := tmp_path / "evil_zip.ckpt")
    for file in (path, zipped):
        with pytest.raises(ArtifactError, match=f"{file} is a pickle that would run code to load .*system.*refused"):
            read_state_dict(file)
    assert not RunsCode.marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ldm4-bedrooms", "ldm8-churches", "ldm4-cin256"])
def test_the_stages_run_on_an_imported_checkpoint(tmp_path, name):
    """dump → stats → les → recon → pts → sample on a tiny imported CompVis checkpoint (one DMQ row, one
    seed, no Inception weights: the paired error against FP); the class-conditional one with guidance 3."""
    from helpers import init_repo, reduced_params, run

    folder = imported(name, tmp_path / "model").unet.parent
    repo = init_repo(tmp_path / "repo", reduced_params())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update(source="local", path=str(folder))
    params["calib"].update(num_samples=4, layer_records_per_step=4, batch_size=4, guidance_scale=3.0)
    params["sample"].update(num_samples=4, batch_size=4, seeds=[1], guidance_scale=3.0)
    params["quant"]["seeds"] = [0]
    params["weights"] = {"dmq-w4a8": {"method": "dmq", "w_bits": 4, "a_bits": 8}}
    params["rows"] = {"dmq-w4a8": {"weights": "dmq-w4a8", "a_bits": 8}}
    params["guards"], params["peers"] = {}, {}
    params["report"] = {"table": ["dmq-w4a8"], "ablation": ["dmq-w4a8"], "grid_bits": "W4A8"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = ["fp_model", "classifier", "dump", "stats", "les dmq-w4a8", "recon dmq-w4a8", "pts dmq-w4a8"]
    for stage in [*stages, "sample fp", "sample dmq-w4a8", "eval_files", "reference", "fid dmq-w4a8"]:
        run([sys.executable, "-m", *f"stages.{stage}".split()], repo)
    metrics = json.loads((repo / "metrics/dmq-w4a8.json").read_text())
    assert metrics["mean"]["paired_mse"] > 0 and torch.isfinite(torch.tensor(metrics["mean"]["paired_psnr_db"]))
