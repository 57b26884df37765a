import os
from pathlib import Path

import pytest
import torch

from helpers import copy_repo, init_repo, reduced_params, run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_unet():
    from pipeline.models.embedded import build_unet

    torch.manual_seed(0)
    return build_unet(16, (16, 32, 32), layers_per_block=1, norm_num_groups=8).eval()


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory):
    """(repo, dvc output): the reduced configuration after one full ``dvc repro``. Shared by several
    test files, so never change it: work on a :func:`pipeline_copy`."""
    repo = init_repo(tmp_path_factory.mktemp("reproduced"), reduced_params())
    return repo, run(["dvc", "repro"], repo)


@pytest.fixture
def pipeline_copy(reproduced, tmp_path):
    """A private copy of the reproduced repository."""
    return copy_repo(reproduced[0], tmp_path / "repo")


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A weights file of torch-fidelity's inception-v3-compat architecture with random values (the real
    ones are not shipped): built without its download by standing in an empty state dict."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"), mock.patch("torch.load", return_value={}):
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    torch.manual_seed(0)
    with torch.no_grad():  # batch-norm statistics of a plausible scale, so features are not all zero
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05.pth"
    torch.save(model.state_dict(), path)
    return path
