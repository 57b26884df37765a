"""A module run through the fork server behaves as ``python -m`` in a fresh process: the same output,
bytes, arguments and exit status; cold where the server cannot stand in for a fresh process. The
reduced repository of the suite is built through it, and test_reproducibility checks its artifacts
against a cold rerun byte for byte."""

import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import ROOT, ran_stages
from pipeline.infra import forkserver

PROBE = """
    import hashlib, os, sys
    import torch

    torch.manual_seed(0)
    x, w = torch.randn(4, 8, 16, 16), torch.randn(16, 8, 3, 3)
    print(hashlib.sha256(torch.nn.functional.conv2d(x, w, padding=1).numpy().tobytes()).hexdigest())
    print("args", sys.argv[1:], "stage", os.environ.get("DVC_STAGE"), "parent", os.getppid())
    print("to stderr", file=sys.stderr)
    if sys.argv[1] == "raise":
        raise ValueError("the probe failed")
    sys.exit(int(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """A folder with a package whose ``__init__`` hands its ``python -m`` runs over, as ``stages`` does."""
    folder = tmp_path_factory.mktemp("jobs")
    (folder / "pipeline").symlink_to(ROOT / "pipeline")  # importable from the folder, as from a stage's repo
    (folder / "jobs").mkdir()
    (folder / "jobs/__init__.py").write_text(
        "from pipeline.infra.forkserver import hand_over_main_module\n\nhand_over_main_module()\n"
    )
    (folder / "jobs/probe.py").write_text(textwrap.dedent(PROBE))
    return folder


@pytest.fixture(scope="module")
def server(jobs):
    with forkserver.started(jobs, wait=True) as running:
        yield running


def probe(folder, argument, env):
    done = subprocess.run(
        [sys.executable, "-m", "jobs.probe", argument], cwd=folder, env=env, capture_output=True, text=True, timeout=120
    )
    digest, details = done.stdout.splitlines()
    return done.returncode, digest, details.split(" parent ")[0], int(details.split()[-1]), done.stderr


def test_a_forked_run_prints_computes_and_exits_as_a_cold_one(jobs, server):
    env = {**server.env, "DVC_STAGE": "probe@3"}  # a variable DVC sets per stage may differ from the server's
    cold_env = {k: v for k, v in env.items() if k != forkserver.ADDRESS_VARIABLE}
    requested = len(server.requests())
    warm, cold = probe(jobs, "3", env), probe(jobs, "3", cold_env)
    assert server.requests()[requested:] == ["forked jobs.probe 3"]
    assert warm[:3] == cold[:3] == (3, cold[1], "args ['3'] stage probe@3")  # status, bytes, arguments, env
    assert warm[4] == cold[4] == "to stderr\n"
    assert cold[3] == os.getpid() != warm[3]  # the warm run's process is the server's child, not ours


def test_an_uncaught_exception_is_reported_and_fails_the_run(jobs, server):
    status, *_, stderr = probe(jobs, "raise", server.env)
    assert status == 1
    assert stderr.startswith("to stderr\nTraceback") and stderr.endswith("ValueError: the probe failed\n")
    assert server.requests()[-1] == "forked jobs.probe raise"


def test_another_environment_runs_cold_and_says_which_variable(jobs, server):
    status, _, _, parent, _ = probe(jobs, "0", {**server.env, "OMP_NUM_THREADS": "7"})
    assert (status, parent) == (0, os.getpid())
    assert server.requests()[-1] == "cold jobs.probe 0: OMP_NUM_THREADS differs"


def test_a_requester_that_sends_nothing_does_not_stall_the_others(jobs, server):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(server.env[forkserver.ADDRESS_VARIABLE])
        started = time.monotonic()
        status, _, _, parent, _ = probe(jobs, "0", server.env)  # served once the silent one timed out
        assert status == 0 and parent != os.getpid()
        assert time.monotonic() - started < forkserver.REQUEST_TIMEOUT + 30
        assert silent.recv(1) == b""  # the server closed the silent connection


def test_without_a_server_the_module_runs_here(jobs, tmp_path):
    status, _, _, parent, _ = probe(jobs, "0", {**os.environ, forkserver.ADDRESS_VARIABLE: str(tmp_path / "none")})
    assert (status, parent) == (0, os.getpid())


def test_the_suites_reduced_repository_was_built_warm(reproduced):
    # every stage process was forked (the fixture waits for the server), none ran cold
    served = re.findall(r"^fork server: (.*)$", reproduced[1], re.M)
    assert len(served) == len(ran_stages(reproduced[1])) > 20
    assert all(line.startswith("forked stages.") for line in served), served
