"""torch-fidelity metrics in one of two feature spaces:

* the digit classifier, registered as a torch-fidelity feature extractor, for the embedded default:
  its numbers are "digit-classifier features", not Inception features; say so wherever they are shown;
* the standard InceptionV3 (torch-fidelity's ``inception-v3-compat``) from a local weights file
  (``eval.inception_weights``), for real models: nothing is downloaded. Its features also give sFID.

A local model without Inception weights or reference images has no feature space: it gets the paired
metrics only (MSE / PSNR against the FP samples of the same seed), and its record says so.

The reference set is featurized once (:func:`featurize`, ``reference=True``) and its features are
what every row's metrics read; the generated samples' features and the metrics computed from both are
those torch-fidelity's ``calculate_metrics`` computes (the same extractor, batches and functions).

sFID is FID on spatial features, as the ADM evaluation suite defines it (openai/guided-diffusion,
evaluations/evaluator.py: ``FID_SPATIAL_NAME = "mixed_6/conv:0"`` and ``spatial = spatial[..., :7]``,
flattened per image): the first 7 channels of the ``mixed_6/conv`` map of the TF Inception graph, 17×17
at the 299×299 input, so 7·17·17 = 2023 dimensions. ``mixed_6`` is the seventh mixed block (mixed,
mixed_1, … follow Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d), so in torch-fidelity's port the map is the output
(after batch norm and ReLU) of ``Mixed_6d.branch1x1``, the block's 1×1 branch; its channels are
flattened in TF's (H, W, C) order.

CLIP score (text-to-image rows, ``eval.clip_model``): 100 · max(cos(image embedding, text embedding), 0)
of each sample with its own prompt, averaged over samples.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from pipeline.eval.paired import paired_error
from pipeline.infra.listing import clip_folder_problem, reference_files
from pipeline.infra.storage import ArtifactError, read_tensors
from pipeline.models.classifier import DigitClassifier
from pipeline.models.digits import load_digits_images, to_uint8_rgb
from pipeline.models.local import Layout

FEATURE_EXTRACTOR = "digit-classifier"
FEATURE_NOTE = "digit-classifier features"
INCEPTION = "inception-v3-compat"
INCEPTION_NOTE = "Inception-v3 features"
SPATIAL = "spatial"  # the sFID features' name in a features dict
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # TF's mixed_6/conv (see the module docstring)
SPATIAL_CHANNELS = 7
NO_FEATURES_NOTE = (  # a record's "features" when nothing was featurized; tables print it as their caption
    "the paired error against FP only (FID / sFID / KID / ISC / precision-recall not computed: set "
    "eval.inception_weights and eval.reference_images to compute them)"
)
BATCH_SIZE = 256  # torch-fidelity's feature batches


@dataclass(frozen=True)
class FeatureSpace:
    extractor: str  # torch-fidelity feature extractor name
    weights: str  # its weights file
    note: str  # how tables name the features
    cuda: bool = False  # featurize and compute the metrics on the GPU (the ``device`` param), never by mere presence

    @property
    def digits(self) -> bool:
        return self.extractor == FEATURE_EXTRACTOR

    @property
    def distance_layer(self) -> str:
        """The features FID, KID and precision / recall use."""
        return "features" if self.digits else "2048"

    @property
    def score_layer(self) -> str:
        """The features the Inception score uses (the extractor's default for ISC)."""
        return "logits" if self.digits else "logits_unbiased"


def feature_space(classifier_path: str, inception_weights: str | None, cuda: bool = False) -> FeatureSpace:
    """Inception features when local Inception weights are given, else the digit classifier's; on the GPU
    with ``cuda``."""
    if inception_weights is not None:
        if not Path(inception_weights).is_file():
            raise FileNotFoundError(f"eval.inception_weights: {inception_weights} not found")
        return FeatureSpace(INCEPTION, str(inception_weights), INCEPTION_NOTE, cuda)
    return FeatureSpace(FEATURE_EXTRACTOR, classifier_path, FEATURE_NOTE, cuda)


def measured_features(
    source: str, classifier_path: str, inception_weights: str | None, reference_images: str | None, cuda: bool = False
) -> FeatureSpace | None:
    """The feature space of the distribution metrics, or None for a local model that lacks Inception
    weights or reference images (it gets the paired metrics only)."""
    if source != "embedded" and (inception_weights is None or reference_images is None):
        return None
    return feature_space(classifier_path, inception_weights, cuda)


class DigitClassifierFeatures(FeatureExtractorBase):
    """torch-fidelity feed uint8 RGB (N, 3, H, W); the classifier wants [-1, 1] grey at its size."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError("the digit-classifier feature extractor needs feature_extractor_weights_path")
        tensors, header = read_tensors(feature_extractor_weights_path)
        self.image_size = header["image_size"]
        self.classifier = DigitClassifier()
        self.classifier.load_state_dict(tensors)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits"}.get(metric, "features")

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, x):
        grey = x.float().mean(1, keepdim=True) / 127.5 - 1
        if grey.shape[-1] != self.image_size:
            grey = F.interpolate(grey, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        features, logits = self.classifier(grey)
        found = {"features": features, "logits": logits}
        return tuple(found[name] for name in self.features_list)


if FEATURE_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(FEATURE_EXTRACTOR, DigitClassifierFeatures)


@torch.no_grad()
def confident_share(images_uint8: torch.Tensor, classifier_path: str, threshold: float = 0.9) -> float:
    """Share of images the digit classifier labels with probability above ``threshold``: a direct
    reading of "recognisable digits" next to the distribution metrics."""
    extractor = DigitClassifierFeatures(
        FEATURE_EXTRACTOR, ["logits"], feature_extractor_weights_path=classifier_path
    ).eval()
    probabilities = torch.cat([extractor(batch)[0].softmax(1) for batch in images_uint8.split(512)])
    return float((probabilities.max(1).values > threshold).float().mean())


def distance_features(images: torch.Tensor, features: FeatureSpace) -> torch.Tensor:
    """The features FID compares, of each image in [-1, 1], (N, D) float32."""
    return featurize(to_uint8_rgb(images), features, reference=True)[features.distance_layer]


class ImageTensors(torch.utils.data.Dataset):
    def __init__(self, images_uint8: torch.Tensor) -> None:
        self.images = images_uint8

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _extractor(features: FeatureSpace, layers: list[str]):
    """torch-fidelity's extractor for ``layers``, as ``calculate_metrics`` creates it, built once per
    process for a weights file as it is on disk (the guard featurizes FP and each candidate); a wrong
    weights file for Inception fails here, naming the key."""
    return _cached_extractor(features, tuple(layers), os.stat(features.weights).st_mtime_ns)


@lru_cache(maxsize=4)
def _cached_extractor(features: FeatureSpace, layers: tuple[str, ...], mtime_ns: int):
    try:
        return create_feature_extractor(
            features.extractor,
            list(layers),
            cuda=features.cuda,
            feature_extractor_weights_path=features.weights,
            verbose=False,
        )
    except (RuntimeError, KeyError, AttributeError, pickle.UnpicklingError) as error:
        if features.digits:
            raise
        raise ValueError(
            f"eval.inception_weights: {features.weights} is not a state dict of torch-fidelity's {INCEPTION} "
            f"(InceptionV3, pt_inception-2015-12-05 format): {str(error).splitlines()[0][:300]}"
        ) from None


@torch.no_grad()
def featurize(images_uint8: torch.Tensor, features: FeatureSpace, reference: bool = False) -> dict[str, torch.Tensor]:
    """Features of uint8 RGB images (N, 3, H, W), float32 on the CPU: every layer the metrics use for a
    generated set, the distance (and spatial) features only for the reference set. With Inception,
    ``spatial`` (N, 2023) holds sFID's features (see the module docstring)."""
    layers = [features.distance_layer] if reference else [features.distance_layer, features.score_layer]
    extractor = _extractor(features, layers)
    spatial = []
    hook = None
    if not features.digits:  # sFID's features, taken on the way to the pool features

        def keep(module, args, output):  # (B, 192, 17, 17) -> (B, 17, 17, 7) -> (B, 2023), TF's order
            spatial.append(output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float().cpu())

        hook = extractor.get_submodule(SPATIAL_MODULE).register_forward_hook(keep)
    try:
        found = get_featuresdict_from_dataset(
            ImageTensors(images_uint8),
            extractor,
            BATCH_SIZE,
            features.cuda,
            True,  # save_cpu_ram: no DataLoader worker processes on a 2-core machine
            False,
        )
    finally:
        if hook is not None:
            hook.remove()
    found = {name: found[name] for name in layers}
    if hook is not None:
        found[SPATIAL] = torch.cat(spatial)
    return found


def fidelity_from_features(
    generated: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    features: FeatureSpace,
    kid_subset_size: int,
    isc_splits: int,
    prc_neighborhood: int,
) -> dict[str, float]:
    """FID (and sFID with Inception), KID, ISC and precision / recall of the generated features against
    the reference features, by torch-fidelity's own functions with the arguments ``calculate_metrics``
    passes them."""
    count = len(next(iter(generated.values())))
    kwargs = dict(
        cuda=features.cuda,
        kid_subset_size=min(kid_subset_size, count, len(reference[features.distance_layer])),
        isc_splits=isc_splits,
        prc_neighborhood=prc_neighborhood,
        verbose=False,
        batch_size=BATCH_SIZE,
        save_cpu_ram=True,
    )
    layer = features.distance_layer
    result = {}
    result.update(isc_featuresdict_to_metric(generated, features.score_layer, **kwargs))

    def frechet(name: str) -> float:
        stats = [fid_featuresdict_to_statistics(found, name) for found in (generated, reference)]
        return fid_statistics_to_metric(*stats, False)["frechet_inception_distance"]

    result["frechet_inception_distance"] = frechet(layer)
    if SPATIAL in generated:
        result["sfid"] = frechet(SPATIAL)
    result.update(kid_featuresdict_to_metric(generated, reference, layer, **kwargs))
    result.update(prc_featuresdict_to_metric(generated, reference, layer, **kwargs))
    names = {
        "frechet_inception_distance": "fid",
        "sfid": "sfid",
        "kernel_inception_distance_mean": "kid",
        "kernel_inception_distance_std": "kid_std",
        "inception_score_mean": "isc",
        "inception_score_std": "isc_std",
        "precision": "precision",
        "recall": "recall",
    }
    return {short: float(result[long]) for long, short in names.items() if long in result}


def fidelity_metrics(
    generated_uint8: torch.Tensor,
    reference_uint8: torch.Tensor,
    features: FeatureSpace,
    kid_subset_size: int,
    isc_splits: int,
    prc_neighborhood: int,
) -> dict[str, float]:
    """FID (sFID), KID, ISC and precision/recall of ``generated`` against ``reference`` (uint8 RGB)."""
    return fidelity_from_features(
        featurize(generated_uint8, features),
        featurize(reference_uint8, features, reference=True),
        features,
        kid_subset_size,
        isc_splits,
        prc_neighborhood,
    )


def evaluate_runs(
    runs: dict[int, torch.Tensor],
    reference: dict[str, torch.Tensor] | torch.Tensor | None,
    features: FeatureSpace | None,
    kid_subset_size: int,
    isc_splits: int,
    prc_neighborhood: int,
    fp_runs: dict[int, torch.Tensor] | None = None,
    clip: "ClipScorer | None" = None,
    prompts: list[str] | None = None,
) -> dict:
    """Metrics of each seed's samples ([-1, 1]) against the reference set (its features from
    :func:`featurize`, or its uint8 images), plus the paired error against the FP samples of the same
    seed when given, the CLIP score when ``clip`` is given (sample i with prompt i mod len(prompts)),
    and their mean over seeds ("mean"; the spread is in "seeds"). The share of confidently classified
    digits only in the digit classifier's feature space. Without a feature space (``features`` None)
    only the paired error and the CLIP score."""
    if features is not None and isinstance(reference, torch.Tensor):
        reference = featurize(reference, features, reference=True)
    per_seed = {}
    for seed, images in runs.items():
        uint8 = to_uint8_rgb(images)
        found = {}
        if features is not None:
            found = fidelity_from_features(
                featurize(uint8, features), reference, features, kid_subset_size, isc_splits, prc_neighborhood
            )
            if features.digits:
                found["confident_share"] = confident_share(uint8, features.weights)
        if clip is not None:
            if not prompts:
                raise ValueError("the CLIP score needs the samples' prompts (sample.prompts)")
            found["clip_score"] = clip(uint8, [prompts[i % len(prompts)] for i in range(len(uint8))])
        found["num_samples"] = len(images)
        if fp_runs is not None:
            if seed not in fp_runs:
                raise ValueError(f"no FP samples for seed {seed}: rerun the sample stage for fp")
            paired = paired_error(fp_runs[seed], images)
            found.update(paired_mse=paired["mse"], paired_psnr_db=paired["psnr_db"])
        per_seed[str(seed)] = found
    keys = next(iter(per_seed.values())).keys()
    mean = {key: sum(found[key] for found in per_seed.values()) / len(per_seed) for key in keys}
    return {"features": features.note if features is not None else NO_FEATURES_NOTE, "seeds": per_seed, "mean": mean}


def evaluate_quant_seeds(runs: dict[int, dict[int, torch.Tensor]], **kwargs) -> dict:
    """:func:`evaluate_runs` for the samples of each quantization seed (``runs[quant seed][noise seed]``),
    and the mean over quantization seeds of each seed's mean ("mean"; the spread is in "quant_seeds")."""
    per_seed = {str(seed): evaluate_runs(seed_runs, **kwargs) for seed, seed_runs in runs.items()}
    first = next(iter(per_seed.values()))
    means = [found["mean"] for found in per_seed.values()]
    mean = {key: sum(m[key] for m in means) / len(means) for key in first["mean"]}
    return {"features": first["features"], "quant_seeds": per_seed, "mean": mean}


def reference_digits(image_size: int) -> torch.Tensor:
    """The real digits, as uint8 RGB at the model's size: the reference distribution of every metric."""
    return to_uint8_rgb(load_digits_images(image_size)[0])


def sample_pixel_size(layout: Layout) -> tuple[int, int]:
    """(height, width) of a model's samples in pixels: the UNet's sample size, times the autoencoder's
    downscaling (2 per down block after the first) for a latent model."""
    size = json.loads((layout.unet / "config.json").read_text())["sample_size"]
    height, width = (size, size) if isinstance(size, int) else size
    if layout.autoencoder is not None:
        blocks = json.loads((layout.autoencoder / "config.json").read_text())["block_out_channels"]
        height, width = height * 2 ** (len(blocks) - 1), width * 2 ** (len(blocks) - 1)
    return height, width


def read_reference(tensors: dict[str, torch.Tensor], header: dict, samples: torch.Tensor, source: str) -> dict:
    """The reference features of ``artifacts/reference.safetensors`` (its tensors and header), checked
    against the samples they are compared with: they must come from images of the samples' size."""
    if header.get("features") is not None and header.get("size") != list(samples.shape[-2:]):
        raise ArtifactError(
            f"{source} holds features of {header.get('size')} images, but the samples are "
            f"{list(samples.shape[-2:])}; rerun the reference stage"
        )
    return tensors


def reference_images(folder: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """The images of a local folder as uint8 RGB (N, 3, H, W), resized to the samples' ``size``: the
    reference distribution for a real model. The images must share one size (a reference set is one
    resolution; a mix is a folder assembled by mistake)."""
    from PIL import Image

    files = reference_files(folder)
    sizes: dict[tuple[int, int], str] = {}
    for f in files:
        with Image.open(f) as image:
            sizes.setdefault(image.size, f.name)
    if len(sizes) > 1:
        found = ", ".join(f"{w}x{h} ({name})" for (w, h), name in list(sizes.items())[:3])
        raise ValueError(f"eval.reference_images: {folder} holds images of mixed sizes: {found}; use one size")
    images = [np.asarray(Image.open(f).convert("RGB").resize((size[1], size[0]), Image.BICUBIC)) for f in files]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def reference_set(
    source: str, image_size: int, folder: str | None, samples: torch.Tensor | tuple[int, int]
) -> torch.Tensor:
    """The real images the samples are measured against: the digits for the embedded default, the
    folder ``eval.reference_images`` (at the samples' size: a samples tensor or (H, W)) for a local
    model."""
    if source == "embedded":
        return reference_digits(image_size)
    if folder is None:
        raise ValueError("eval.reference_images: required for the metrics of a local model (a folder of real images)")
    size = tuple(samples.shape[-2:]) if isinstance(samples, torch.Tensor) else tuple(samples)
    return reference_images(folder, size)


class ClipScorer:
    """CLIP score of images against their prompts with a CLIP model read from a local folder."""

    def __init__(self, folder: str | Path, batch_size: int = 64, device: torch.device = torch.device("cpu")) -> None:
        from transformers import CLIPModel, CLIPProcessor

        problem = clip_folder_problem(folder)
        if problem is not None:
            raise ValueError(f"eval.clip_model: {problem}")
        self.device = device
        self.model = CLIPModel.from_pretrained(str(folder)).eval().to(self.device)
        self.processor = CLIPProcessor.from_pretrained(str(folder))
        self.batch_size = batch_size

    @torch.no_grad()
    def similarities(self, images_uint8: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """cos(image embedding, text embedding) of each image with its own prompt, shape (N,)."""
        if len(prompts) != len(images_uint8):
            raise ValueError(f"{len(images_uint8)} images but {len(prompts)} prompts")
        found = []
        for start in range(0, len(images_uint8), self.batch_size):
            images = list(images_uint8[start : start + self.batch_size].permute(0, 2, 3, 1).numpy())
            inputs = self.processor(
                text=prompts[start : start + self.batch_size],
                images=images,
                return_tensors="pt",
                padding=True,
                truncation=True,  # long captions: the text model's positions (CLIP: 77 tokens)
                max_length=self.model.config.text_config.max_position_embeddings,
            ).to(self.device)
            image = _embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
            text = _embedding(
                self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            )
            found.append(F.cosine_similarity(image.float(), text.float(), dim=-1).cpu())
        return torch.cat(found)

    def __call__(self, images_uint8: torch.Tensor, prompts: list[str]) -> float:
        """100 · max(cos, 0), averaged over the images."""
        return float((100 * self.similarities(images_uint8, prompts).clamp_min(0)).mean())


def _embedding(output) -> torch.Tensor:
    """The projected embedding, whether transformers returns it as a tensor or inside a model output."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output
