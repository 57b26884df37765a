"""``dvc repro`` of a reduced configuration (tests/reduced.yaml: four rows, a guard, one peer) in a temporary
copy of the repository: the matrix expands to one stage per entry, and a change to one entry reruns
that entry's stages only."""

import json

import pytest

from helpers import copy_repo, ran_stages, run, set_params, stale_stages

SHARED = {"fp_model", "classifier", "reference", "dump", "stats", "sample_fp", "fid_fp", "report"}
ALWAYS = {"external/dvc.yaml:eval_files"}  # lists the files outside the repository that the metrics read, every run
PER_WEIGHTS = {f"{stage}@{name}" for stage in ("les", "recon") for name in ("qdiff-w4", "dmq-w4a6")}
ROWS = ("qdiff-w4a8", "qdiff-w4a6", "dmq-w4a6", "dmq-no-les-w4a6")
PER_ROW = {f"{stage}@{row}" for stage in ("pts", "sample", "fid") for row in ROWS}
GUARD = "guard@dmq-guard-w4a6"
ALL = SHARED | PER_WEIGHTS | PER_ROW | {GUARD, "peer@quanto-w4a8"} | ALWAYS


@pytest.fixture(scope="module")
def repo(reproduced, tmp_path_factory):
    """A copy of the reproduced repository that this module's tests change step by step."""
    source, output = reproduced
    return copy_repo(source, tmp_path_factory.mktemp("repo")), output


def test_matrix_expands_to_one_stage_per_entry(repo):
    repo, _ = repo
    listed = {line.split()[0] for line in run(["dvc", "stage", "list", "-R", "."], repo).splitlines() if line.strip()}
    assert listed == ALL


def test_repro_runs_every_stage_and_writes_metrics_and_report(repo):
    repo, output = repo
    assert ran_stages(output) == ALL
    for row in ("fp", *ROWS, "dmq-guard-w4a6", "quanto-w4a8"):
        metrics = json.loads((repo / f"metrics/{row}.json").read_text())
        # FP: one run per noise seed; a row: one per quantization seed, each on every noise seed
        runs = [metrics] if row == "fp" else list(metrics["quant_seeds"].values())
        assert row == "fp" or set(metrics["quant_seeds"]) == {"0", "1"}, row
        for found in (one for per_seed in runs for one in per_seed["seeds"].values()):
            assert set(found) >= {"fid", "kid", "isc", "precision", "recall"} and found["num_samples"] == 48, row
            assert found["fid"] >= 0 and (row == "fp" or found["paired_mse"] > 0), row
        assert set(runs[0]["seeds"]) == {"1"}, row
    quant_runs = [json.loads((repo / f"metrics/{row}.json").read_text())["quant_seeds"] for row in ROWS]
    assert all(runs["0"]["mean"]["fid"] != runs["1"]["mean"]["fid"] for runs in quant_runs)  # seeds quantize anew
    guard = json.loads((repo / "reports/guard/dmq-guard-w4a6.json").read_text())
    guarded = json.loads((repo / "metrics/dmq-guard-w4a6.json").read_text())["quant_seeds"]
    for seed, decision in guard["quant_seeds"].items():
        errors = decision["held_out_error"]
        assert decision["kept"] == min(errors, key=errors.get)  # the one closer to FP on held-out noise
        kept = json.loads((repo / f"metrics/{decision['row']}.json").read_text())["quant_seeds"][seed]
        assert guarded[seed]["mean"] == kept["mean"] and guarded[seed]["row"] == decision["row"]
    table = (repo / "reports/paper_table.md").read_text().splitlines()
    assert [line.split(" | ")[:2] for line in table[4:10]] == [
        ["| FP", "32/32"],
        ["| qdiff+attn", "W4A8"],
        ["| optimum-quanto", "W4A8"],
        ["| qdiff+attn", "W4A6"],
        ["| dmq", "W4A6"],
        ["| dmq+guard", "W4A6"],
    ]
    comparisons = (repo / "reports/comparisons.md").read_text()
    assert "| dmq-w4a6 | qdiff-w4a6 |" in comparisons and "| dmq-guard-w4a6 | qdiff-w4a6 |" in comparisons
    assert "| dmq-no-les-w4a6 | dmq-w4a6 |" in comparisons
    for name in ("fid_vs_activation_bits", "samples_by_method", "stats_outlier_heatmap", "les_effect_vs_outlier_ratio"):
        assert (repo / f"reports/figures/{name}.png").stat().st_size > 0


def test_every_store_keeps_its_chunks_beside_its_arrays_metadata(repo):
    """Flat chunk keys (``c.0.0``): no directory per chunk dimension for DVC to walk on every run."""
    repo, _ = repo
    stores = list((repo / "artifacts").rglob("*.zarr"))
    assert {store.name for store in stores} >= {"calib.zarr", "stats.zarr"}
    nested = [path for store in stores for path in store.rglob("c") if path.is_dir()]
    assert not nested, nested[:3]
    x0 = repo / "artifacts/calib.zarr/trajectory/x0"
    assert [path.name for path in x0.iterdir() if path.name != "zarr.json"] == ["c.0.0.0.0"]


def test_nothing_changed_reruns_nothing(repo):
    """eval_files runs every time; its listing comes out unchanged, so the reference features and the
    metrics are not recomputed."""
    repo, _ = repo
    assert stale_stages(repo) == ALWAYS
    assert ran_stages(run(["dvc", "repro"], repo)) == ALWAYS


def test_a_damaged_store_is_restored_without_rerunning_its_readers(repo):
    """Readers depend on the store's zarr.json, whose manifest hashes every chunk (walking the store's
    thousand files for each of ~40 readers made a no-op `dvc repro` cost 10 s): DVC sees the damage
    as a changed output of dump and restores it, and the readers' dependency is unchanged."""
    repo, _ = repo
    chunk = max((repo / "artifacts/calib.zarr").rglob("c.*"), key=lambda p: p.stat().st_size)
    intact = chunk.read_bytes()
    chunk.write_bytes(intact[:100])
    assert stale_stages(repo) == {"dump"} | ALWAYS
    assert ran_stages(run(["dvc", "repro"], repo)) <= {"dump"} | ALWAYS
    assert chunk.read_bytes() == intact
    assert stale_stages(repo) == ALWAYS


# `dvc status` lists the stages whose own deps changed; `dvc repro` also runs the stages downstream
# whose inputs then change.
def test_a_rows_activation_bits_rerun_that_row_only_not_its_shared_weights(repo):
    repo, _ = repo
    set_params(repo, {"rows": {"qdiff-w4a6": {"a_bits": 5}}})
    assert stale_stages(repo) == {"pts@qdiff-w4a6"} | ALWAYS
    assert ran_stages(run(["dvc", "repro"], repo)) == ALWAYS | {
        "pts@qdiff-w4a6",
        "sample@qdiff-w4a6",
        "fid@qdiff-w4a6",
        "report",
    }


SHARED_WEIGHTS_CHANGE = {"weights": {"qdiff-w4": {"method": "qdiff-steps"}}}  # w_bits would break the guard's pair
SHARING = ("qdiff-w4a8", "qdiff-w4a6", "dmq-no-les-w4a6")


@pytest.mark.slow  # 11 stages: the longest rerun of the reduced repository (2:45 on a 2-core AVX2 machine)
def test_a_weights_entry_reruns_the_rows_that_share_it(repo):
    repo, _ = repo
    set_params(repo, SHARED_WEIGHTS_CHANGE)
    ran = ran_stages(run(["dvc", "repro"], repo))
    # the qdiff rows take the entry's new method; dmq-no-les names its own, and the weights' values are the
    # same (qdiff-steps shares qdiff's switches), so its activation parameters and samples come out
    # byte-identical: its metrics and the guard do not rerun
    rows = {f"{stage}@{row}" for stage in ("pts", "sample") for row in SHARING} | {"fid@qdiff-w4a8", "fid@qdiff-w4a6"}
    assert ran == {"les@qdiff-w4", "recon@qdiff-w4", *rows, "report"} | ALWAYS
