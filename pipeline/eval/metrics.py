"""torch-fidelity metrics in one of two feature spaces:

* the digit classifier, registered as a torch-fidelity feature extractor, for the embedded default:
  its numbers are "digit-classifier features", not Inception features; say so wherever they are shown;
* the standard InceptionV3 (torch-fidelity's ``inception-v3-compat``) from a local weights file
  (``eval.inception_weights``), for real models: nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from pipeline.infra.storage import read_tensors
from pipeline.models.digits import load_digits_images, to_uint8_rgb
from pipeline.models.embedded import DigitClassifier

FEATURE_EXTRACTOR = "digit-classifier"
FEATURE_NOTE = "digit-classifier features"
INCEPTION = "inception-v3-compat"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class FeatureSpace:
    extractor: str  # torch-fidelity feature extractor name
    weights: str  # its weights file
    note: str  # how tables name the features

    @property
    def digits(self) -> bool:
        return self.extractor == FEATURE_EXTRACTOR


def feature_space(classifier_path: str, inception_weights: str | None) -> FeatureSpace:
    """Inception features when local Inception weights are given, else the digit classifier's."""
    if inception_weights is not None:
        if not Path(inception_weights).is_file():
            raise FileNotFoundError(f"eval.inception_weights: {inception_weights} not found")
        return FeatureSpace(INCEPTION, str(inception_weights), "Inception-v3 features")
    return FeatureSpace(FEATURE_EXTRACTOR, classifier_path, FEATURE_NOTE)


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


def paired_error(reference: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    """Pixel error between samples drawn from the same noise (deterministic DDIM): a far less noisy
    comparison of quantizers than any distribution metric on a thousand samples."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(4.0 / mse.clamp_min(1e-12))  # images span [-1, 1]: peak-to-peak 2
    return {"mse": float(mse.mean()), "psnr_db": float(psnr.mean())}


class ImageTensors(torch.utils.data.Dataset):
    def __init__(self, images_uint8: torch.Tensor) -> None:
        self.images = images_uint8

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def fidelity_metrics(
    generated_uint8: torch.Tensor,
    reference_uint8: torch.Tensor,
    features: FeatureSpace,
    kid_subset_size: int,
    isc_splits: int,
    prc_neighborhood: int,
) -> dict[str, float]:
    """FID, KID, ISC and precision/recall of ``generated`` against ``reference`` (uint8 RGB)."""
    result = torch_fidelity.calculate_metrics(
        input1=ImageTensors(generated_uint8),
        input2=ImageTensors(reference_uint8),
        cuda=torch.cuda.is_available(),
        fid=True,
        kid=True,
        isc=True,
        prc=True,
        feature_extractor=features.extractor,
        feature_extractor_weights_path=features.weights,
        kid_subset_size=min(kid_subset_size, len(generated_uint8), len(reference_uint8)),
        isc_splits=isc_splits,
        prc_neighborhood=prc_neighborhood,
        cache=False,
        verbose=False,
        batch_size=256,
        save_cpu_ram=True,  # no DataLoader worker processes on a 2-core machine
    )
    names = {
        "frechet_inception_distance": "fid",
        "kernel_inception_distance_mean": "kid",
        "kernel_inception_distance_std": "kid_std",
        "inception_score_mean": "isc",
        "inception_score_std": "isc_std",
        "precision": "precision",
        "recall": "recall",
    }
    return {short: float(result[long]) for long, short in names.items() if long in result}


def evaluate_runs(
    runs: dict[int, torch.Tensor],
    reference_uint8: torch.Tensor,
    features: FeatureSpace,
    kid_subset_size: int,
    isc_splits: int,
    prc_neighborhood: int,
    fp_runs: dict[int, torch.Tensor] | None = None,
) -> dict:
    """Metrics of each seed's samples ([-1, 1]), plus the paired error against the FP samples of the
    same seed when given, and their mean over seeds ("mean"; the spread is in "seeds"). The share of
    confidently classified digits only in the digit classifier's feature space."""
    per_seed = {}
    for seed, images in runs.items():
        uint8 = to_uint8_rgb(images)
        found = fidelity_metrics(uint8, reference_uint8, features, kid_subset_size, isc_splits, prc_neighborhood)
        if features.digits:
            found["confident_share"] = confident_share(uint8, features.weights)
        found["num_samples"] = len(images)
        if fp_runs is not None:
            if seed not in fp_runs:
                raise ValueError(f"no FP samples for seed {seed}: rerun the sample stage for fp")
            paired = paired_error(fp_runs[seed], images)
            found.update(paired_mse=paired["mse"], paired_psnr_db=paired["psnr_db"])
        per_seed[str(seed)] = found
    keys = next(iter(per_seed.values())).keys()
    mean = {key: sum(found[key] for found in per_seed.values()) / len(per_seed) for key in keys}
    return {"features": features.note, "seeds": per_seed, "mean": mean}


def reference_digits(image_size: int) -> torch.Tensor:
    """The real digits, as uint8 RGB at the model's size: the reference distribution of every metric."""
    return to_uint8_rgb(load_digits_images(image_size)[0])


def reference_images(folder: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """The images of a local folder as uint8 RGB (N, 3, H, W), resized to the samples' ``size``: the
    reference distribution for a real model."""
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"eval.reference_images: {folder} is not a folder of images ({', '.join(IMAGE_SUFFIXES)})"
        )
    images = [np.asarray(Image.open(f).convert("RGB").resize((size[1], size[0]), Image.BICUBIC)) for f in files]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def reference_set(source: str, image_size: int, folder: str | None, samples: torch.Tensor) -> torch.Tensor:
    """The real images the samples are measured against: the digits for the embedded default, the
    folder ``eval.reference_images`` (at the samples' size) for a local model."""
    if source == "embedded":
        return reference_digits(image_size)
    if folder is None:
        raise ValueError("eval.reference_images: required for the metrics of a local model (a folder of real images)")
    return reference_images(folder, tuple(samples.shape[-2:]))
