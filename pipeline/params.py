"""``params.yaml`` as every stage loads it: the schema (:mod:`pipeline.config`), then the files the params
name and the layer names of the model, checked on a weightless skeleton of the UNet, so a wrong key, a
missing file or a PTS pattern that matches no layer fails before any work. ``cli.py doctor`` and the
predictions live in :mod:`pipeline.preflight`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from pipeline.calibration.capture import io_numel
from pipeline.calibration.dump import layer_io_sample
from pipeline.config import Config, ConfigError, read_params
from pipeline.infra.listing import clip_folder_problem, reference_files
from pipeline.method.pts import select_pts_layers
from pipeline.methods import METHODS
from pipeline.models.denoiser import probe_kwargs, read_prompts
from pipeline.models.diffusion import unet_skeleton
from pipeline.models.local import find_layout
from pipeline.quant.model import quantizable_layers


def load_config(path: str | Path = "params.yaml", model_checks: bool = True) -> Config:
    """``params.yaml`` checked against the schema, the files it names and (``model_checks``) the model.
    The stages that never build the model (metrics, report) skip the model checks: every stage before
    them made them, and they cost the import of diffusers."""
    cfg = read_params(path)
    if model_checks:
        check_against_model(cfg, str(path))
    else:
        _raise_file_problems(cfg, str(path))
    return cfg


def check_against_model(cfg: Config, source: str = "params") -> None:
    """The checks that need the model's layer names, made on a weightless skeleton of the UNet (built
    in milliseconds): a local folder without a UNet, or a PTS layer pattern that matches no quantized
    layer, fails before the first stage instead of in the stage that first uses it."""
    try:
        unet = unet_skeleton(cfg.model)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"invalid parameters in {source}:\n  model.path: {error}") from None
    _raise_file_problems(cfg, source)
    try:
        layer_io_sample(cfg.diffusion.steps, 1, layer_io_record_bytes(unet), cfg.calib.layer_io_gb)
    except ValueError as error:
        raise ConfigError(f"invalid parameters in {source}:\n  {error}") from None
    if any(METHODS[cfg.row_variant(row).method].pts for row in cfg.rows) and cfg.pts.layers != "auto":
        try:
            select_pts_layers(list(quantizable_layers(unet)), cfg.pts.layers)
        except ValueError as error:
            raise ConfigError(f"invalid parameters in {source}:\n  {error}") from None


def _raise_file_problems(cfg: Config, source: str) -> None:
    problems = _file_problems(cfg)
    if problems:
        raise ConfigError("\n  ".join([f"invalid parameters in {source}:", *problems]))


def _file_problems(cfg: Config) -> list[str]:
    """Files the params name that are missing or unreadable, and the prompts a text-to-image model needs."""
    problems = []
    text = cfg.model.source == "local" and find_layout(cfg.model.path).text_encoder is not None
    for key, value in (("calib.prompts", cfg.calib.prompts), ("sample.prompts", cfg.sample.prompts)):
        if value is not None:
            try:
                read_prompts(value)
            except (FileNotFoundError, ValueError) as error:
                problems.append(f"{key}: {error}")
        elif text:
            problems.append(
                f"{key}: required for the text-to-image model in {cfg.model.path} (a .txt, .csv or .json file of "
                "prompts)"
            )
    e = cfg.eval
    if e.inception_weights is not None and not Path(e.inception_weights).is_file():
        problems.append(f"eval.inception_weights: {e.inception_weights} not found")
    if e.reference_images is not None:
        try:
            reference_files(e.reference_images)
        except FileNotFoundError as error:
            problems.append(str(error))
    if e.clip_model is not None:
        problem = clip_folder_problem(e.clip_model)
        if problem is None and not text:
            problem = "the CLIP score is for text-to-image models (a model with text_encoder/ and tokenizer/)"
        if problem is not None:
            problems.append(f"eval.clip_model: {problem}")
    return problems


def layer_io_numel(unet: torch.nn.Module, text_length: int = 77) -> dict[str, tuple[int, int]]:
    """Per quantized layer, the elements of one record's input and output (a forward pass of one
    sample on the meta device: shapes only, no memory, no compute)."""
    c = unet.config
    one = (
        torch.empty(1, c.in_channels, c.sample_size, c.sample_size, device="meta"),
        torch.zeros(1, dtype=torch.long, device="meta"),
    )
    return io_numel(partial(unet, **probe_kwargs(unet, text_length=text_length)), quantizable_layers(unet), one)


def layer_io_record_bytes(unet: torch.nn.Module, text_length: int = 77) -> int:
    """Bytes of one record's layer I/O as the dump stores it (float16 inputs and outputs)."""
    return 2 * sum(a + b for a, b in layer_io_numel(unet, text_length).values())
