"""Stages killed with SIGKILL: nothing half-written is left at an output path, the next `dvc repro`
redoes the stage cleanly, and les / recon resume from their checkpoints to the same bytes as an
uninterrupted run (the test prints the time lost); les / recon / pts keep every seed's checkpoints until
the whole stage is written."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from helpers import ran_stages, run, set_params
from pipeline.calibration.dump import open_calibration


def start(cmd, cwd) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def wait_until(process: subprocess.Popen, reached, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not reached():
        assert process.poll() is None, f"the process ended before the kill point:\n{process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the kill point was not reached"
        time.sleep(0.02)


def timed(cmd, cwd) -> tuple[float, str]:
    start_time = time.perf_counter()
    output = run(cmd, cwd)
    return time.perf_counter() - start_time, output


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_dump_killed_mid_write_leaves_no_output_and_repro_redoes_it(pipeline_copy):
    repo, artifacts = pipeline_copy, pipeline_copy / "artifacts"
    # a new dump (DVC has no cached result to restore), long enough that the kill lands mid-write
    set_params(repo, {"calib": {"seed": 99, "num_samples": 32}})
    process = start(["dvc", "repro", "--single-item", "dump"], repo)
    wait_until(process, lambda: any(artifacts.glob(".calib.zarr.tmp-*/trajectory")))
    os.killpg(process.pid, signal.SIGKILL)  # dvc and the stage under it
    process.wait()
    assert not (artifacts / "calib.zarr").exists()
    assert list(artifacts.glob(".calib.zarr.tmp-*"))  # what the killed writer left, beside the output path

    assert ran_stages(run(["dvc", "repro", "--single-item", "dump"], repo)) == {"dump"}
    assert (
        open_calibration(artifacts / "calib.zarr").attrs["params"]["calib.seed"] == 99
    )  # complete: matches its manifest
    assert not list(artifacts.glob(".calib.zarr.tmp-*"))  # the next writer removed the dead one's temporary


@pytest.mark.parametrize(
    "stage, params, units, kill_after",
    [
        ("les", {"les": {"iters": 50}}, 49, 20),  # 49 layers, learned by 2 worker processes
        ("recon", {"recon": {"iters": 60}}, 19, 8),  # 19 blocks and stray layers, in order
    ],
)
def test_killed_stage_resumes_to_the_same_bytes(pipeline_copy, stage, params, units, kill_after, record_property):
    repo = pipeline_copy
    set_params(repo, {**params, "quant": {"seeds": [0]}})  # one run: the kill lands in it
    output = repo / {"les": "artifacts/les", "recon": "artifacts/weights"}[stage] / "dmq-w4a6/q0.safetensors"
    checkpoints = repo / f"artifacts/.{stage}.ckpt/dmq-w4a6/q0"
    command = [sys.executable, "-m", f"stages.{stage}", "dmq-w4a6"]

    uninterrupted, _ = timed(command, repo)
    expected = output.read_bytes()
    assert not checkpoints.exists()  # removed once the output is written
    output.unlink()

    started = time.perf_counter()
    process = start(command, repo)
    wait_until(process, lambda: len(list(checkpoints.glob("*/*.safetensors"))) >= kill_after)
    workers = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGKILL)  # the stage process only, as the OOM killer would
    process.wait()
    killed = time.perf_counter() - started
    assert not output.exists()
    saved = len(list(checkpoints.glob("*/*.safetensors")))
    assert kill_after <= saved < units
    deadline = time.monotonic() + 10
    while not all(map(gone, workers)):  # orphaned LES workers notice and exit
        assert time.monotonic() < deadline, "worker processes outlived the killed stage"
        time.sleep(0.1)

    resumed, log = timed(command, repo)
    assert f"resuming: {saved} finished units" in log
    assert output.read_bytes() == expected  # bit-identical to the uninterrupted run
    assert not checkpoints.exists()

    lost = killed + resumed - uninterrupted
    record_property(
        f"{stage}_seconds", {"uninterrupted": uninterrupted, "killed": killed, "resumed": resumed, "lost": lost}
    )
    print(
        f"\n{stage}: uninterrupted {uninterrupted:.1f} s; killed after {saved}/{units} units at {killed:.1f} s, "
        f"resumed in {resumed:.1f} s: {lost:.1f} s lost ({100 * lost / uninterrupted:.0f} %)"
    )


@pytest.mark.parametrize(
    "stage, entry, params",
    [
        # recon keeps its units through the same checkpoint store as pts; its own resume is tested above
        pytest.param("recon", "dmq-w4a6", {"recon": {"iters": 60}}, marks=pytest.mark.slow),
        ("pts", "qdiff-w4a6", {"shared_acts": {"iters": 60}}),  # Q-Diffusion's steps learned on 19 units
    ],
)
def test_a_stage_killed_in_its_third_seed_keeps_the_finished_seeds_units(pipeline_copy, stage, entry, params):
    # dvc repro deletes a stage's outputs before it reruns it, so a finished seed's written output is gone
    # on the rerun: its checkpoints must outlive it. Two workers: seeds 0 and 1 side by side, 2 after one of them
    # (the stages upstream run first for the third seed: the reduced repository has two)
    repo = pipeline_copy
    set_params(repo, {**params, stage: {**params.get(stage, {}), "workers": 2}, "quant": {"seeds": [0, 1, 2]}})
    checkpoints = repo / f"artifacts/.{stage}.ckpt/{entry}"
    command = ["dvc", "repro", f"{stage}@{entry}"]
    process = start(command, repo)
    wait_until(process, lambda: any(checkpoints.glob("q2/*/*.safetensors")))
    os.killpg(process.pid, signal.SIGKILL)  # dvc, the stage and its workers
    process.wait()
    assert 19 in [len(list(checkpoints.glob(f"q{seed}/*/*.safetensors"))) for seed in (0, 1)]

    log = run(command, repo)
    assert "resuming: 19 finished units" in log
    assert not checkpoints.exists()
