"""Checks before a run starts, beyond the params checks every stage makes (:mod:`pipeline.params`).

* :func:`diagnose` (``cli.py doctor``): package versions, torch threads, disk space for the Zarr
  stores the parameters imply, the device, the model, and each stage's predicted peak memory;
* :func:`diagnose_checkpoint` (``cli.py doctor --ckpt``): the same for a CompVis checkpoint not imported yet.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from pipeline.calibration.capture import GB
from pipeline.calibration.dump import layer_io_sample
from pipeline.config import Config, ConfigError
from pipeline.deploy.integer import int8_kernels_available, kernels_add_pairs_in_int16
from pipeline.infra.machine import cpu_kind
from pipeline.method.pts import select_pts_layers
from pipeline.methods import METHODS
from pipeline.models.denoiser import probe_kwargs
from pipeline.models.diffusion import unet_skeleton
from pipeline.models.local import find_layout
from pipeline.params import layer_io_record_bytes, load_config
from pipeline.quant import quantizable_layers
from pipeline.resources import gib, stage_costs

DISTRIBUTION = "dmq-pipeline"


def notices(cfg: Config) -> list[str]:
    """What valid params leave out, one line each: the int8 backend keeps quantized attention matmuls in
    float; a local model without Inception weights or reference images gets the paired metrics only, and
    its guards compare pixels."""
    e = cfg.eval
    found = []
    attention_rows = [name for name in cfg.rows if cfg.row_attention(name) is not None]
    if cfg.sample.backend == "int8" and attention_rows:
        found.append(
            f"notice: sample.backend int8 runs the conv / linear layers on int8 kernels; the attention matmuls of "
            f"{', '.join(attention_rows)} stay float32 on their fake-quantized inputs (no int8 batched matmul kernel)"
        )
    if cfg.model.source != "local":
        return found
    missing = [
        key
        for key, value in (
            ("eval.inception_weights", e.inception_weights),
            ("eval.reference_images", e.reference_images),
        )
        if value is None
    ]
    if missing:
        found.append(
            f"notice: FID / sFID will not be computed (no {' and '.join(missing)}); the metrics are the paired MSE / "
            "PSNR against FP on the same seeds"
        )
    if cfg.guards and cfg.guard_criterion() != cfg.guard.criterion:
        found.append(
            "notice: the guards compare pixel MSE, not features (guard.criterion features needs "
            "eval.inception_weights for a local model)"
        )
    return found


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str


def package_versions(distribution: str = DISTRIBUTION) -> list[Finding]:
    """Python and every installed dependency against the versions the package declares."""
    try:
        metadata = importlib.metadata.metadata(distribution)
        requirements = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return [Finding("install", False, f"{distribution} is not installed: run pip install -e '.[dev]'")]
    python = platform.python_version()
    wanted = SpecifierSet(metadata["Requires-Python"] or "")
    findings = [Finding("python", python in wanted, python if python in wanted else f"{python}, needs {wanted}")]
    for requirement in map(Requirement, requirements):
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue  # an optional extra such as dev
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            findings.append(Finding(requirement.name, False, f"not installed, needs {requirement.specifier}"))
            continue
        ok = requirement.specifier.contains(version, prereleases=True)
        findings.append(Finding(requirement.name, ok, version if ok else f"{version}, needs {requirement.specifier}"))
    return findings


def thread_settings(les_workers: int, seed_workers: dict[str, int], seeds: int) -> list[Finding]:
    """Oversubscribed cores slow every stage; artifacts are bit-identical only at equal thread counts.
    LES's many layers keep ``les_workers`` busy up to one a core; the quantization seeds' workers
    (``seed_workers``: recon, pts) may outnumber the cores up to one a seed, since their processes run one
    thread each and share the cores without waiting on each other, which balances 3 seeds on 2 cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = torch.get_num_threads()
    detail = (
        f"{threads} intra-op threads on {cores} cores (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
    )
    return [
        Finding(
            "torch threads",
            threads <= cores,
            detail if threads <= cores else f"{detail}: more threads than cores; set OMP_NUM_THREADS",
        ),
        Finding(
            "les.workers", les_workers <= cores, f"{les_workers} worker processes, one thread each, on {cores} cores"
        ),
        *(
            Finding(
                key,
                count <= max(cores, seeds),
                f"{count} worker processes, one thread each, on {cores} cores for {seeds} quantization seeds",
            )
            for key, count in seed_workers.items()
        ),
    ]


def calibration_store_bytes(
    unet: torch.nn.Module, steps: int, num_samples: int, layer_records_per_step: int, layer_io_gb: float
) -> int:
    """Uncompressed bytes of calib.zarr: float32 x_t and x0, int64 t and condition, int32 step and
    sample; float16 layer I/O of the records :func:`~pipeline.calibration.dump.layer_io_sample` keeps.
    A conditional model is dumped with guidance: two records per trajectory and step."""
    c = unet.config
    sample = c.in_channels * c.sample_size**2
    conditional = probe_kwargs(unet) != {}
    per_step = min(layer_records_per_step, num_samples * (2 if conditional else 1))
    record = layer_io_record_bytes(unet)
    stored = layer_io_sample(steps, per_step, record, layer_io_gb)
    return (
        steps * num_samples * (4 * sample + 16)
        + num_samples * (4 * sample + (8 if conditional else 0))
        + len(stored.steps) * stored.per_step * record
    )


def store_sizes(cfg: Config) -> dict[str, int]:
    """Uncompressed bytes of the Zarr stores the parameters imply (an upper bound: stores compress)."""
    unet = unet_skeleton(cfg.model)
    c = unet.config
    sample = c.in_channels * c.sample_size**2
    steps, calib = cfg.diffusion.steps, cfg.calib
    channels = {name: module.weight.shape[1] for name, module in quantizable_layers(unet).items()}
    pts = channels if cfg.pts.layers == "auto" else select_pts_layers(list(channels), cfg.pts.layers)
    votes = (
        20 * steps * sum(channels[name] for name in pts)
    )  # k_mode (int64), agreement (float32), k (int64) per layer, step, channel
    samples = len(cfg.sample.seeds) * cfg.sample.num_samples * 4 * sample  # float32 images per noise seed
    quant_seeds = cfg.quant.seeds
    return {
        "calib.zarr": calibration_store_bytes(
            unet, steps, calib.num_samples, calib.layer_records_per_step, calib.layer_io_gb
        ),
        # float32 min / max / absmax / percentile per channel and two per-step numbers, per layer and step
        "stats.zarr": 4 * steps * sum(4 * ch + 2 for ch in channels.values()),
        **{
            f"votes/{row}/q{seed}.zarr": votes if METHODS[cfg.row_variant(row).method].pts else 0
            for row in cfg.rows
            for seed in quant_seeds
        },
        "samples/fp.zarr": samples,
        **{f"samples/{name}/q{seed}.zarr": samples for name in [*cfg.rows, *cfg.peers] for seed in quant_seeds},
    }


def human(size: float) -> str:
    if size < 1024:
        return f"{size:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1024
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}"


def store_summary(sizes: dict[str, int], largest: int = 3) -> str:
    """The stores in one line: their count and total, and the ``largest`` few by name (a default table
    has some 150 stores, one per row, quantization seed and kind)."""
    shown = sorted((item for item in sizes.items() if item[1]), key=lambda item: -item[1])[:largest]
    names = ", ".join(f"{name} {human(size)}" for name, size in shown)
    return f"{len(sizes)} stores up to {human(sum(sizes.values()))} (largest: {names})"


def disk_space(cfg: Config, artifacts: Path, copies: int) -> Finding:
    """Free space where ``artifacts`` lives against ``copies`` times the stores' size."""
    sizes = store_sizes(cfg)
    need = copies * sum(sizes.values())
    where = next(p for p in (artifacts.resolve(), *artifacts.resolve().parents) if p.exists())
    free = shutil.disk_usage(where).free
    detail = f"{store_summary(sizes)}; {copies} copies need {human(need)}, {human(free)} free at {where}"
    return Finding("disk space", free >= need, detail if free >= need else f"{detail}: not enough")


def device(cfg: Config) -> Finding:
    ok = cfg.device != "cuda" or torch.cuda.is_available()
    found = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "no CUDA device"
    return Finding("device", ok, f"{cfg.device} requested; {found}" + ("" if ok else ": set device to cpu or auto"))


def cpu() -> Finding:
    """The CPU kind results are recorded with, and what the int8 backend does on it."""
    detail = f"{cpu_kind()}; results reproduce bit for bit on the same CPU kind, versions and threads"
    if int8_kernels_available():
        pairs = kernels_add_pairs_in_int16()
        detail += (
            "; int8 kernels add u8 x s8 pairs in int16: an A8 PTS layer whose fold could saturate runs as "
            "exponent-group GEMMs"
            if pairs
            else "; int8 kernels accumulate in int32"
        )
    return Finding("cpu", True, detail)


# the params that lower each stage's peak on the GPU, first the one that lowers it most
GPU_KNOBS = {
    "dump": "calib.batch_size",
    "stats": "capture.batch_size, capture.device_gb",
    "les": "capture.device_gb, capture.batch_size",
    "recon": "capture.device_gb, recon.batch_size, capture.batch_size",
    "pts": "pts.batch_size",
    "sample": "sample.batch_size",
}
HOST_KNOBS = {
    **GPU_KNOBS,
    "stats": "capture.host_gb",
    "les": "capture.host_gb",
    "recon": "capture.host_gb, recon.workers",
    "pts": "pts.batch_size, pts.workers",
}


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def process_baseline() -> int:
    """This process's peak resident bytes so far: the interpreter, torch, diffusers, this package and
    the model's classes, about what every stage process holds before it loads a model. On Linux the
    high-water mark of the process's own memory (VmHWM): ``ru_maxrss`` would carry the peak of a larger
    process that started this one."""
    status = Path("/proc/self/status")
    if status.exists():
        peak = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(peak.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def text_length(model_cfg) -> int:
    """Tokens of the text model's prompts: its tokenizer's ``model_max_length`` (CLIP's 77 otherwise)."""
    tokenizer = find_layout(model_cfg.path).tokenizer if model_cfg.source == "local" else None
    config = None if tokenizer is None else tokenizer / "tokenizer_config.json"
    if config is not None and config.exists():
        return int(json.loads(config.read_text()).get("model_max_length", 77))
    return 77


def memory(cfg: Config, gpu_gb: float | None = None, host_gb: float | None = None) -> list[Finding]:
    """Predicted peak memory and scratch disk of every stage that runs the network
    (:mod:`pipeline.resources`) against the device, host memory and the scratch folder's free space;
    ``gpu_gb`` / ``host_gb``: a GPU / host memory of that size instead of this machine's."""
    cuda = gpu_gb is not None or (cfg.device != "cpu" and torch.cuda.is_available())
    gpu = gpu_gb * GB if gpu_gb is not None else torch.cuda.get_device_properties(0).total_memory if cuda else None
    costs = stage_costs(cfg, unet_skeleton(cfg.model), text_length(cfg.model))
    # measured after the prediction, which imports the model's classes as a stage does
    host, baseline = (host_memory() if host_gb is None else host_gb * GB), process_baseline()
    scratch = Path(cfg.capture.scratch or tempfile.gettempdir())
    free = shutil.disk_usage(next(p for p in (scratch, *scratch.resolve().parents) if p.exists())).free
    findings = []
    for cost in costs:
        on_host = baseline + cost.host_peak(cuda)
        fits = {
            "GPU": not cuda or cost.device <= gpu,
            "host": on_host <= host,
            "scratch": cost.disk <= free,
        }
        where = f"GPU {gib(cost.device)} of {gib(gpu)}, " if cuda else ""
        detail = f"{where}host {gib(on_host)} of {gib(host)} (process {gib(baseline)} included)"
        if cost.disk:
            detail += f", scratch {gib(cost.disk)} at {scratch} ({gib(free)} free)"
        detail += f"; {cost.detail}"
        knobs = {"GPU": GPU_KNOBS[cost.stage], "host": HOST_KNOBS[cost.stage], "scratch": "les.records, recon.records"}
        for name in (name for name, ok in fits.items() if not ok):
            detail += f": too much for the {name}, lower {knobs[name]}"
        findings.append(Finding(f"predicted peak of {cost.stage}", all(fits.values()), detail))
    return findings


def model(cfg: Config) -> Finding:
    if cfg.model.source == "embedded":
        return Finding("model", True, "embedded default (the fp_model stage trains it)")
    unet = unet_skeleton(cfg.model)
    return Finding(
        "model", True, f"{cfg.model.path}: {type(unet).__name__}, {len(quantizable_layers(unet))} quantizable layers"
    )


def diagnose(
    params: Path, artifacts: Path, copies: int, gpu_gb: float | None = None, host_gb: float | None = None
) -> list[Finding]:
    findings = package_versions()
    try:
        cfg = load_config(params)
    except ConfigError as error:
        return [*findings, Finding("params", False, str(error).replace("\n", " "))]
    findings.append(Finding("params", True, f"{params} is valid"))
    return [
        *findings,
        *thread_settings(
            cfg.les.workers,
            {"recon.workers": cfg.recon.workers, "pts.workers": cfg.pts.workers},
            len(cfg.quant.seeds),
        ),
        cpu(),
        device(cfg),
        model(cfg),
        disk_space(cfg, artifacts, copies),
        *memory(cfg, gpu_gb, host_gb),
    ]


def diagnose_checkpoint(
    checkpoint: Path,
    params: Path,
    artifacts: Path,
    copies: int,
    gpu_gb: float | None = None,
    host_gb: float | None = None,
    **import_options: Path | None,
) -> list[Finding]:
    """:func:`diagnose` for the folder that ``cli.py import-ckpt`` would write from ``checkpoint``: it is
    imported (``import_options``: first_stage, config, clip_vocab) into a temporary folder, removed after,
    that stands in for ``model`` in a copy of ``params``; the predictions are those of the imported folder."""
    from pipeline.models.compvis import import_checkpoint

    with tempfile.TemporaryDirectory(prefix="doctor-ckpt-") as scratch:
        folder = Path(scratch) / "model"
        try:
            import_checkpoint(checkpoint, folder, **import_options)
        except (FileNotFoundError, ValueError) as error:
            return [Finding("checkpoint", False, str(error))]
        settings = yaml.safe_load(params.read_text())
        settings["model"] = {"source": "local", "path": str(folder)}
        stand_in = Path(scratch) / params.name
        stand_in.write_text(yaml.safe_dump(settings, sort_keys=False))
        parts = ", ".join(sorted(child.name for child in folder.iterdir()))
        imported = Finding(
            "checkpoint", True, f"{checkpoint}: imported ({parts}) into a temporary folder for these checks"
        )
        return [imported, *diagnose(stand_in, artifacts, copies, gpu_gb, host_gb)]
