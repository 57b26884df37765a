"""Predicted against measured memory and disk per stage, on the real topologies at reduced width.

    python benchmarks/scale.py [--divisors 8 4 2] [--json benchmarks/scale.json]

Stable Diffusion v1's UNet (4 levels, 2 layers a block, cross-attention transformers with GEGLU
feed-forwards, classifier-free guidance) and LDM-4's (4 levels, self-attention) are built from their
published configs with every channel width divided by each divisor, random weights, 16x16 latents and
tiny text encoders / autoencoders, saved as local model folders (pipeline/models/local.py) and taken
through the stage scripts with small iteration counts and a small capture budget, so that captures
spill to host memory and scratch files as they would at full size. Each stage runs in its own
process; its peak resident memory is read by GNU time (`/usr/bin/time`), and its outputs' bytes on disk
are counted. Predicted: :func:`pipeline.resources.stage_costs` from the model's shapes on the meta
device, plus the process baseline as `cli.py doctor` measures it (the interpreter, torch, diffusers,
the model's classes: the peak of a process that imported the stage's modules and predicted), and
:func:`pipeline.preflight.store_sizes` for the stores. On a CPU every byte is host memory: a stage's
figure is its device and host predictions added up. With ``--device cuda`` the stages run on the GPU
(`device: cuda`) and each stage's peak of CUDA memory (``torch.cuda.max_memory_allocated``: the tensors,
not CUDA's context nor the allocator's reserve) is set against the device prediction too.

    python benchmarks/scale.py --device cuda --divisors 4 2 --json scale_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import yaml  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel, VQModel  # noqa: E402

from benchmarks.topologies import (  # noqa: E402
    LDM4_AUTOENCODER,
    LDM4_UNET,
    SD_V1_AUTOENCODER,
    SD_V1_TEXT_ENCODER,
    SD_V1_UNET,
)
from helpers import init_repo, reduced_params  # noqa: E402
from pipeline.models.diffusion import unet_skeleton  # noqa: E402
from pipeline.params import load_config  # noqa: E402
from pipeline.preflight import store_sizes, text_length  # noqa: E402
from pipeline.resources import stage_costs  # noqa: E402
from tiny_models import save_tiny_model, write_prompts  # noqa: E402

LATENT = 16  # latent side: the real models' 64 divided by 4
# the process baseline as `cli.py doctor` measures it: its own peak after predicting, in a process that
# imported the stage's modules
BASELINE = (
    "import stages.{stage}; from pipeline.params import load_config; "
    "from pipeline.preflight import memory, process_baseline; memory(load_config()); print(process_baseline())"
)
# a stage run as ``python -c CUDA_PEAK FILE stages.NAME ARGS``: at its exit, its peak of CUDA memory
# written to FILE (the stage scripts stay as they are)
CUDA_PEAK = (
    "import atexit, runpy, sys, torch; path = sys.argv.pop(1); "
    "atexit.register(lambda: open(path, 'w').write(str(torch.cuda.max_memory_allocated()))); "
    "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
)
ENTRY, ROW = "dmq-w4a8", "dmq-w4a8"
# Q-Diffusion's row as the table runs it: AdaRound, the shared steps initialised and learned, the attention
# matmuls quantized (pts and sample run the unfused attention)
QDIFF_ENTRY, QDIFF_ROW = "qdiff-w4", "qdiff-w4a8"
QDIFF = {
    "shared_acts": {"init_records": 8, "iters": 5, "records": 8, "batch_size": 4},
    "weights": {QDIFF_ENTRY: {"method": "qdiff", "w_bits": 4}},
    "rows": {QDIFF_ROW: {"weights": QDIFF_ENTRY, "a_bits": 8}},
    "report": {"table": [QDIFF_ROW], "ablation": []},
}
OVERRIDES = {"dmq": None, "qdiff": QDIFF}  # each method's params beyond PARAMS
STAGES = {
    "dmq": ("dump", "stats", f"les {ENTRY}", f"recon {ENTRY}", f"pts {ROW}", f"sample {ROW}"),
    "qdiff": ("dump", "stats", f"les {QDIFF_ENTRY}", f"recon {QDIFF_ENTRY}", f"pts {QDIFF_ROW}", f"sample {QDIFF_ROW}"),
}
PARAMS = {  # small iteration counts; a capture budget small enough that captures spill at every width
    "diffusion": {"steps": 4},
    "calib": {"num_samples": 8, "layer_records_per_step": 2, "batch_size": 4, "layer_io_gb": 0.5},
    "capture": {"device_gb": 0.02, "host_gb": 0.05, "batch_size": 4},
    "les": {"iters": 5, "batch_size": 4, "workers": 1},
    "recon": {"iters": 5, "batch_size": 4, "records": 8},
    "pts": {"calib_records": 4, "batch_size": 4},
    "sample": {"num_samples": 8, "batch_size": 4, "seeds": [1]},
    "quant": {"seeds": [0]},
    "weights": {ENTRY: {"method": "dmq", "w_bits": 4, "a_bits": 8}},
    "rows": {ROW: {"weights": ENTRY, "a_bits": 8}},
    "guards": {},
    "peers": {},
    "report": {"table": [ROW], "ablation": []},
}


def model_folder(topology: str, divisor: int, folder: Path) -> Path:
    """A local model folder: the topology's UNet at 1/divisor of its widths, random weights."""
    torch.manual_seed(divisor)
    if topology == "sd-v1":
        from transformers import CLIPTextConfig, CLIPTextModel

        save_tiny_model("text", folder)
        cross = SD_V1_UNET["cross_attention_dim"] // divisor
        config = json.loads((folder / "text_encoder/config.json").read_text())
        text = {k: config[k] for k in ("vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id")}
        sizes = dict(hidden_size=cross, intermediate_size=2 * cross, num_hidden_layers=1, num_attention_heads=2)
        CLIPTextModel(CLIPTextConfig(**sizes, **text)).save_pretrained(folder / "text_encoder")
        unet = UNet2DConditionModel(
            sample_size=LATENT,
            block_out_channels=tuple(c // divisor for c in SD_V1_UNET["block_out_channels"]),
            cross_attention_dim=cross,
            attention_head_dim=SD_V1_UNET["attention_head_dim"],
            norm_num_groups=SD_V1_UNET["norm_num_groups"] // divisor,
        )
    else:
        save_tiny_model("latent", folder)
        unet = UNet2DModel(
            **{
                **LDM4_UNET,
                "sample_size": LATENT,
                "block_out_channels": tuple(c // divisor for c in LDM4_UNET["block_out_channels"]),
                "attention_head_dim": LDM4_UNET["attention_head_dim"] // divisor,
                "norm_num_groups": LDM4_UNET["norm_num_groups"] // divisor,
            },
        )
    unet.save_pretrained(folder / "unet")
    return folder


def run_measured(command: list[str], cwd: Path) -> tuple[int, float]:
    """Peak resident bytes and wall seconds of ``command`` run as its own process. GNU time reports the
    peak: a child forked from this process would inherit this process's own peak in its accounting
    (Linux carries ``maxrss`` across exec), and this process holds the models it built."""
    start = time.perf_counter()
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as peak, open(cwd / "stage.log", "a") as log:
        done = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", peak.name, *command], cwd=cwd, stdout=log, stderr=subprocess.STDOUT
        )
        if done.returncode:  # the log's end in the message: the work folder goes with the exception
            tail = (cwd / "stage.log").read_text()[-3000:]
            raise RuntimeError(f"{' '.join(command)} failed in {cwd}; the end of its log:\n{tail}")
        return int(peak.read().split()[-1]) * 1024, time.perf_counter() - start


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def topology_repo(topology: str, divisor: int, work: Path, overrides: dict | None = None, device: str = "cpu") -> Path:
    """A repository of the stage scripts whose params take ``topology`` at 1/``divisor`` width through
    the stages with small budgets (:data:`PARAMS`, then ``overrides``) on ``device``."""
    folder = model_folder(topology, divisor, work / "model")
    repo = init_repo(work / "repo", reduced_params())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update(source="local", path=str(folder))
    params["device"] = device
    for section, values in {**PARAMS, **(overrides or {})}.items():  # the matrix replaced, the rest merged
        matrix = section in ("weights", "rows", "guards", "peers", "report")
        params[section] = values if matrix else {**params.get(section, {}), **values}
    if topology == "sd-v1":
        prompts = str(write_prompts(work / "prompts.txt"))
        params["calib"]["prompts"] = params["sample"]["prompts"] = prompts
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


def predictions(repo: Path) -> tuple[dict, dict, int]:
    """Per stage the predicted costs, the predicted store sizes and the UNet's parameter count."""
    cwd = Path.cwd()
    os.chdir(repo)
    try:
        cfg = load_config("params.yaml")
        unet = unet_skeleton(cfg.model)
        costs = {c.stage: c for c in stage_costs(cfg, unet, text_length(cfg.model))}
        return costs, store_sizes(cfg), sum(p.numel() for p in unet.parameters())
    finally:
        os.chdir(cwd)


def process_baseline(stage: str, repo: Path) -> int:
    """Peak resident bytes of a process that imports ``stage``'s modules and predicts as `cli.py doctor`
    does (its own peak is the baseline doctor adds to its predictions)."""
    command = [sys.executable, "-c", BASELINE.format(stage=stage)]
    return int(subprocess.run(command, cwd=repo, capture_output=True, text=True, check=True).stdout.split()[-1])


def repredict(run: dict, work: Path) -> None:
    """Predict a recorded run again with this checkout's code, the process baselines measured again
    (the stages' peaks stay as measured): the model folder and params are rebuilt as the run had them
    (seeded, deterministic)."""
    device = run.get("device", "cpu")
    repo = topology_repo(run["topology"], run["divisor"], work, OVERRIDES[run.get("method", "dmq")], device)
    predicted, stores, _ = predictions(repo)
    for name, row in run["stages"].items():
        if name == "stores":
            for store, sizes in row.items():
                sizes["predicted"] = stores[store]
            continue
        row["process_baseline"] = process_baseline(name, repo)
        add_predictions(row, predicted[name], device == "cuda")


def add_predictions(row: dict, cost, cuda: bool) -> None:
    """A measured stage's row gets its predictions and their ratios to the measurements."""
    row["predicted_peak_rss"] = row["process_baseline"] + cost.host_peak(cuda=cuda)
    row["ratio"] = row["predicted_peak_rss"] / row["measured_peak_rss"]
    if cuda:  # a stage that never touched the GPU (qdiff's les: γ = 1) measures a peak of 0: no ratio
        measured = row["measured_cuda_peak"]
        row["predicted_device"], row["device_ratio"] = cost.device, cost.device / measured if measured else None
    row["predicted_scratch_bytes"], row["detail"] = cost.disk, cost.detail


def measure(topology: str, divisor: int, work: Path, device: str = "cpu", method: str = "dmq") -> dict:
    cuda = device == "cuda"
    repo = topology_repo(topology, divisor, work, OVERRIDES[method], device)
    predicted, stores, parameters = predictions(repo)
    run_measured([sys.executable, "-m", "stages.fp_model"], repo)
    rows = {}
    for stage in STAGES[method]:
        name, *entry = stage.split()
        baseline = process_baseline(name, repo)
        before = du(repo / "artifacts")
        cuda_peak_file = work / f"{name}.cuda_peak"
        launch = ["-c", CUDA_PEAK, str(cuda_peak_file)] if cuda else ["-m"]
        peak, seconds = run_measured([sys.executable, *launch, f"stages.{name}", *entry], repo)
        row = rows[name] = {
            "measured_peak_rss": peak,
            "process_baseline": baseline,
            "measured_outputs_bytes": du(repo / "artifacts") - before,
            "seconds": round(seconds, 1),
        }
        if cuda:
            row["measured_cuda_peak"] = int(cuda_peak_file.read_text())
        add_predictions(row, predicted[name], cuda)
        on_gpu = (
            f", GPU measured {row['measured_cuda_peak'] / 2**20:.0f} MiB, predicted "
            f"{row['predicted_device'] / 2**20:.0f} MiB"
            if cuda
            else ""
        )
        print(
            f"{topology} /{divisor} {method} {name:7s} measured {peak / 2**20:8.0f} MiB, predicted "
            f"{row['predicted_peak_rss'] / 2**20:8.0f} MiB ({row['ratio']:.2f}x){on_gpu}, {seconds:.0f} s",
            flush=True,
        )
    rows["stores"] = {
        "calib.zarr": {"predicted": stores["calib.zarr"], "measured": du(repo / "artifacts/calib.zarr")},
        "stats.zarr": {"predicted": stores["stats.zarr"], "measured": du(repo / "artifacts/stats.zarr")},
    }
    return {
        "topology": topology,
        "divisor": divisor,
        "device": device,
        "method": method,
        "parameters": parameters,
        "stages": rows,
    }


def config_folder(topology: str, folder: Path) -> Path:
    """The full-width model as a local model folder for predictions only: the tiny model's layout with
    the real UNet's, text encoder's and autoencoder's configs and empty weights files (nothing reads
    weights to predict)."""
    save_tiny_model("text" if topology == "sd-v1" else "latent", folder)
    with torch.device("meta"):
        if topology == "sd-v1":
            from transformers import CLIPTextConfig

            UNet2DConditionModel(**SD_V1_UNET).save_config(folder / "unet")
            AutoencoderKL(**SD_V1_AUTOENCODER).save_config(folder / "vae")
            CLIPTextConfig(**SD_V1_TEXT_ENCODER).to_json_file(folder / "text_encoder/config.json")
            tokenizer = folder / "tokenizer/tokenizer_config.json"
            tokenizer.write_text(json.dumps({**json.loads(tokenizer.read_text()), "model_max_length": 77}))
        else:
            UNet2DModel(**LDM4_UNET).save_config(folder / "unet")
            VQModel(**LDM4_AUTOENCODER).save_config(folder / "vqvae")
    for weights in folder.rglob("*.safetensors"):
        weights.write_bytes(b"")
    return folder


def docs_params(heading: str) -> dict:
    """The params block under ``heading`` in docs/real-models.md, without the files it names."""
    text = (ROOT / "docs/real-models.md").read_text()
    block = text[text.index(heading) :].split("```yaml\n", 1)[1].split("```", 1)[0]
    params = yaml.safe_load(block)
    params.pop("eval", None)
    return params


def predicted_at_full_width(topology: str, params: dict, gpu_gb: float, work: Path) -> list[str]:
    """`cli.py doctor --gpu-gb N --host-gb 64` on the full-width topology with ``params`` (the docs')."""
    folder = config_folder(topology, work / "model")
    repo = init_repo(work / "repo")
    params = {**params, "model": {"source": "local", "path": str(folder)}}
    if topology == "sd-v1":
        prompts = str(write_prompts(work / "prompts.txt"))
        params["calib"] = {**params["calib"], "prompts": prompts}
        params["sample"] = {**params["sample"], "prompts": prompts}
    (repo / "params.yaml").write_text(yaml.safe_dump({**yaml.safe_load((repo / "params.yaml").read_text()), **params}))
    out = subprocess.run(
        [sys.executable, "cli.py", "doctor", "--gpu-gb", str(gpu_gb), "--host-gb", "64"],
        cwd=repo,
        capture_output=True,
        text=True,
    ).stdout
    return [line.strip() for line in out.splitlines() if "predicted peak" in line]


def full_width() -> dict[str, list[str]]:
    """Both topologies at full width with the docs' params, predicted for a 24 GB GPU."""
    full = {}
    for topology, heading in (("sd-v1", "## Stable Diffusion v1.4"), ("ldm-4", "## LSUN bedrooms, LDM-4")):
        with tempfile.TemporaryDirectory(prefix="scale-") as work:
            full[topology] = predicted_at_full_width(topology, docs_params(heading), 24, Path(work))
        print("\n".join(full[topology]), flush=True)
    return full


def label(run: dict, stage: str) -> str:
    """The stage, with the row's method where it is not DMQ's."""
    method = run.get("method", "dmq")
    return stage if method == "dmq" else f"{stage} ({method})"


def tables(summary: dict) -> str:
    """The measured-against-predicted table and the full-width predictions, in markdown."""
    mib = 2**20
    lines = [
        "| topology | width | parameters | stage | measured peak | predicted | predicted / measured |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for run in summary["runs"]:
        for stage, row in run["stages"].items():
            if stage != "stores":
                lines.append(
                    f"| {run['topology']} | 1/{run['divisor']} | {run['parameters'] / 1e6:.1f} M | {label(run, stage)} "
                    f"| {row['measured_peak_rss'] / mib:,.0f} MiB | {row['predicted_peak_rss'] / mib:,.0f} MiB "
                    f"| {row['ratio']:.2f} |"
                )
    on_gpu = [
        (run, stage, row)
        for run in summary["runs"]
        for stage, row in run["stages"].items()
        if "measured_cuda_peak" in row
    ]
    if on_gpu:
        lines += [
            "",
            "| topology | width | stage | measured GPU peak | predicted | predicted / measured |",
            "|---|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {run['topology']} | 1/{run['divisor']} | {label(run, stage)} "
            f"| {row['measured_cuda_peak'] / mib:,.0f} MiB | {row['predicted_device'] / mib:,.0f} MiB "
            + ("| – (no GPU use) |" if row["device_ratio"] is None else f"| {row['device_ratio']:.2f} |")
            for run, stage, row in on_gpu
        ]
    lines += [
        "",
        "| topology | width | store | measured on disk | predicted (uncompressed) | ratio |",
        "|---|---|---|---:|---:|---:|",
    ]
    for run in summary["runs"]:
        for store, row in run["stages"]["stores"].items():
            lines.append(
                f"| {run['topology']} | 1/{run['divisor']} | {store} | {row['measured'] / mib:,.1f} MiB "
                f"| {row['predicted'] / mib:,.1f} MiB | {row['predicted'] / row['measured']:.2f} |"
            )
    lines += ["", "| stage | SD v1.4: GPU | host | LDM-4: GPU | host |", "|---|---:|---:|---:|---:|"]
    parsed = {
        topology: {
            line.split("predicted peak of ")[1].split(":")[0]: re.findall(r"(GPU|host) ([\d.]+) GiB of", line)
            for line in found
        }
        for topology, found in summary["full_width_docs_params_24gb"].items()
    }
    for stage in parsed.get("sd-v1", {}):
        cells = [f"{value} GiB" for topology in ("sd-v1", "ldm-4") for _, value in parsed[topology].get(stage, [])]
        lines.append(f"| {stage} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--divisors", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--topologies", nargs="+", default=["sd-v1", "ldm-4"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the stages run")
    parser.add_argument("--methods", nargs="+", choices=list(STAGES), default=["dmq"], help="one row of each")
    parser.add_argument(
        "--full-width",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also predict both topologies at full width with the docs' params",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tables", type=Path, help="print the tables of a results file and exit")
    parser.add_argument("--repredict", type=Path, help="predict a results file's runs again with this code")
    args = parser.parse_args()
    if args.tables:
        print(tables(json.loads(args.tables.read_text())))
        return
    if args.repredict:
        summary = json.loads(args.repredict.read_text())
        for run in summary["runs"]:
            with tempfile.TemporaryDirectory(prefix="scale-") as work:
                repredict(run, Path(work))
        summary["full_width_docs_params_24gb"] = full_width()
        args.repredict.write_text(json.dumps(summary, indent=1) + "\n")
        return
    results, full = [], {}

    def write() -> None:  # after every run, so that a long benchmark cut short keeps what it measured
        if args.json:
            summary = {"latent": LATENT, "params": PARAMS, "runs": results, "full_width_docs_params_24gb": full}
            args.json.write_text(json.dumps(summary, indent=1) + "\n")

    for topology in args.topologies:
        for divisor in sorted(args.divisors, reverse=True):
            for method in args.methods:
                with tempfile.TemporaryDirectory(prefix="scale-") as work:
                    results.append(measure(topology, divisor, Path(work), args.device, method))
                write()
    if args.full_width:
        full.update(full_width())
        write()


if __name__ == "__main__":
    main()
