import os
import subprocess
import sys

import pytest

from helpers import ROOT
from pipeline.infra import allocator

# Forward passes on batch-250 activations (8 MiB each): one to warm up, then the page faults of five more.
FORWARD = """
import resource, sys, torch
from pipeline.infra.allocator import keep_freed_memory
applied = sys.argv[1] == "keep" and keep_freed_memory()
net = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.SiLU())])
x = torch.randn(250, 32, 16, 16)
with torch.no_grad():
    net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        net(x)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[bool, int]:
    env = {key: value for key, value in os.environ.items() if key != "DMQ_KEEP_FREED_MEMORY"}
    found = subprocess.run(
        [sys.executable, "-c", FORWARD, mode], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    applied, faults = found.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not allocator.uses_glibc(), reason="glibc's malloc only")
def test_kept_memory_spares_the_page_faults_of_each_forward_pass():
    kept, kept_faults = _faults("keep")
    assert kept
    _, default_faults = _faults("default")
    # glibc's defaults hand the activations' pages back and fault them in again on every pass
    assert default_faults > 2000 and kept_faults < default_faults / 10, (kept_faults, default_faults)


def test_other_c_libraries_and_an_opt_out_are_left_alone(monkeypatch):
    monkeypatch.setenv("DMQ_KEEP_FREED_MEMORY", "0")
    assert allocator.keep_freed_memory() is False
    monkeypatch.delenv("DMQ_KEEP_FREED_MEMORY")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
