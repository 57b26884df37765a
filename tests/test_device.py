"""The device harness: the GPU paths checked on a CPU-only machine.

The meta device carries shapes and no values, so everything that would wait for a GPU or leave it by
accident raises there: a Python ``if`` on a tensor, ``.item()``, ``.numpy()`` without the host copy, a
tensor made on the CPU and mixed in. The learners, the calibration, the PTS vote and the sampler run on
it end to end; every quantized form of a model must move to it whole; ``torch.cuda.is_available``
forced true shows what ``device: auto`` does on a GPU machine. Each planted bug below shows that the
harness fails where it should."""

from __future__ import annotations

import copy
import sys
from datetime import timedelta

import pytest
import torch
import torch.nn as nn
import yaml
from diffusers import DDPMScheduler

from helpers import ROOT, TwoConvs
from pipeline.calibration.capture import Budget, _Allocator, pinned_bytes
from pipeline.config import ConfigError, parse_config
from pipeline.deploy.integer import to_integer
from pipeline.eval.sampling import generate
from pipeline.infra import distributed
from pipeline.infra.device import host, resolve_device
from pipeline.infra.machine import environment
from pipeline.method.activation_ranges import StepLearning, init_shared_activations, learn_shared_steps
from pipeline.method.adaround import AdaRoundSettings, adaround
from pipeline.method.les import LESSettings, learn_all, learn_gamma
from pipeline.method.pts import PTSVoter
from pipeline.method.weight_init import init_weight_quantizers
from pipeline.method.weighting import make_weighting
from pipeline.models.denoiser import Decoder, load_denoiser
from pipeline.models.diffusion import ddim_scheduler, load_fp_model
from pipeline.models.embedded import build_unet
from pipeline.models.local import find_layout
from pipeline.quant import QuantSpec, calibrating, quantize, set_step
from pipeline.quant.attention import quantize_attention
from pipeline.quant.quantizers import ActQuantizer
from tiny_models import KINDS, save_tiny_model

META = torch.device("meta")
STEPS = 2
ON_DEVICE = Budget.of(1.0, 0.0)  # captures stay on the (meta) device


def unet() -> nn.Module:
    torch.manual_seed(0)
    return build_unet(16, (16, 32, 32), layers_per_block=1, norm_num_groups=8).eval().requires_grad_(False)


def fake_quantized(attention: bool = False) -> tuple[nn.Module, dict]:
    """A W4A8 copy of the tiny UNet with its weight scales searched (and its attention matmuls quantized)."""
    q = unet()
    layers = quantize(q, QuantSpec(w_bits=4, a_bits=8, num_steps=STEPS, split=("conv1", "conv_shortcut")))
    init_weight_quantizers(layers, 10, 2.4)
    if attention:
        layers.update(quantize_attention(q, 8, 8, STEPS))
    return q, layers


def records(n: int = 8, device: torch.device = META) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 1, 16, 16, device=device), torch.randint(0, 1000, (n,), device=device)


def left_behind(model: nn.Module, device: torch.device) -> list[str]:
    """Every tensor reachable from a module of ``model`` (parameters, buffers, and plain attributes, also
    inside lists, tuples and dicts) that is not on ``device``."""
    found = []

    def visit(value, path):
        if isinstance(value, torch.Tensor):
            if value.device.type != device.type:
                found.append(f"{path} ({value.device.type})")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(v, f"{path}[{i}]")
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{path}[{k!r}]")

    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key not in ("_modules", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
                visit(value, f"{name or 'model'}.{key}")
    return found


@pytest.fixture
def cuda_numerics_restored():
    """The global numerics flags as they were, after a test that pins them."""
    saved = (
        torch.backends.cudnn.conv.fp32_precision,
        torch.backends.cuda.matmul.fp32_precision,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    conv, matmul, benchmark, deterministic, algorithms, warn_only = saved
    torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = conv, matmul
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic
    torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)


# -- every quantized form moves whole --------------------------------------------------------------------------


@pytest.mark.parametrize("attention", [False, True], ids=["fake", "attention"])
def test_every_tensor_of_a_quantized_model_follows_it_to_the_device(attention):
    q, layers = fake_quantized(attention)
    for layer in layers.values():
        layer.quantize_acts = True
    q.to(META)
    assert left_behind(q, META) == []


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_kind_quantized_with_its_conditioning_and_decoder_moves_whole(kind, tmp_path):
    """Each kind as the stages load it (the UNet in its Denoiser, with the prompts' embeddings of a text
    model, and its autoencoder), quantized with attention, then moved to the device."""
    folder = save_tiny_model(kind, tmp_path / kind)
    unet, _ = load_fp_model(folder)
    quantize(unet, QuantSpec(w_bits=4, a_bits=8, num_steps=STEPS))
    quantize_attention(unet, 8, 8, STEPS)
    denoiser = load_denoiser(folder, unet, ["a red digit", "a blue digit"] if kind == "text" else None).to(META)
    decoder = Decoder(find_layout(folder), META)
    assert left_behind(denoiser, META) == []
    assert decoder.autoencoder is None or left_behind(decoder.autoencoder, META) == []


def test_the_walk_finds_a_tensor_kept_in_a_plain_attribute():
    q, layers = fake_quantized()
    next(iter(layers.values())).act_quantizer.learned_scale = torch.ones(1)  # planted: not a buffer
    q.to(META)
    assert [p.split(".")[-1] for p in left_behind(q, META)] == ["learned_scale (cpu)"]


def test_an_int8_model_refuses_to_move_off_the_cpu_naming_the_key():
    q, layers = fake_quantized()
    for layer in layers.values():
        layer.load_integer_weight(layer.integer_weight())
        layer.quantize_acts = True
    with torch.no_grad(), calibrating(layers.values()):
        for s in range(STEPS):
            set_step(q, s)
            q(*records(4, torch.device("cpu")))
    to_integer(q)
    q.to("cpu")  # staying on the CPU is fine
    with pytest.raises(ValueError, match=r"sample\.backend int8 needs device: cpu"):
        q.to(META)


# -- the code paths on the meta device -------------------------------------------------------------------------


def test_activation_calibration_and_the_pts_vote_run_on_the_device():
    q, layers = fake_quantized()
    q.to(META)
    shortcuts = {n: layer for n, layer in layers.items() if n.endswith("conv_shortcut")}
    voter = PTSVoter(shortcuts, 4, 0.85)
    for layer in layers.values():
        layer.quantize_acts = True
    for s in range(STEPS):
        set_step(q, s)
        with torch.no_grad(), calibrating(layers.values()):
            q(*records())
        voter(q, s, records(), 4)
    votes = voter.stacked()
    assert all(v.device.type == "cpu" for per_layer in votes.values() for v in per_layer.values())
    assert all(per_layer["k"].shape[0] == STEPS for per_layer in votes.values())


def test_calibration_that_branches_on_a_device_tensor_fails_on_the_meta_device(monkeypatch):
    """Planted: the flag read by a Python ``if`` (the GPU waits at every layer call), as observe once did."""

    def observe_with_if(self, x, channel_dim):
        if self.calibrated[self.step]:
            pass

    monkeypatch.setattr(ActQuantizer, "observe", observe_with_if)
    q, layers = fake_quantized()
    for layer in layers.values():
        layer.quantize_acts = True
    q.to(META)
    with pytest.raises((RuntimeError, NotImplementedError)), torch.no_grad(), calibrating(layers.values()):
        q(*records())


def test_votes_read_without_the_host_copy_fail_on_the_meta_device():
    """Planted: a vote tensor turned into numpy where it lies (what the pts stage once did)."""
    q, layers = fake_quantized()
    q.to(META)
    name = next(n for n in layers if n.endswith("conv_shortcut"))
    voter = PTSVoter({name: layers[name]}, 4, 0.85)
    voter(q, 0, records(), 4)
    with pytest.raises(TypeError, match="meta"):
        voter.results[name][0]["k"].numpy()


def test_les_learns_on_the_device_from_captures_left_on_the_host():
    """A layer on the device learns from captures the budget left in host memory: only batches travel (the
    meta device cannot take a copy of a whole capture back, so a copy to the host would fail here too)."""
    q, layers = fake_quantized()
    name = "down_blocks.1.resnets.0.conv_shortcut"
    layer = layers[name].to(META)
    inputs, outputs = torch.randn(8, 16, 8, 8), torch.randn(8, 32, 8, 8)  # on the host
    weighting = make_weighting("focal", STEPS)
    gamma, before, after = learn_gamma(
        layer, inputs, outputs, STEPS, weighting, iters=3, lr=1e-3, batch_size=4, seed=0, name=name, device=META
    )
    assert gamma.device == META and isinstance(before, float) and isinstance(after, float)


def test_les_of_every_layer_runs_on_the_device():
    fp = unet().to(META)
    q, layers = fake_quantized()
    chosen = {n: layers[n] for n in ("down_blocks.0.resnets.0.conv1", "mid_block.attentions.0.to_q")}
    gammas, losses = learn_all(
        chosen,
        fp,
        dict(fp.named_modules()),
        records(),
        STEPS,
        LESSettings("focal", iters=3, lr=1e-3, batch_size=4),
        budget=ON_DEVICE,
        device=META,
    )
    assert set(gammas) == set(chosen) and all(g.device.type == "cpu" for g in gammas.values())


def test_adaround_runs_on_the_device():
    fp = TwoConvs().eval().requires_grad_(False)
    q = copy.deepcopy(fp)
    init_weight_quantizers(quantize(q, QuantSpec(w_bits=4)), 10, 2.4)
    settings = AdaRoundSettings(
        iters=3, lr=1e-2, batch_size=4, reg_lambda=0.01, beta_start=20, beta_end=2, warmup=0.2, seed=0
    )
    inputs = (torch.randn(8, 4, 8, 8, device=META), torch.zeros(8, device=META))
    report = adaround(q.to(META), fp.to(META), inputs, settings, budget=ON_DEVICE)
    assert set(report) == {"a", "b"}


def test_qdiffusion_shared_steps_initialise_and_learn_on_the_device():
    fp = unet().to(META)
    q, layers = fake_quantized(attention=True)
    q.to(META)
    x, t = records()
    init_shared_activations(q, layers, (x, t), torch.zeros(8, dtype=torch.long, device=META), 10, 2.4)
    units = learn_shared_steps(q, fp, (x, t), StepLearning(2, 4e-4, 4, 2.4, 0), None, ON_DEVICE, 4)
    assert units


def test_sampling_runs_on_the_device():
    q, layers = fake_quantized()
    for layer in layers.values():
        layer.quantize_acts = True
    scheduler = ddim_scheduler(DDPMScheduler(num_train_timesteps=1000), STEPS)
    images = generate(q.to(META), scheduler, 3, 2, 1.0, 0, META, "sample")
    assert images.shape == (3, 1, 16, 16) and images.device.type == "cpu"


# -- a GPU machine, as far as a CPU can show it -----------------------------------------------------------------


def test_device_auto_means_cuda_on_a_gpu_machine_and_pins_its_numerics(monkeypatch, cuda_numerics_restored):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"  # torch's default there is TF32
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark


def test_the_int8_backend_is_refused_where_device_auto_means_the_gpu(monkeypatch):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["sample"]["backend"], data["device"] = "int8", "auto"
    parse_config(data)  # no GPU: auto is the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"sample\.backend: int8 runs on the CPU's int8 kernels, and device: auto"):
        parse_config(data)


def test_provenance_names_the_gpu_and_its_numerics(monkeypatch):
    assert "GPU" not in environment()  # this process never used CUDA
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    found = environment()
    assert "GPU NVIDIA H100 80GB HBM3 (sm 9.0" in found and "conv fp32" in found and "deterministic" in found


def test_metrics_stay_on_the_cpu_unless_the_device_param_says_cuda(monkeypatch):
    from pipeline.eval import metrics

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []
    monkeypatch.setattr(metrics, "_extractor", lambda features, layers: None)
    monkeypatch.setattr(
        metrics,
        "get_featuresdict_from_dataset",
        lambda data, extractor, batch, cuda, *rest: seen.append(cuda) or {"features": torch.zeros(2, 3)},
    )
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    metrics.featurize(images, metrics.feature_space("unused", None), reference=True)
    metrics.featurize(images, metrics.feature_space("unused", None, cuda=True), reference=True)
    assert seen == [False, True]


def test_ranks_wait_for_each_other_longer_than_nccls_ten_minutes(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.atexit, "register", lambda f: None)
    distributed.init("cpu")
    assert calls[-1]["timeout"] == timedelta(hours=12)
    monkeypatch.setenv("DMQ_DIST_TIMEOUT_MIN", "90")
    distributed.init("cpu")
    assert calls[-1]["timeout"] == timedelta(minutes=90)


def test_pinned_captures_are_charged_what_the_pinned_allocator_takes(tmp_path):
    assert [pinned_bytes(n) for n in (1, 1024, 1025, 3 << 20)] == [1, 1024, 2048, 4 << 20]
    for device, expected in ((torch.device("cuda"), ["device", "host", "scratch"]), (META, ["device"] + ["host"] * 2)):
        allocate = _Allocator(Budget(100, 4096 + 2048, None), device, tmp_path)
        # on CUDA the second capture (2 049 bytes) takes 4 096 pinned, so the third no longer fits in host memory
        assert [allocate.place(n) for n in (100, 2049, 2049)] == expected


def test_optimum_quanto_int4_unpacks_on_cuda_without_compiling_an_extension():
    import optimum.quanto  # noqa: F401  (defines the op; its own CUDA kernel only where CUDA is present)

    from pipeline.eval.peers import unpack_bits, unpack_int4_in_torch

    unpack_int4_in_torch()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("quanto::unpack", "CUDA")
    packed = torch.randint(0, 256, (8, 5), dtype=torch.uint8)
    for bits in (2, 4):
        assert torch.equal(unpack_bits(packed, bits), torch.ops.quanto.unpack(packed, bits))  # quanto's CPU kernel


def test_a_stage_that_never_used_the_gpu_gets_no_device_ratio():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scale import add_predictions

    class Cost:
        device, disk, detail = 1 << 20, 0, {}

        def host_peak(self, cuda):
            return 0

    row = {"process_baseline": 1, "measured_peak_rss": 2, "measured_cuda_peak": 0}
    add_predictions(row, Cost(), cuda=True)
    assert row["device_ratio"] is None and row["predicted_device"] == 1 << 20


@pytest.mark.parametrize(("stage_name", "job_name"), [("recon", "reconstruct"), ("pts", "calibrate")])
def test_on_a_gpu_the_seed_stages_run_every_seed_in_their_own_process(
    stage_name, job_name, pipeline_copy, monkeypatch, cuda_numerics_restored
):
    """Forked workers cannot use their parent's CUDA context: where ``device: auto`` means the GPU, recon
    and pts leave ``<stage>.workers`` unused and run the seeds one after another in the stage's process."""
    import importlib
    import json
    import os

    from pipeline.params import load_config
    from stages.layout import report_path

    stage = importlib.import_module(f"stages.{stage_name}")
    monkeypatch.chdir(pipeline_copy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # what `device: auto` resolves to there (the copy's artifacts were made under `device: cpu`)
    monkeypatch.setattr(stage, "resolve_device", lambda name: resolve_device("auto"))
    cfg = load_config()
    assert getattr(cfg, stage_name).workers > 1 and len(cfg.quant.seeds) > 1
    ran = []

    def record(cfg, entry, fp_hash, device, seed):
        ran.append((seed, os.getpid(), device.type))
        return {}

    monkeypatch.setattr(stage, job_name, record)
    entry = next(iter(cfg.weights if stage_name == "recon" else cfg.rows))
    stage.main(entry)
    assert ran == [(seed, os.getpid(), "cuda") for seed in cfg.quant.seeds]
    report = json.loads(report_path(stage_name, entry).read_text())
    assert list(report["quant_seeds"]) == [str(seed) for seed in cfg.quant.seeds]
    assert "learners on" not in report["environment"]


def test_the_weight_scale_search_runs_on_the_device(pipeline_copy, monkeypatch):
    """recon moves the model before its 80-ratio search per layer, not after."""
    import pipeline.method.weight_init as weight_init
    import stages.recon as recon
    from pipeline.infra.fingerprint import model_hash
    from pipeline.params import load_config
    from stages.layout import FP_MODEL

    class Searched(Exception):
        pass

    def search(layers, grid, p):
        raise Searched(next(iter(layers.values())).module.weight.device.type)

    monkeypatch.chdir(pipeline_copy)
    monkeypatch.setattr(weight_init, "init_weight_quantizers", search)
    cfg = load_config()
    name = next(iter(cfg.weights))
    with pytest.raises(Searched, match="meta"):
        recon.reconstruct(cfg, name, model_hash(FP_MODEL), META, cfg.quant.seeds[0])


def test_the_host_copy_of_a_meta_tensor_is_zeros_of_its_shape():
    assert torch.equal(host(torch.empty(2, 3, device=META)), torch.zeros(2, 3))
