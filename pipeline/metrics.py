"""torch-fidelity metrics with the digit classifier as a registered feature extractor.

Every number computed here is "digit-classifier features", not Inception features: say so wherever
it is shown."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from pipeline.data import load_digits_images, to_uint8_rgb
from pipeline.io import read_tensors
from pipeline.models import DigitClassifier

FEATURE_EXTRACTOR = "digit-classifier"
FEATURE_NOTE = "digit-classifier features"


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
    extractor = DigitClassifierFeatures(FEATURE_EXTRACTOR, ["logits"], feature_extractor_weights_path=classifier_path).eval()
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
    classifier_path: str,
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
        feature_extractor=FEATURE_EXTRACTOR,
        feature_extractor_weights_path=classifier_path,
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
    classifier_path: str,
    kid_subset_size: int,
    isc_splits: int,
    prc_neighborhood: int,
    fp_runs: dict[int, torch.Tensor] | None = None,
) -> dict:
    """Metrics of each seed's samples ([-1, 1]), plus the paired error against the FP samples of the
    same seed when given, and their mean over seeds ("mean"; the spread is in "seeds")."""
    per_seed = {}
    for seed, images in runs.items():
        uint8 = to_uint8_rgb(images)
        found = fidelity_metrics(uint8, reference_uint8, classifier_path, kid_subset_size, isc_splits, prc_neighborhood)
        found["confident_share"] = confident_share(uint8, classifier_path)
        found["num_samples"] = len(images)
        if fp_runs is not None:
            if seed not in fp_runs:
                raise ValueError(f"no FP samples for seed {seed}: rerun the sample stage for fp")
            paired = paired_error(fp_runs[seed], images)
            found.update(paired_mse=paired["mse"], paired_psnr_db=paired["psnr_db"])
        per_seed[str(seed)] = found
    keys = next(iter(per_seed.values())).keys()
    mean = {key: sum(found[key] for found in per_seed.values()) / len(per_seed) for key in keys}
    return {"seeds": per_seed, "mean": mean}


def reference_digits(image_size: int) -> torch.Tensor:
    """The real digits, as uint8 RGB at the model's size: the reference distribution of every metric."""
    return to_uint8_rgb(load_digits_images(image_size)[0])
