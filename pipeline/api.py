"""DMQ from Python: quantize a diffusers model in one call, save it, load it back, sample.

    from pipeline import Calibration, load, preset, quantize, save

    config = preset("dmq", w_bits=4, a_bits=8)               # a Config: the sections of params.yaml
    unet = quantize("/data/models/ldm", config, Calibration(num_samples=64, seed=1234))
    save(unet, "dmq-w4a8.safetensors")
    pipe.unet = load("dmq-w4a8.safetensors", "/data/models/ldm")   # backend="int8": int8 kernels

``quantize`` runs the library functions the DVC stages run (dump, les, recon, pts: one path, tested
equal), with the same :class:`~pipeline.config.Config`, so a params file and a Python call cannot
disagree. The model is read from its local diffusers folder (nothing is downloaded): a path, or a
pipeline or UNet loaded from one with ``from_pretrained``, whose weights must be the folder's.

The quantized UNet keeps the FP UNet's class and call signature, so it drops into the diffusers
pipeline it came from. Its activation parameters are per sampling step (docs/method.md §5): each call
selects the step whose DDIM timestep (of ``diffusion.steps`` steps) is nearest to the call's timestep,
so sample with the DDIM schedule and step count it was calibrated for.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.calibration.dump import dump_model, open_calibration, record_denoiser
from pipeline.config import Config, parse_config
from pipeline.deploy.export import DESCRIPTION, load_checkpoint, unet_hash, write_checkpoint
from pipeline.deploy.integer import to_integer
from pipeline.infra.device import resolve_device
from pipeline.infra.fingerprint import file_hash
from pipeline.infra.storage import atomic_store
from pipeline.method.activation_ranges import calibrate_row
from pipeline.method.les import learn_gammas
from pipeline.method.pts import select_pts_layers
from pipeline.method.weight_init import reconstruct_weights
from pipeline.methods import METHODS
from pipeline.models.diffusion import ddim_scheduler, load_fp_model
from pipeline.models.local import find_layout
from pipeline.models.quantized import build_quantized
from pipeline.quant.artifacts import act_tensors, weight_tensors
from pipeline.quant.attention import matmul_inputs
from pipeline.quant.model import QuantSpec, quant_layers, set_step

__all__ = ["Calibration", "Config", "load", "preset", "quantize", "save"]

CHECKPOINT_ATTRIBUTE = "dmq_checkpoint"  # what save() needs, kept on the quantized UNet
INTEGER_ATTRIBUTE = "dmq_int8"  # set on a UNet whose layers run int8 kernels


@dataclass(frozen=True)
class Calibration:
    """What :func:`quantize` calibrates on: either FP DDIM trajectories it samples for ``num_samples``
    samples from noise ``seed`` (a class-conditional model's samples take the classes in turn; a
    text-to-image model needs ``prompts``, sample i takes prompt i mod their count), or ``store``, a
    calibration store already dumped (the dump stage's ``calib.zarr`` of the same model). Unset numbers
    keep the config's ``calib`` section."""

    num_samples: int | None = None
    seed: int | None = None
    prompts: tuple[str, ...] | None = None
    store: str | Path | None = None

    def __post_init__(self) -> None:
        if self.store is not None and (self.num_samples, self.seed, self.prompts) != (None, None, None):
            raise ValueError("Calibration: a store already holds its samples; give store alone, or no store")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"Calibration.num_samples: {self.num_samples}, expected at least 1")


def preset(method: str = "dmq", w_bits: int = 4, a_bits: int = 8, **sections) -> Config:
    """A :class:`Config` with one weights entry and one row, named ``<method>-w<w>a<a>``, quantizing
    with ``method`` (a preset of :data:`pipeline.methods.METHODS`); ``sections`` are params sections as
    dicts or section models (``les={"iters": 6000}``), validated like ``params.yaml``."""
    name = f"{method}-w{w_bits}a{a_bits}"
    data = {key: value.model_dump() if hasattr(value, "model_dump") else value for key, value in sections.items()}
    data["weights"] = {name: {"method": method, "w_bits": w_bits, "a_bits": a_bits}}
    data["rows"] = {name: {"weights": name, "a_bits": a_bits}}
    data.setdefault("quant", {}).setdefault("seeds", [0])
    return parse_config(data, "preset()")


def model_folder(model: str | Path | nn.Module | object) -> Path:
    """The local diffusers folder of ``model``: the path itself, or the folder a pipeline or UNet was
    loaded from (its config's ``_name_or_path``)."""
    if isinstance(model, (str, Path)):
        folder = Path(model)
    else:
        config = getattr(model, "config", None)
        name = dict(config).get("_name_or_path") if config is not None else None
        if not name:
            raise ValueError(
                f"cannot tell which folder this {type(model).__name__} was loaded from; pass the local diffusers "
                "folder (a path) instead"
            )
        folder = Path(name)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder (a local diffusers pipeline or UNet folder)")
    return folder


def _weights_hash(folder: Path) -> str:
    """The file hash of the UNet's weights (the dump stage's model hash), in either folder layout."""
    weights = sorted(find_layout(folder).unet.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{find_layout(folder).unet} has no .safetensors weights")
    return file_hash(weights[0])


def _check_unchanged(model, fp_unet: nn.Module, folder: Path) -> None:
    unet = getattr(model, "unet", model)
    if isinstance(unet, nn.Module) and unet_hash(unet) != unet_hash(fp_unet):
        raise ValueError(
            f"the UNet passed to quantize() differs from the one in {folder} (changed or quantized after loading); "
            "pass the folder of the weights to quantize"
        )


def _row(config: Config, row: str | None) -> str:
    if row is not None:
        config.row_variant(row)  # an unknown row fails here, naming the defined ones
        return row
    if len(config.rows) != 1:
        raise ValueError(f"the config has {len(config.rows)} rows ({', '.join(config.rows)}); name one with row=")
    return next(iter(config.rows))


def _calibration_store(
    calibration: Calibration | str | Path, folder: Path, config: Config, device, stack: ExitStack, workdir
) -> Path:
    """The calibration store: the one given, or one dumped for ``calibration`` into ``workdir`` (a
    temporary folder, removed afterwards, when None)."""
    if not isinstance(calibration, Calibration):
        calibration = Calibration(store=calibration)
    if calibration.store is not None:
        return Path(calibration.store)
    if workdir is None:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="dmq-calib-"))
    calib = config.calib.model_copy(
        update={
            key: value
            for key, value in (("num_samples", calibration.num_samples), ("seed", calibration.seed))
            if value is not None
        }
    )
    config = config.model_copy(update={"calib": calib})
    unet, train_scheduler = load_fp_model(folder)
    prompts = list(calibration.prompts) if calibration.prompts else None
    store = Path(workdir) / "calib.zarr"
    with atomic_store(store) as tmp:
        dump_model(tmp, folder, unet, train_scheduler, config, prompts, device=device, attrs={})
    return store


def quantize(
    model: str | Path | nn.Module | object,
    config: Config,
    calibration: Calibration | str | Path,
    *,
    row: str | None = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
    workdir: str | Path | None = None,
) -> nn.Module:
    """The quantized UNet of ``model`` (a local diffusers folder, or a pipeline / UNet loaded from one,
    left unchanged) for the config's row ``row`` (its only row when None) and quantization seed ``seed``
    (the first of ``quant.seeds`` when None), on ``device`` (``config.device`` when None): LES, weight
    reconstruction and activation calibration (with PTS) on ``calibration``, as the stages run them.
    Use it in place of the UNet (``pipe.unet = quantize(...)``); :func:`save` writes it."""
    folder = model_folder(model)
    name = _row(config, row)
    variant = config.row_variant(name)
    weights_name = config.rows[name].weights
    method = METHODS[variant.method]
    if method.pts and config.pts.layers == "auto":
        raise ValueError("pts.layers 'auto' needs the stats stage's store; name the PTS layers (e.g. '*conv_shortcut')")
    seed = config.quant.seeds[0] if seed is None else seed
    device = resolve_device(config.device if device is None else str(device))
    fp_unet, train_scheduler = load_fp_model(folder)
    _check_unchanged(model, fp_unet, folder)
    description = {"model_hash": _weights_hash(folder), "unet_hash": unet_hash(fp_unet)}
    with ExitStack() as stack:
        calib = open_calibration(_calibration_store(calibration, folder, config, device, stack, workdir))
        steps = calib.attrs["steps"]
        fp = record_denoiser(folder, fp_unet, calib)
        gammas, _ = learn_gammas(config, weights_name, seed, fp, calib, device=device)
        gammas = {f"{layer}.gamma": gamma for layer, gamma in gammas.items()}
        weights = weight_tensors(
            reconstruct_weights(config, weights_name, seed, fp, gammas, calib, device=device).layers
        )
        # activation calibration starts, as the pts stage does, from a fresh FP UNet with these weights
        unet, _ = load_fp_model(folder)
        split = METHODS[config.weights_variant(weights_name).method].split
        spec = QuantSpec(w_bits=variant.w_bits, a_bits=variant.a_bits, num_steps=steps, split=list(split))
        softmax_bits = config.row_attention(name)
        layers = build_quantized(unet, spec, softmax_bits, weights, None, "quantize()", "quantize()")
        quantizers = {**layers, **matmul_inputs(unet)}
        pts_layers = select_pts_layers(list(layers), config.pts.layers) if method.pts else []
        calibrate_row(
            config,
            name,
            seed,
            record_denoiser(folder, unet, calib).to(device),
            quantizers,
            calib,
            fp_unet=load_fp_model(folder)[0] if method.shared_acts else None,
            pts_layers=pts_layers,
            device=device,
        )
    description.update(
        w_bits=variant.w_bits,
        a_bits=variant.a_bits,
        steps=steps,
        split=list(split),
        method=variant.method,
        attention=softmax_bits,
        config=config.model_dump(mode="json"),
    )
    return _ready(unet, description, ddim_scheduler(train_scheduler, steps).timesteps)


def save(unet: nn.Module, path: str | Path) -> dict:
    """Write the portable checkpoint of a UNet from :func:`quantize` or :func:`load` (fake-quantized:
    save before ``backend="int8"``); return its header. It loads next to the FP folder it was made from."""
    description = getattr(unet, CHECKPOINT_ATTRIBUTE, None)
    if description is None:
        raise ValueError("save() takes the UNet that quantize() or load() returned")
    if getattr(unet, INTEGER_ATTRIBUTE, False):
        raise ValueError("save() takes the fake-quantized UNet: save before load(..., backend='int8')")
    layers = quant_layers(unet)
    act = act_tensors({**layers, **matmul_inputs(unet)})
    return write_checkpoint(path, weight_tensors(layers), act, description)


def load(path: str | Path, model: str | Path | nn.Module | object, *, backend: str = "fake") -> nn.Module:
    """The quantized UNet of the checkpoint at ``path`` on the FP model of ``model`` (its folder, or a
    pipeline / UNet loaded from it), which must be the model it was made from; ``backend="int8"`` runs
    the quantized layers on int8 kernels (x86 CPU), with the same outputs up to float rounding."""
    if backend not in ("fake", "int8"):
        raise ValueError(f"backend {backend!r}: expected 'fake' or 'int8'")
    loaded = load_checkpoint(path, model_folder(model))
    header = loaded.headers
    timesteps = ddim_scheduler(loaded.scheduler, header["steps"]).timesteps
    unet = _ready(loaded.unet, {key: header[key] for key in DESCRIPTION}, timesteps)
    if backend == "int8":
        to_integer(unet)
        setattr(unet, INTEGER_ATTRIBUTE, True)  # save() refuses it: a checkpoint holds the fake-quantized layers
    return unet


def _ready(unet: nn.Module, description: dict, timesteps: torch.Tensor) -> nn.Module:
    """``unet`` with what :func:`save` needs, selecting each call's sampling step from its timestep."""
    setattr(unet, CHECKPOINT_ATTRIBUTE, description)
    table = timesteps.detach().double().cpu()

    def select_step(module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        t = torch.as_tensor(t).detach().double().cpu().reshape(-1)[0]
        set_step(module, int((table - t).abs().argmin()))

    unet.register_forward_pre_hook(select_step, with_kwargs=True)
    return unet
