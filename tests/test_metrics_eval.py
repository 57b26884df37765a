"""pipeline/eval/metrics.py as the papers report it: sFID on Inception's spatial features, the CLIP
score, reference features computed once, and the errors that name the key, each checked against an
independent computation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.eval.metrics import (
    INCEPTION,
    ClipScorer,
    distance_features,
    evaluate_runs,
    feature_space,
    featurize,
    measured_features,
    reference_images,
)
from pipeline.infra.listing import reference_listing
from pipeline.infra.storage import write_tensors
from pipeline.models.classifier import DigitClassifier
from tiny_models import save_tiny_clip


def uint8_images(count: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.randint(
        0, 256, (count, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


@torch.no_grad()
def spatial_by_hook(weights, images_uint8: torch.Tensor) -> np.ndarray:
    """ADM's sFID features written out independently: torch-fidelity's Inception, a hook on the
    output of Mixed_6d's 1x1 branch (TF mixed_6/conv), channels [:7] in (H, W, C) order, flattened."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    model = FeatureExtractorInceptionV3(INCEPTION, ["2048"], feature_extractor_weights_path=str(weights)).eval()
    kept = []
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, a, out: kept.append(out))
    model(images_uint8)
    (spatial,) = kept
    assert spatial.shape[1:] == (192, 17, 17)
    return spatial.permute(0, 2, 3, 1)[..., :7].reshape(len(images_uint8), -1).double().numpy()


def frechet(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance of two samples' Gaussians without a matrix square root of the (singular)
    covariance product: with Σx = AᵀA, Σy = BᵀB (A, B the centred samples over √(n-1)),
    tr √(Σx Σy) is the nuclear norm of A Bᵀ."""
    a = (x - x.mean(0)) / np.sqrt(len(x) - 1)
    b = (y - y.mean(0)) / np.sqrt(len(y) - 1)
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * np.linalg.svd(a @ b.T, compute_uv=False).sum())


def test_sfid_is_the_frechet_distance_of_the_first_7_channels_of_mixed_6_conv(inception_weights):
    generated, real = uint8_images(8, 1), uint8_images(10, 2)
    features = feature_space("unused", str(inception_weights))
    reference = featurize(real, features, reference=True)
    assert reference["spatial"].shape == (10, 7 * 17 * 17) and set(reference) == {"2048", "spatial"}
    found = evaluate_runs(
        {0: generated.float() / 127.5 - 1}, reference, features, kid_subset_size=8, isc_splits=2, prc_neighborhood=3
    )["mean"]
    expected = frechet(spatial_by_hook(inception_weights, generated), spatial_by_hook(inception_weights, real))
    assert found["sfid"] == pytest.approx(expected, rel=1e-3)
    assert found["sfid"] != pytest.approx(found["fid"], rel=1e-2)  # another feature space than pool_3


def test_an_inception_file_of_another_architecture_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "not-inception.pth"
    torch.save(torch.nn.Conv2d(3, 4, 3).state_dict(), path)
    with pytest.raises(ValueError, match=r"eval\.inception_weights: .*not-inception\.pth is not a state dict of"):
        featurize(uint8_images(2, 0), feature_space("unused", str(path)))


def test_clip_score_is_100_times_the_clamped_cosine_with_each_samples_own_prompt(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    folder = save_tiny_clip(tmp_path / "clip")
    prompts = ["a red cat", "a blue dog on a hill", "an old tree"]
    images = uint8_images(7, 3, size=24)
    runs = {0: images.float() / 127.5 - 1}
    found = evaluate_runs(runs, None, None, 2, 2, 3, clip=ClipScorer(folder), prompts=prompts)["mean"]
    model, processor = CLIPModel.from_pretrained(str(folder)).eval(), CLIPProcessor.from_pretrained(str(folder))
    own = [prompts[i % 3] for i in range(7)]
    with torch.no_grad():
        pixels = list(images.permute(0, 2, 3, 1).numpy())
        inputs = processor(text=own, images=pixels, return_tensors="pt", padding=True, truncation=True, max_length=16)
        out = model(**inputs)
    cosine = (out.image_embeds * out.text_embeds).sum(-1)  # both unit-normalised
    assert (cosine < 0).any() and (cosine > 0).any()  # so the clamp matters
    assert found["clip_score"] == pytest.approx(float((100 * cosine.clamp_min(0)).mean()), rel=1e-5)
    assert set(found) == {"clip_score", "num_samples"}  # no feature space: no FID


def test_a_clip_folder_without_a_model_is_refused_naming_the_key(tmp_path):
    folder = save_tiny_clip(tmp_path / "clip")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"eval\.clip_model: .* lacks model weights"):
        ClipScorer(folder)


def test_reference_folders_with_no_images_or_mixed_sizes_are_refused(tmp_path):
    (empty := tmp_path / "empty").mkdir()
    (empty / "notes.txt").write_text("no images")
    with pytest.raises(FileNotFoundError, match=r"eval\.reference_images: .*empty is not a folder of images"):
        reference_images(empty, (8, 8))
    (mixed := tmp_path / "mixed").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(mixed / "b.png")
    with pytest.raises(
        ValueError, match=r"eval\.reference_images: .*mixed holds images of mixed sizes: 8x8 \(a\.png\)"
    ):
        reference_images(mixed, (8, 8))


def test_the_reference_listing_changes_with_the_folders_content(tmp_path):
    (folder := tmp_path / "ref").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    before = reference_listing(folder)
    assert reference_listing(folder) == before and reference_listing(None) == []
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(folder / "b.png")
    assert reference_listing(folder) != before


def test_a_local_model_without_inception_gets_the_paired_metrics_only():
    assert measured_features("local", "unused", None, "/some/folder") is None
    runs = {1: torch.zeros(4, 3, 8, 8)}
    found = evaluate_runs(runs, None, None, 2, 2, 3, fp_runs={1: torch.full((4, 3, 8, 8), 0.1)})
    assert "not computed" in found["features"] and "eval.inception_weights" in found["features"]
    assert set(found["mean"]) == {"num_samples", "paired_mse", "paired_psnr_db"}
    assert found["mean"]["paired_mse"] == pytest.approx(0.01)


@torch.no_grad()
def test_the_guards_features_are_the_classifiers_penultimate_layer_of_each_sample(tmp_path):
    torch.manual_seed(0)
    classifier = DigitClassifier()
    write_tensors(tmp_path / "classifier.safetensors", classifier.state_dict(), {"image_size": 16})
    images = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    found = distance_features(images, feature_space(str(tmp_path / "classifier.safetensors"), None))
    pixels = ((images + 1) * 127.5).round() / 127.5 - 1  # the uint8 codes torch-fidelity is fed
    expected, _ = classifier(pixels)
    assert found.shape == (5, DigitClassifier.feature_dim)
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_the_extractor_is_built_once_per_weights_file_and_again_when_the_file_changes(tmp_path, monkeypatch):
    """The guard featurizes FP and every candidate: one extractor serves them all, but a weights file
    rewritten in place (another classifier) must not be read from the cache."""
    import pipeline.eval.metrics as metrics

    path = tmp_path / "classifier.safetensors"
    built = []
    real = metrics.create_feature_extractor
    monkeypatch.setattr(metrics, "create_feature_extractor", lambda *a, **k: built.append(a) or real(*a, **k))
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    found = []
    for seed in (0, 0, 1):
        if seed == 1 or not path.exists():
            torch.manual_seed(seed)
            write_tensors(path, DigitClassifier().state_dict(), {"image_size": 16})
            os.utime(path, ns=(seed + 1, seed + 1))  # a distinct modification time, whatever the clock's grain
        found.append(distance_features(images, feature_space(str(path), None)))
    assert len(built) == 2
    torch.testing.assert_close(found[0], found[1])
    assert not torch.allclose(found[1], found[2])
