"""Two runs with the same seeds give bit-identical artifacts on CPU, and every artifact says in its
header what produced it: the model, the parameters (and their hash) and the seeds among them."""

import json

import pytest
import yaml

from helpers import artifact_hashes, ran_stages, run
from pipeline.infra.machine import cpu_kind
from pipeline.infra.storage import open_store, read_json, read_tensors


def headers(repo):
    artifacts = repo / "artifacts"
    found = {"fp_model": read_json(artifacts / "fp_model/provenance.json")}
    for pattern in ("*.safetensors", "*/*.safetensors", "*/*/*.safetensors"):
        for path in artifacts.glob(pattern):
            if path.parts[len(artifacts.parts)] != "fp_model":  # diffusers' files, with provenance.json beside
                found[path.relative_to(artifacts).as_posix()] = read_tensors(path)[1]
    for pattern in ("*.zarr", "*/*.zarr", "*/*/*.zarr"):
        for path in artifacts.glob(pattern):
            found[path.relative_to(artifacts).as_posix()] = dict(open_store(path).attrs)
    return found


# every kind of stage that learns or draws random numbers, for one row (CI); the whole graph is slow
ONE_ROW = [
    "fp_model",
    "classifier",
    "dump",
    "stats",
    "les@dmq-w4a6",
    "recon@dmq-w4a6",
    "pts@dmq-w4a6",
    "sample@dmq-w4a6",
    "fid@dmq-w4a6",
]


@pytest.mark.parametrize(
    "stages", [pytest.param(ONE_ROW, id="one-row"), pytest.param(None, id="every-stage", marks=pytest.mark.slow)]
)
def test_two_runs_with_the_same_seeds_give_bit_identical_artifacts(reproduced, pipeline_copy, stages):
    first = artifact_hashes(reproduced[0])
    if stages is None:
        stages = run(["dvc", "stage", "list", "--all", "--name-only"], pipeline_copy).split()  # eval_files too
        command = ["dvc", "repro", "--force"]
    else:
        command = ["dvc", "repro", "--force", "--single-item", *stages]
    assert ran_stages(run(command, pipeline_copy)) == set(stages)
    assert artifact_hashes(pipeline_copy) == first


def test_every_artifact_records_model_params_and_seeds(reproduced):
    repo = reproduced[0]
    found = headers(repo)
    # eval_files holds listings of files outside the repository (the reference folder ...), not artifacts
    top = {p.name for p in (repo / "artifacts").iterdir() if not p.name.startswith(".") and p.name != "eval_files"}
    assert {name.split("/")[0] for name in found} == top
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for name, header in found.items():
        assert len(header["params_hash"]) == 16, name
        # the γ = 1 files of a method without LES depend on no params: their seed is the quantization seed
        assert header["seeds"], name
        assert all(header["params"][key] == value for key, value in header["seeds"].items()), name
        if name not in ("fp_model", "classifier.safetensors"):
            assert header["model_hash"] == found["calib.zarr"]["model_hash"], name
    assert found["calib.zarr"]["seeds"] == {"seed": params["seed"], "calib.seed": params["calib"]["seed"]}
    for seed in params["quant"]["seeds"]:  # one artifact per quantization seed, which its header names
        assert found[f"les/dmq-w4a6/q{seed}.safetensors"]["seeds"]["quant.seed"] == seed
        assert found[f"les/qdiff-w4/q{seed}.safetensors"]["seeds"] == {"quant.seed": seed}  # γ = 1: no LES ran
        assert found[f"weights/dmq-w4a6/q{seed}.safetensors"]["seeds"]["quant.seed"] == seed
        assert found[f"act_params/qdiff-w4a6/q{seed}.safetensors"]["seeds"]["quant.seed"] == seed
        samples = found[f"samples/dmq-w4a6/q{seed}.zarr"]
        assert samples["seeds"]["sample.seeds"] == params["sample"]["seeds"] and samples["quant_seed"] == seed
        assert samples["params"]["variant.a_bits"] == 6
    assert found["classifier.safetensors"]["seeds"] == {"classifier.seed": params["classifier"]["seed"]}
    metrics = json.loads((repo / "metrics/dmq-w4a6.json").read_text())["provenance"]
    assert (
        f"sample.seeds={params['sample']['seeds']}" in metrics["seeds"]
        and metrics["model_hash"] == found["calib.zarr"]["model_hash"]
    )
    assert "torch 2.14.1" in metrics["environment"] and "torch threads" in metrics["environment"]
    cpu = f"CPU {cpu_kind()}"
    assert cpu in metrics["environment"]
    for report in ("fp_model.json", "stats.json", "les/dmq-w4a6.json", "recon/dmq-w4a6.json", "pts/dmq-w4a6.json"):
        assert cpu in json.loads((repo / "reports" / report).read_text())["environment"], report


def test_cpu_kind_names_the_model_and_the_flags_that_change_kernels(tmp_path):
    line = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
    (tmp_path / "vnni").write_text(f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480C\n{line}")
    (tmp_path / "avx2").write_text("model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx2\n")
    assert cpu_kind(tmp_path / "vnni") == "Intel(R) Xeon(R) Platinum 8480C (avx2 avx512f avx512_vnni)"
    assert cpu_kind(tmp_path / "avx2") == "AMD EPYC 7B13 (avx2)"
    assert cpu_kind(tmp_path / "missing").endswith("(flags unknown)")
