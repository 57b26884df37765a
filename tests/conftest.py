import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_unet():
    from pipeline.models import build_unet

    torch.manual_seed(0)
    return build_unet(16, (16, 32, 32), layers_per_block=1, norm_num_groups=8).eval()
