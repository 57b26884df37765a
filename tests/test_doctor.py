"""`cli.py doctor`: what it checks, and that a problem makes it fail."""

import shutil

import torch
import yaml
import zarr
from typer.testing import CliRunner

from cli import app
from helpers import ROOT
from pipeline.infra.machine import cpu_kind
from pipeline.params import load_config
from pipeline.preflight import store_sizes, store_summary


def doctor(params, artifacts):
    return CliRunner().invoke(app, ["doctor", "--params", str(params), "--artifacts", str(artifacts)])


def test_reports_versions_threads_cpu_model_and_disk(tmp_path):
    result = doctor(ROOT / "params.yaml", tmp_path / "artifacts")
    for line in (
        "torch: 2.",
        "zarr: 3.",
        "dvc: 3.",
        "torch threads: ",
        f"cpu: {cpu_kind()}; results reproduce bit for bit on the same CPU kind",
        "model: embedded default",
        "disk space: ",
        " stores up to ",
        "(largest: calib.zarr ",
    ):
        assert line in result.output
    disk = next(line for line in result.output.splitlines() if "disk space: " in line)
    assert len(disk) < 300  # one line on one screen, not ~150 store names
    assert "params: " in result.output and "is valid" in result.output


def test_problems_are_listed_and_fail(tmp_path, monkeypatch):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(source="local", path=str(tmp_path / "missing"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = doctor(tmp_path / "params.yaml", tmp_path)
    assert result.exit_code == 1
    assert (
        f"PROBLEM  params: invalid parameters in {tmp_path / 'params.yaml'}:   model.path: {tmp_path / 'missing'} "
        "does not exist" in result.output
    )

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4096)
    result = doctor(ROOT / "params.yaml", tmp_path)
    assert result.exit_code == 1
    assert "PROBLEM  torch threads: 4096 intra-op threads" in result.output
    assert "PROBLEM  disk space: " in result.output and "1000 B free" in result.output and "not enough" in result.output


def test_store_sizes_are_the_uncompressed_sizes_of_the_real_stores(reproduced):
    repo = reproduced[0]
    expected = store_sizes(load_config(repo / "params.yaml"))

    def nbytes(group):
        return sum(node.nbytes for _, node in group.members(max_depth=None) if isinstance(node, zarr.Array))

    assert {
        "calib.zarr",
        "stats.zarr",
        "votes/dmq-w4a6/q1.zarr",
        "samples/fp.zarr",
        "samples/quanto-w4a8/q0.zarr",
    } <= set(expected)
    for name, size in expected.items():
        store = zarr.open_group(str(repo / "artifacts" / name), mode="r")
        assert size == nbytes(store), name


def test_outputs_are_not_stored_twice(reproduced):
    """The project's DVC cache links workspace outputs to the cache (.dvc/config cache.type) instead of
    copying them: counted by inode, workspace and cache together hold the artifacts once."""
    repo = reproduced[0]
    files = [p for p in (repo / "artifacts/calib.zarr").rglob("*") if p.is_file()]
    linked = {p.read_bytes() for p in files if p.stat().st_nlink >= 2}
    # DVC links a file when it moves it into the cache; a file whose content the cache already holds
    # (to_q / to_k / to_v share one input, many zarr.json are alike) stays a copy until `dvc checkout`
    assert linked and all(p.read_bytes() in linked for p in files if p.stat().st_nlink == 1)
    sizes = {}
    for folder in ("artifacts", ".dvc/cache"):
        for p in (repo / folder).rglob("*"):
            if p.is_file():
                sizes[p.stat().st_ino] = p.stat().st_size
    artifacts = sum(p.stat().st_size for p in (repo / "artifacts").rglob("*") if p.is_file())
    assert sum(sizes.values()) < 1.1 * artifacts


def test_the_disk_line_counts_the_stores_and_names_the_largest():
    sizes = {"calib.zarr": 3 << 30, "stats.zarr": 1 << 10, **{f"samples/r{i}/q0.zarr": 1 << 20 for i in range(150)}}
    line = store_summary(sizes)
    assert line.startswith("152 stores up to 3.1 GB (largest: calib.zarr 3.0 GB, samples/r0/q0.zarr 1.0 MB,")
    assert line.count(",") == 2
