import os

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
