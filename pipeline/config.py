"""The one config model that mirrors ``params.yaml``.

Every stage loads the whole file through :func:`pipeline.preflight.load_config`, so a typo'd key or an invalid value
anywhere fails before any work starts, with pydantic's message naming the dotted key.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from pipeline.methods import METHODS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    source: Literal["embedded", "local"] = "embedded"
    path: str | None = Field(
        None, validate_default=True, description="local diffusers folder (see docs/real-models.md)"
    )
    image_size: int = Field(16, ge=8, le=64)
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    num_train_timesteps: int = Field(1000, ge=10)
    train_steps: int = Field(2600, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0)
    ema_decay: float = Field(0.995, ge=0, lt=1)

    @field_validator("path")
    @classmethod
    def _local_needs_path(cls, path: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("source") == "local" and not path:
            raise ValueError(
                "required when model.source is 'local': a diffusers pipeline folder (unet/, scheduler/) or a bare "
                "UNet folder"
            )
        return path

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> "ModelConfig":
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError("model.block_out_channels must all be divisible by model.norm_num_groups")
        factor = 2 ** (len(self.block_out_channels) - 1)  # the embedded UNet halves the size at every level but one
        if self.source == "embedded" and self.image_size % factor:
            raise ValueError(
                f"model.image_size: {self.image_size} is not divisible by {factor}, the down-sampling of "
                f"{len(self.block_out_channels)} levels (model.block_out_channels); the decoder's skip connections "
                "would not match"
            )
        return self


class ClassifierConfig(Section):
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 7


class DiffusionConfig(Section):
    steps: int = Field(20, ge=1, le=1000, description="DDIM steps S, for calibration and sampling")


class CalibConfig(Section):
    num_samples: int = Field(64, ge=1, description="calibration trajectories N (paper: 256)")
    layer_records_per_step: int = Field(
        32, ge=1, description="records per step of the layer statistics, and of the layer I/O the dump stores"
    )
    layer_io_gb: float = Field(
        8.0, gt=0, description="GiB of layer I/O the dump stores for inspection (fewer records or steps beyond)"
    )
    batch_size: int = Field(64, ge=1)
    eta: float = Field(0.0, ge=0, le=1)
    seed: int = 1234
    chunk_records: int = Field(64, ge=1)
    guidance_scale: float = Field(
        7.5, ge=1, description="classifier-free guidance of the calibration trajectories (conditional models)"
    )
    prompts: str | None = Field(
        None, description="text-to-image models: calibration prompts file (.txt, .csv or .json)"
    )


class QuantConfig(Section):
    """Settings shared by every entry of ``weights`` and every row."""

    seeds: list[int] = Field(
        [0, 1, 2],
        min_length=1,
        description="quantization seeds: each drives the calibration draw and the LES and AdaRound batch orders; "
        "every entry and row is quantized once per seed, and the tables' ± is the spread over them",
    )
    weight_clip_grid: int = Field(80, ge=1, description="clipping ratios 1 - 0.01 i searched for weight scales")
    weight_clip_p: float = Field(2.4, gt=0)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("each quantization seed once: a repeated seed repeats a run, it adds no spread")
        return seeds


Bits = Annotated[int, Field(ge=2, le=16)]
ENTRY_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")  # a stage-name suffix and a file name


class WeightsEntry(Section):
    """One weight quantization (an les and a recon stage), shared by the rows that name it."""

    method: str
    w_bits: Bits
    a_bits: Bits | None = Field(
        None, description="only for methods with LES: γ is learned against this activation quantizer"
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
        return name

    @model_validator(mode="after")
    def _a_bits_iff_les(self) -> "WeightsEntry":
        if METHODS[self.method].les and self.a_bits is None:
            raise ValueError(f"a_bits is required: {self.method} learns γ against the activation quantizer")
        if not METHODS[self.method].les and self.a_bits is not None:
            raise ValueError(
                f"a_bits must be left out: {self.method}'s weights do not depend on it, so rows with any a_bits "
                "share them"
            )
        return self


class RowEntry(Section):
    """One row of the table: activation calibration, sampling and metrics on a ``weights`` entry."""

    weights: str
    a_bits: Bits
    method: str | None = Field(
        None,
        description="the row's method where it differs from its weights entry's: an ablation whose weights equal "
        "another method's (dmq-no-pts on dmq's weights) shares them; the weight switches must match",
    )
    attention: bool | None = Field(
        None,
        description="quantize the attention matmuls' inputs (q, k, v at a_bits, the softmax output at "
        "attention.softmax_bits); null: as the method's paper does (Q-Diffusion's methods on, DMQ's off)",
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str | None) -> str | None:
        if name is not None and name not in METHODS:
            raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
        return name


class PeerEntry(Section):
    """A row quantized by another library, on the same model, seeds and metric."""

    library: Literal["optimum-quanto"]
    w_bits: Literal[4, 8]
    a_bits: Literal[8]
    calib_records: int = Field(
        256, ge=1, description="calibration trajectory records (all steps) for its activation ranges"
    )


class Variant(NamedTuple):
    """What a weights entry or a row quantizes: the method and its bit-widths (a_bits None for the
    weights of a method without LES)."""

    method: str
    w_bits: int
    a_bits: int | None

    @property
    def label(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"


class ReportConfig(Section):
    table: list[str] = Field([], description="rows and peers of reports/paper_table.md, in order (FP comes first)")
    ablation: list[str] = Field([], description="rows of reports/ablation.md, in order")
    grid_bits: str = Field("W4A6", pattern=r"^W\d+A\d+$", description="bit-width of the per-method sample grids")
    protocol_samples: int | None = Field(
        None,
        ge=1,
        description="samples per seed of the paper's protocol (e.g. 50000 for LDM FID, 10000 for SD): the "
        "tables print it beside the sample count and say when they were computed on fewer",
    )


class StatsConfig(Section):
    percentile: float = Field(99.9, gt=50, lt=100, description="high percentile of |x| per channel")


class CaptureConfig(Section):
    """Where activations captured from the calibration records are kept (pipeline/calibration/capture.py):
    a window of consecutive layers or blocks at a time, its first ``device_gb`` on the device, the next
    ``host_gb`` in host memory, anything beyond in memory-mapped files under ``scratch``."""

    device_gb: float = Field(4.0, ge=0, description="captures kept on the device (GiB)")
    host_gb: float = Field(16.0, ge=0, description="captures kept in host memory beyond the device's (GiB)")
    scratch: str | None = Field(None, description="folder of the memory-mapped scratch files (None: system temp)")
    batch_size: int = Field(64, ge=1, description="records per forward pass of a capture")


# DMQ trains γ for 6 000 iterations at lr 1e-3; 6.0 / 300 is the double nearest 0.02, as the literal is
PAPER_LES_LR_SUM = 6.0
# AdaRound's lr (the paper's 1e-3) and the sum of learning rates of 3 200 iterations a block at 1e-3, which
# its budget curve measured nearer its largest budget than 6 400's sum (docs/results.md): shorter runs keep
# that sum, and 3.2 / 800 is exactly 0.004
PAPER_RECON_LR = 1e-3
RECON_LR_SUM = 3.2


class LESConfig(Section):
    records: int | None = Field(
        None,
        ge=1,
        description="records LES learns from, the same number from each step, drawn per quantization seed "
        "(None: every record of every step, N x S, twice with guidance)",
    )
    iters: int = Field(300, ge=1, description="Adam iterations per layer (paper: 6000)")
    lr: float | None = Field(
        None,
        gt=0,
        description="Adam learning rate, cosine-decayed to 0 (None: the paper's 1e-3 x 6000 / iters, its "
        "schedule scaled to iters with the same sum of learning rates)",
    )
    batch_size: int = Field(32, ge=1)
    focal_r: float = Field(20.0, ge=0, description="r: exponent of focal weights, slope of linear weights")
    focal_momentum: float = Field(0.95, ge=0, lt=1)
    workers: int = Field(1, ge=1, description="parallel worker processes (layers are independent)")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the paper's sum of learning rates (1e-3 over 6 000 iterations) spread over ``iters``."""
        return self.lr if self.lr is not None else PAPER_LES_LR_SUM / self.iters


class ReconConfig(Section):
    iters: int = Field(800, ge=1, description="AdaRound iterations per block (paper: 20000)")
    lr: float | None = Field(
        None,
        gt=0,
        description="Adam's constant lr (None: the paper's 1e-3, raised below 3 200 iterations to keep the sum of "
        "learning rates of 3 200 at 1e-3: 4e-3 at 800)",
    )
    batch_size: int = Field(32, ge=1)
    records: int = Field(256, ge=1, description="calibration records (from all steps) used for reconstruction")
    reg_lambda: float = Field(0.01, ge=0, description="lambda of the rounding regulariser")
    beta_start: float = Field(20.0, gt=0)
    beta_end: float = Field(2.0, gt=0)
    warmup: float = Field(0.2, ge=0, lt=1, description="share of iterations without the regulariser")
    weighting: Literal["none", "method"] = Field(
        "none", description="timestep-weight the loss as LES does (reference: none)"
    )
    workers: int = Field(1, ge=1, description="parallel worker processes (the quantization seeds are independent)")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the paper's 1e-3 with at least the sum of learning rates of 3 200 iterations at 1e-3."""
        return self.lr if self.lr is not None else max(PAPER_RECON_LR, RECON_LR_SUM / self.iters)


class PTSConfig(Section):
    ratio_threshold: float = Field(0.85, gt=0, le=1, description="tau: agreement ratio below which k falls back to 0")
    num_candidates: int = Field(4, ge=1, le=8, description="K: exponents 0..K-1")
    layers: list[str] | Literal["auto"] = ["*conv_shortcut"]
    auto_outlier_ratio: float = Field(4.0, gt=1)
    calib_records: int = Field(64, ge=1, description="records per step for activation calibration")
    batch_size: int = Field(16, ge=1)
    momentum: float = Field(0.95, ge=0, lt=1)
    workers: int = Field(1, ge=1, description="parallel worker processes (the quantization seeds are independent)")


class SharedActsConfig(Section):
    """Q-Diffusion's activation step shared by all steps (methods qdiff*): an Lp-searched initialisation on
    records with the layers before quantized, then the steps learned block by block (its second phase)."""

    clip_grid: int = Field(80, ge=1, le=99, description="clipping ratios 1 - 0.01 i of the initialisation")
    clip_p: float = Field(2.4, gt=0, description="p of the initialisation's Lp error")
    init_records: int = Field(64, ge=1, description="records of the initialisation's one forward pass, all steps")
    learn: bool = Field(True, description="learn the steps block by block after the initialisation")
    iters: int = Field(100, ge=0, description="Adam iterations per block (Q-Diffusion: 5000)")
    lr: float = Field(4e-4, gt=0, description="Adam learning rate, cosine-decayed to 0")
    p: float = Field(2.4, gt=0, description="p of the block output's Lp error")
    records: int = Field(256, ge=1, description="calibration records (from all steps) the steps learn from")
    batch_size: int = Field(32, ge=1)

    @field_validator("iters")
    @classmethod
    def _learning_needs_iterations(cls, iters: int, info: ValidationInfo) -> int:
        if iters == 0 and info.data.get("learn", True):
            raise ValueError("no iterations with shared_acts.learn on; set learn: false to keep the initialisation")
        return iters


class AttentionConfig(Section):
    """The attention matmuls of the rows that quantize them (``rows.<row>.attention``, by default the methods
    of Q-Diffusion): their inputs fake-quantized per tensor, each with the row's kind of activation ranges."""

    softmax_bits: int = Field(
        8, ge=2, le=8, description="bits of the softmax output (Q-Diffusion's sm_abit); q, k, v take the row's a_bits"
    )


class SampleConfig(Section):
    num_samples: int = Field(1000, ge=1, description="per seed")
    batch_size: int = Field(250, ge=1)
    seeds: list[int] = Field(
        [2024],
        min_length=1,
        description="noise seeds: every row and quantization seed is sampled from the same noise as FP, so rows "
        "are compared sample by sample",
    )
    eta: float = Field(0.0, ge=0, le=1)
    grid_size: int = Field(8, ge=1)
    guidance_scale: float = Field(7.5, ge=1, description="classifier-free guidance scale (conditional models)")
    prompts: str | None = Field(None, description="text-to-image models: prompts file (.txt, .csv or .json)")
    backend: Literal["fake", "int8"] = Field(
        "fake",
        description="fake: float32 on dequantized values; int8: the quantized rows on oneDNN's int8 kernels "
        "(x86 CPU, rows up to W7; see pipeline/deploy/integer.py)",
    )


class GuardConfig(Section):
    """The held-out noise on which a guard compares LES with γ = 1."""

    seed: int = Field(4242, description="noise seed of the held-out samples; never one of sample.seeds")
    num_samples: int = Field(250, ge=1, description="held-out samples per candidate and quantization seed")
    batch_size: int = Field(250, ge=1)
    criterion: Literal["features", "pixels"] = Field(
        "features",
        description="what 'closer to FP' means, sample by sample on the same noise: the squared distance of "
        "FID's features (the digit classifier's, or Inception's with eval.inception_weights), or the pixel MSE",
    )


class GuardEntry(Section):
    """A row of the tables that keeps LES only where it helps: per quantization seed, the model with
    learned γ (row ``les``) or the one with γ = 1 (row ``no_les``), whichever is closer to FP on
    held-out noise."""

    les: str
    no_les: str


class EvalConfig(Section):
    kid_subset_size: int = Field(500, ge=2)
    isc_splits: int = Field(5, ge=1)
    prc_neighborhood: int = Field(3, ge=1)
    inception_weights: str | None = Field(
        None, description="local InceptionV3 weights for torch-fidelity's inception-v3-compat"
    )
    reference_images: str | None = Field(
        None,
        description="folder of real images, all of one size (FID / sFID of a local model; without it or "
        "inception_weights a local model gets the paired metrics only)",
    )
    clip_model: str | None = Field(
        None,
        description="text-to-image models: a local folder with a transformers CLIPModel and its processor "
        "(save_pretrained), for the CLIP score",
    )


class Config(Section):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    autocast: Literal["none", "bf16", "fp16"] = Field(
        "none", description="mixed precision of the recon and sample forward passes"
    )
    model: ModelConfig = ModelConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    calib: CalibConfig = CalibConfig()
    quant: QuantConfig = QuantConfig()
    weights: dict[str, WeightsEntry] = {}
    rows: dict[str, RowEntry] = {}
    peers: dict[str, PeerEntry] = {}
    guards: dict[str, GuardEntry] = {}
    guard: GuardConfig = GuardConfig()
    stats: StatsConfig = StatsConfig()
    capture: CaptureConfig = CaptureConfig()
    les: LESConfig = LESConfig()
    recon: ReconConfig = ReconConfig()
    pts: PTSConfig = PTSConfig()
    shared_acts: SharedActsConfig = SharedActsConfig()
    attention: AttentionConfig = AttentionConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _entries_fit_together(self) -> "Config":
        problems = []
        # each step has N records, 2N with classifier-free guidance (a local text-to-image model; the embedded
        # default is unconditional)
        available = self.calib.num_samples * (1 if self.model.source == "embedded" else 2)
        if self.calib.layer_records_per_step > available:
            problems.append(
                f"calib.layer_records_per_step: {self.calib.layer_records_per_step} is above the {available} records "
                f"each step has (calib.num_samples {self.calib.num_samples}"
                + (")" if self.model.source == "embedded" else ", twice with guidance)")
            )
        steps = self.diffusion.steps
        if self.les.records is not None and not steps <= self.les.records <= available * steps:
            problems.append(
                f"les.records: {self.les.records} is "
                + (
                    f"below one record per step ({steps} steps)"
                    if self.les.records < steps
                    else f"above the {available * steps} records of the trajectories "
                    f"({available} per step x {steps} steps)"
                )
            )
        for section in ("weights", "rows", "peers", "guards"):
            problems += [
                f"{section}.{name}: use lower-case letters, digits, '.' and '-'"
                for name in getattr(self, section)
                if not ENTRY_NAME.match(name)
            ]
        for first, second in (("rows", "peers"), ("rows", "guards"), ("peers", "guards")):
            problems += [
                f"{first}.{name} and {second}.{name}: a name names one row"
                for name in set(getattr(self, first)) & set(getattr(self, second))
            ]
        problems += [
            f"rows.{name}: 'fp' names the FP model's samples"
            for name in ("fp",)
            if name in self.rows or name in self.peers or name in self.guards
        ]
        chains: dict[tuple, str] = {}
        for name in self.weights:
            signature = self.weights_signature(name)
            if signature in chains:
                problems.append(
                    f"weights.{chains[signature]} and weights.{name} make the same weights (same LES, weighting, "
                    "AdaRound, split and bits): keep one and point the rows at it"
                )
            chains.setdefault(signature, name)
        for name, row in self.rows.items():
            weights = self.weights.get(row.weights)
            if weights is None:
                problems.append(
                    f"rows.{name}.weights: no weights entry {row.weights!r}; defined: {', '.join(self.weights)}"
                )
            elif row.method is not None and self._switches(row.method) != self._switches(weights.method):
                problems.append(
                    f"rows.{name}.method: {row.method}'s weights differ from those of weights.{row.weights} "
                    f"({weights.method}); name a weights entry of {row.method}"
                )
            elif weights.a_bits not in (None, row.a_bits):
                problems.append(
                    f"rows.{name}.a_bits: {row.a_bits}, but weights.{row.weights} learned γ for a_bits {weights.a_bits}"
                )
            elif self.row_attention(name) is not None and row.a_bits > 8:
                problems.append(
                    f"rows.{name}.attention: the attention matmuls are quantized to at most 8 bits, the row's a_bits "
                    f"is {row.a_bits}; set attention: false"
                )
        problems += self._guard_problems()
        if self.sample.backend == "int8":
            if self.device == "cuda" or (self.device == "auto" and _cuda_available()):
                problems.append(
                    f"sample.backend: int8 runs on the CPU's int8 kernels, and device: {self.device} means the GPU "
                    "here; set device: cpu, or backend: fake"
                )
            problems += [
                f"sample.backend: int8 cannot run rows.{name} (W{self.weights[row.weights].w_bits}): its integer "
                "weights (w_q - z_w) do not fit int8; use backend fake or drop the row"
                for name, row in self.rows.items()
                if row.weights in self.weights and self.weights[row.weights].w_bits > 7
            ]
        for key in ("table", "ablation"):
            problems += [
                f"report.{key}: {name!r} is neither a row, a guard nor a peer"
                for name in getattr(self.report, key)
                if name not in self.rows and name not in self.peers and name not in self.guards
            ]
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    def _guard_problems(self) -> list[str]:
        problems = []
        if self.guards and self.guard.seed in self.sample.seeds:
            problems.append(
                f"guard.seed: {self.guard.seed} is one of sample.seeds; the guard's held-out samples must come from "
                "noise that no figure of the tables uses"
            )
        for name, guard in self.guards.items():
            missing = [f"guards.{name}.{key}: no row {row!r}" for key, row in guard if row not in self.rows]
            if missing:
                problems += missing
                continue
            if any(self.rows[row].weights not in self.weights for _, row in guard):
                continue  # reported with the rows
            les, no_les = self.row_variant(guard.les), self.row_variant(guard.no_les)
            if not METHODS[les.method].les or METHODS[no_les.method].les:
                problems.append(
                    f"guards.{name}: {guard.les} must learn γ and {guard.no_les} must not (got {les.method} and "
                    f"{no_les.method})"
                )
            elif (les.w_bits, les.a_bits) != (no_les.w_bits, no_les.a_bits):
                problems.append(f"guards.{name}: {guard.les} is {les.label} but {guard.no_les} is {no_les.label}")
        return problems

    def guard_criterion(self) -> str:
        """The guards' criterion as they apply it: a local model without Inception weights has no
        feature space (the digit classifier knows only the embedded digits), so features fall back
        to pixels there (``notices`` says so)."""
        local_without_features = self.model.source == "local" and self.eval.inception_weights is None
        return "pixels" if local_without_features else self.guard.criterion

    def entry(self, section: str, name: str):
        """An entry by name, with a message that lists the defined ones (stage scripts take names)."""
        entries = getattr(self, section)
        if name not in entries:
            raise ConfigError(f"{section}: no entry {name!r}; defined: {', '.join(entries)}")
        return entries[name]

    def _switches(self, method: str) -> tuple:
        return METHODS[method].weight_switches(self.recon.weighting == "method")

    def weights_signature(self, name: str) -> tuple:
        """What a weights entry's les + recon chain depends on: entries with equal signatures would make
        bit-identical weights, so the config refuses them (one chain, shared by the rows)."""
        entry = self.weights[name]
        return (self._switches(entry.method), entry.w_bits, entry.a_bits)

    def weights_variant(self, name: str) -> Variant:
        entry = self.entry("weights", name)
        return Variant(entry.method, entry.w_bits, entry.a_bits)

    def row_variant(self, name: str) -> Variant:
        """What a row, a guard (its LES row's) or a peer quantizes."""
        if name in self.guards and name not in self.rows:
            return self.row_variant(self.guards[name].les)
        if name in self.peers:
            peer = self.peers[name]
            return Variant(peer.library, peer.w_bits, peer.a_bits)
        row = self.entry("rows", name)
        variant = self.weights_variant(row.weights)._replace(a_bits=row.a_bits)
        return variant._replace(method=row.method) if row.method else variant

    def row_attention(self, name: str) -> int | None:
        """The softmax bits of a row that quantizes its attention matmuls, None for one that does not."""
        row = self.rows[name]
        method = row.method or self.weights[row.weights].method
        on = METHODS[method].attention if row.attention is None else row.attention
        return self.attention.softmax_bits if on else None


def _cuda_available() -> bool:
    """Whether ``device: auto`` means CUDA on this machine (torch imported only for a config that asks)."""
    import torch

    return torch.cuda.is_available()


class ConfigError(ValueError):
    """A parameter is wrong; the message names its dotted key."""


def _field(loc: tuple) -> FieldInfo | None:
    """The field definition at a pydantic error location, e.g. ("quant", "w_bits") or, inside a named
    entry, ("weights", "qdiff-w4", "w_bits")."""
    model, info, parts = Config, None, list(loc)
    while parts:
        part = parts.pop(0)
        if model is None or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        annotation = info.annotation
        if typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
            parts = parts[1:]  # the entry's name
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return info


def _allowed_range(info: FieldInfo | None) -> str | None:
    """A field's numeric bounds in interval notation, e.g. "[2, 16]" or "(0, 1]"."""
    lower, upper = ("(", "-inf"), ("inf", ")")
    for bound in info.metadata if info else ():
        if isinstance(bound, annotated_types.Ge):
            lower = ("[", bound.ge)
        elif isinstance(bound, annotated_types.Gt):
            lower = ("(", bound.gt)
        elif isinstance(bound, annotated_types.Le):
            upper = (bound.le, "]")
        elif isinstance(bound, annotated_types.Lt):
            upper = (bound.lt, ")")
    if (lower, upper) == (("(", "-inf"), ("inf", ")")):
        return None
    return f"{lower[0]}{lower[1]}, {upper[0]}{upper[1]}"


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        if not key:  # a check across sections: its message names the keys
            lines.append("  " + item["msg"].removeprefix("Value error, "))
            continue
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (typo?)")
            continue
        message = item["msg"].removeprefix("Value error, ")
        got = item.get("input")
        line = f"  {key}: {message}" + ("" if isinstance(got, dict) else f" (got {got!r})")
        allowed = _allowed_range(_field(item["loc"]))
        if allowed and item["type"] in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
            line += f"; allowed: {allowed}"
        lines.append(line)
    return "\n".join(lines)


def parse_config(data: dict, source: str = "params") -> Config:
    """Validate parameters on their own (no model needed); :func:`pipeline.preflight.load_config` adds
    the model checks."""
    try:
        return Config.model_validate(data or {})
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def read_params(path: str | Path = "params.yaml") -> Config:
    """``params.yaml`` validated against the schema alone; :func:`pipeline.preflight.load_config` adds
    the checks that need the model."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"parameter file {path} not found")
    with path.open() as f:
        return parse_config(yaml.safe_load(f), str(path))
