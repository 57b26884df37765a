"""benchmarks/gpu_check.sh, the GPU check for a lent device, through its plan (`--plan` prints each step and
part with its limit, log and command, and runs nothing): every part in order, within 8 minutes and the 8
files that come back from the device; on the CPU (`--rehearse`) the GPU parts skip after an argument check;
the flags it passes exist in the scripts it calls. The rehearsal itself runs the parts (minutes):
`bash benchmarks/gpu_check.sh --rehearse`."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

SCRIPT = ROOT / "benchmarks/gpu_check.sh"
EIGHT_MINUTES = 480
FILES_BACK = 8  # the device tool brings back at most 8 files from $OUT


def plan(tmp_path, *args, gpus="1") -> list[dict]:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPUS": gpus}
    done = subprocess.run(["bash", str(SCRIPT), "--plan", *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (out / "progress.txt").read_text().startswith(tuple("0123456789"))  # written from the first line
    steps = []
    for line in done.stdout.splitlines():
        if not line.startswith("plan: "):
            continue
        if found := re.match(r"plan: (\w+) ([\w-]+) skip: (.+)$", line):
            steps.append({"kind": found[1], "name": found[2], "skip": found[3]})
        else:
            found = re.match(r"plan: (\w+) ([\w-]+) (\d+)s (\S+) :: (.*)$", line)
            assert found, line
            kind, name, limit, log, command = found.groups()
            steps.append({"kind": kind, "name": name, "limit": int(limit), "log": log, "command": command})
    return steps


def by_name(steps) -> dict:
    return {step["name"]: step for step in steps}


def files_back(steps, out: Path) -> set[str]:
    files = {"progress.txt", "timings.txt"} | {step["log"] for step in steps if "log" in step}
    for step in steps:
        files |= {Path(p).name for p in re.findall(rf"{re.escape(str(out))}/(\S+)", step.get("command", ""))}
    return files


def test_the_scripts_are_valid_bash():
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_on_one_gpu_every_part_runs_in_order_on_cuda_within_8_minutes(tmp_path):
    steps = plan(tmp_path)
    parts = [step for step in steps if step["kind"] == "part"]
    assert [p["name"] for p in parts] == ["scale", "pipeline", "nccl", "dist-1", "dist-2", "bench"]
    step = by_name(steps)
    assert step["dist-2"]["skip"] == "1 GPU(s): NCCL needs one GPU per rank"
    assert all("skip" not in p for p in parts if p["name"] != "dist-2")
    assert "--device cuda" in step["scale"]["command"] and "--device cuda" in step["bench"]["command"]
    assert step["pipeline-repo"]["command"].endswith(" cuda")
    assert "DMQ_DIST_DEVICE=cuda" in step["dist-1"]["command"] and "--nproc_per_node 1" in step["dist-1"]["command"]
    assert "pip install -q --no-index --no-deps" in step["install"]["command"]  # the carried wheels
    # the parts get their whole limits when setup is quick, and the whole fits 8 minutes
    total = int(re.search(r"GPU_CHECK_S:-(\d+)", SCRIPT.read_text())[1])
    assert sum(p["limit"] for p in parts if "limit" in p) < total <= EIGHT_MINUTES
    assert all(s["limit"] < total for s in steps if "limit" in s)
    assert len(files_back(steps, tmp_path / "out")) <= FILES_BACK


def test_with_two_gpus_two_nccl_ranks_run_and_are_compared_with_one(tmp_path):
    step = by_name(plan(tmp_path, gpus="2"))
    assert "DMQ_DIST_DEVICE=cuda" in step["dist-2"]["command"] and "--nproc_per_node 2" in step["dist-2"]["command"]
    outputs = [step[name]["command"].split()[-1] for name in ("dist-1", "dist-2")]
    assert step["dist-compare"]["command"].split()[-2:] == outputs and outputs[0] != outputs[1]
    assert "dist-hashes" not in step


def test_the_rehearsal_skips_each_gpu_part_after_checking_its_arguments(tmp_path):
    steps = plan(tmp_path, "--rehearse", gpus="4")  # a rehearsal is on the CPU, GPUs or not
    names = [s["name"] for s in steps]
    step = by_name(steps)
    for part, check in (("scale", "scale-args"), ("bench", "bench-args")):
        assert step[part]["skip"].startswith("no GPU") and names.index(check) < names.index(part)
        assert step[check]["command"].split(" -c ")[1].startswith("import argparse")
    assert step["dist-2"]["skip"] == "0 GPU(s): NCCL needs one GPU per rank"
    assert step["pipeline-repo"]["command"].endswith(" cpu")
    assert step["pipeline"]["command"].endswith(" sample@dmq-w4a6")  # the DMQ row's stages
    assert "DMQ_DIST_DEVICE=cpu" in step["dist-1"]["command"] and "nccl" in step
    assert "install" not in step and "wheels" in step  # the local install stands in for the wheels
    assert len(files_back(steps, tmp_path / "out")) <= FILES_BACK


@pytest.mark.parametrize("part, script", [("scale", "benchmarks/scale.py"), ("bench", "benchmarks/bench.py")])
def test_the_flags_of_a_part_are_the_scripts_own(tmp_path, part, script):
    command = by_name(plan(tmp_path))[part]["command"]
    source = (ROOT / script).read_text()
    flags = re.findall(r"(?<!\S)--([\w-]+)", command.split(script, 1)[1])
    assert flags
    for flag in flags:
        negated = flag.removeprefix("no-")
        assert f'"--{flag}"' in source or (f'"--{negated}"' in source and "BooleanOptionalAction" in source), flag


def test_bench_children_keep_the_callers_python_path(monkeypatch, tmp_path):
    """On the device the carried packages are on PYTHONPATH (/tmp/site): a bench case's child needs them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    seen = {}

    def fake_run(command, cwd, env, **kwargs):
        seen.update(env)
        return subprocess.CompletedProcess(command, 0, stdout='{"case": "sample"}\n', stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    assert bench.run_case("sample", "default", tmp_path, "cuda", 1) == {"case": "sample"}
    assert seen["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), "/tmp/site"]
