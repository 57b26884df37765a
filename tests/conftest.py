import os
import shutil
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from helpers import copy_repo, init_repo, reduced_params, run
from pipeline.infra import forkserver
from pipeline.infra.allocator import keep_freed_memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    """pytest-xdist workers share the cores: each worker, and the stage processes it starts (through
    OMP_NUM_THREADS), gets its share, since oversubscribed torch threads spin against each other."""
    workers, threads = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), torch.get_num_threads()
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(min(2, threads))
    keep_freed_memory()  # as the stage processes the tests start do


# The files that use the reproduced repository longest, longest first.
LONGEST_ON_THE_REPRODUCED_REPO = ("test_dvc_pipeline.py", "test_interruption.py", "test_reproducibility.py")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``--dist loadfile``, files handed out in this order) the files that need the
    reproduced repository wait for the worker that builds it: the longest of them comes first, so that
    worker builds it and goes on with that file, then the files that do not need it, for the other
    workers meanwhile, then the rest, the next longest first."""
    needs = {item.path for item in items if "reproduced" in item.fixturenames}
    first, *next_longest = LONGEST_ON_THE_REPRODUCED_REPO

    def rank(item):
        if item.path.name == first:
            return 0
        if item.path not in needs:
            return 1
        return 2 if item.path.name in next_longest else 3

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture
def tiny_unet():
    from pipeline.models.embedded import build_unet

    torch.manual_seed(0)
    return build_unet(16, (16, 32, 32), layers_per_block=1, norm_num_groups=8).eval()


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory):
    """(repo, dvc output): the reduced configuration after one full ``dvc repro``, its stages forked from
    a warm server as under ``cli.py run`` (the output ends with the server's log). Shared by several
    test files, so never change it: work on a :func:`pipeline_copy`. Built once per test run: under
    pytest-xdist the first worker to need it builds it in the run's shared folder, holding a file
    lock that the other workers wait on."""
    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent
    repo, log = shared / "reproduced", shared / "reproduced.log"
    with FileLock(shared / "reproduced.lock"):
        if not log.exists():
            shutil.rmtree(repo, ignore_errors=True)  # a build that failed in another worker
            repo.mkdir()
            init_repo(repo, reduced_params())
            with forkserver.started(repo, wait=True) as server:  # as `cli.py run` does
                output = run(["dvc", "repro"], repo, server.env)
                output += "".join(f"fork server: {line}\n" for line in server.requests())
            log.write_text(output)
    return repo, log.read_text()


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
