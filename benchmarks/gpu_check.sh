#!/usr/bin/env bash
out=${OUT:-/tmp/gpu_check} && mkdir -p "$out" && echo "$(date -u +%FT%TZ) gpu_check.sh $* started" >"$out/progress.txt"
# The GPU check: one prepared command for a lent GPU machine (one GPU, no registry, 15 minutes of device
# time all told), within 8 minutes (GPU_CHECK_S, 470 s): each setup step and each part under its own
# `timeout`, cut further to what is left of the whole, with a line before and after it in
# $OUT/progress.txt (from the first second) and its wall time in $OUT/timings.txt, so that one that
# fails or hangs leaves the others their time.
#
#   bash benchmarks/gpu_check.sh              # on the device, the call carrying [".whl"]
#   bash benchmarks/gpu_check.sh --rehearse   # (or REHEARSE=1) on a CPU: every part that needs no GPU
#   bash benchmarks/gpu_check.sh --plan       # (or PLAN=1; with --rehearse too) prints the plan, runs nothing
#
# Setup: the image's Python (the one that imports torch: the device's torch 2.11, not our 2.14.1 pin),
# commands `python`, `dvc` and `torchrun` for it, /usr/bin/time if missing (scale.py reads peaks with it),
# the wheels of benchmarks/gpu_wheels.sh installed into /tmp/site (or, with no .whl/ and the packages
# missing, pyproject's dependencies less torch from a registry), an import of every package and stage
# module with versions, `pip check`, and the GPU's facts (nvidia-smi, torch.cuda, the TF32 and
# determinism flags, a convolution's float32 error on the GPU against the CPU with the default flags and
# with TF32 off). Parts:
#   scale       benchmarks/scale.py --device cuda: Stable Diffusion v1's UNet at 1/4 width, DMQ's row then
#               Q-Diffusion's, each stage's peak of CUDA memory against pipeline/resources.py's prediction;
#   pipeline    the reduced pipeline of the tests (tests/reduced.yaml) with `device: cuda` in a scratch DVC
#               repository, its log timestamped line by line, then its metrics;
#   nccl        a one-rank NCCL group (all_reduce, all_gather_object, barrier): with WORLD_SIZE=1
#               pipeline.infra.distributed.init joins no group, so dist_job alone would not touch NCCL;
#   dist-1      tests/dist_job.py under torchrun, one rank, DMQ_DIST_DEVICE=cuda (dump, sample, LES);
#   dist-2      the same with 2 ranks (NCCL), compared with the one-rank outputs: only with 2 GPUs;
#   bench       benchmarks/bench.py --device cuda on the default UNet.
# The rehearsal runs setup with this machine's install (the wheels are only listed: they are for 3.12;
# with WHEELS=1 and PYTHON=a CPython 3.12 holding the image's torch, they are installed as on the device),
# the pipeline with `device: cpu` (only the DMQ row's stages, sample@dmq-w4a6: the whole reduced
# pipeline, 27 stages, took 172 s on an idle 2-core machine, over the part's limit once the cores are
# shared), nccl on gloo and dist-1 on the CPU; scale, dist-2 and bench skip, saying why, after checking
# that their arguments parse.
# What comes back (8 files at most, the device tool's limit): progress.txt, timings.txt, setup.log,
# scale.log (with its tables), scale_cuda.json, pipeline.log (with the metrics), distributed.log,
# bench.log (with bench.json).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
mode=device
for arg in "$@"; do
  case $arg in
    --rehearse) REHEARSE=1 ;;
    --plan) PLAN=1 ;;
    *) echo "usage: $0 [--rehearse] [--plan]" >&2 && exit 2 ;;
  esac
done
[ "${REHEARSE:-0}" = 1 ] && mode=rehearse
plan=${PLAN:-0}
total=${GPU_CHECK_S:-470}
work=$(mktemp -d /tmp/gpu_check_work.XXXX)
trap 'rm -rf "$work"' EXIT
if [ "$mode" = rehearse ]; then
  gpus=0 device=cpu
elif [ -n "${GPUS:-}" ]; then
  gpus=$GPUS device=cuda
else
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') device=cuda
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
failed=0

say() { echo "$(date -u +%T) [$SECONDS s] $*" | tee -a "$out/progress.txt"; }

# run KIND NAME LIMIT LOG COMMAND...: COMMAND under `timeout`, its output appended to $OUT/LOG; the limit
# cut to what is left of the whole; lines before and after it, its time in timings.txt; a failure counts
# unless KIND is info
run() {
  local kind=$1 name=$2 limit=$3 log=$4 left start code shown=() arg
  shift 4
  for arg in "$@"; do shown+=("${arg%%$'\n'*}"); done  # a Python snippet shown by its first line
  if [ "$plan" = 1 ]; then
    echo "plan: $kind $name ${limit}s $log :: ${shown[*]}"
    return 0
  fi
  left=$((total - SECONDS - 5))
  if [ "$left" -lt 10 ]; then
    skip "$kind" "$name" "no time left ($SECONDS s of $total)"
    return 0
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  say "$kind $name: start (limit $limit s) > $log"
  echo "=== $(date -u +%T) $name: ${shown[*]}" >>"$out/$log"
  start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$out/$log" 2>&1
  code=$?
  local how="exit $code"
  [ "$code" = 124 ] || [ "$code" = 137 ] && how="cut at $limit s"
  [ "$code" = 0 ] || [ "$kind" = info ] || failed=$((failed + 1))
  say "$kind $name: done in $((SECONDS - start)) s, $how"
  echo "$name: $((SECONDS - start)) s, $how" >>"$out/timings.txt"
  return "$code"
}

skip() {  # skip KIND NAME REASON
  if [ "$plan" = 1 ]; then
    echo "plan: $1 $2 skip: $3"
    return 0
  fi
  say "$1 $2: skipped: $3"
  echo "$2: skipped: $3" >>"$out/timings.txt"
}

# an argument check for a part that the rehearsal skips: the script's own parser reads the part's arguments
ARGS_PARSE='import argparse, runpy, sys
script, *args = sys.argv[1:]
class Parsed(Exception): pass
def parse_args(self, args=None, namespace=None):
    raise Parsed(original(self, args, namespace))
original, argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_args, parse_args
sys.argv = [script, *args]
try:
    runpy.run_path(script, run_name="__main__")
except Parsed as parsed:
    print(script, "parses", vars(parsed.args[0]))
else:
    sys.exit(f"{script} never parsed its arguments")'

IMPORTS='import importlib, importlib.metadata as md, pkgutil, sys
bad = []
for module, dist in [("torch", "torch"), ("torchvision", "torchvision"), ("numpy", "numpy"), ("zarr", "zarr"),
        ("dvc.repo", "dvc"), ("ruamel.yaml", "ruamel.yaml"), ("_ruamel_yaml", "ruamel.yaml.clib"),
        ("typer", "typer"), ("pydantic", "pydantic"), ("yaml", "pyyaml"), ("torch_fidelity", "torch-fidelity"),
        ("diffusers", "diffusers"), ("safetensors", "safetensors"), ("matplotlib", "matplotlib"),
        ("sklearn", "scikit-learn"), ("tqdm", "tqdm"), ("optimum.quanto", "optimum-quanto"),
        ("transformers", "transformers"), ("PIL", "pillow")]:
    try:
        where = importlib.import_module(module).__file__
        print(f"{dist:16s} {md.version(dist):14s} {where}")
    except Exception as error:
        bad.append(module)
        print(f"{dist:16s} FAILED: {type(error).__name__}: {error}")
import stages
for info in pkgutil.iter_modules(stages.__path__):
    try:
        importlib.import_module(f"stages.{info.name}")
    except Exception as error:
        bad.append(f"stages.{info.name}")
        print(f"stages.{info.name} FAILED: {type(error).__name__}: {error}")
import cli
print("python", sys.version.split()[0], sys.executable, "; stages and cli import" if not bad else "")
sys.exit(f"failed: {bad}" if bad else 0)'

FACTS='import os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cpus", os.cpu_count(), "cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu {i}: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
if torch.cuda.is_available():
    print("nccl", torch.cuda.nccl.version())
for flag in ("torch.backends.cudnn.conv.fp32_precision", "torch.backends.cuda.matmul.fp32_precision",
        "torch.backends.fp32_precision", "torch.backends.cudnn.allow_tf32", "torch.backends.cuda.matmul.allow_tf32",
        "torch.backends.cudnn.deterministic", "torch.backends.cudnn.benchmark"):
    obj, _, attr = flag.rpartition(".")
    try:
        print(flag, "=", getattr(eval(obj), attr))
    except Exception as error:
        print(flag, "unreadable:", error)
print("torch.get_float32_matmul_precision() =", torch.get_float32_matmul_precision())
print("torch.are_deterministic_algorithms_enabled() =", torch.are_deterministic_algorithms_enabled())
if torch.cuda.is_available():  # how far a float32 conv on the GPU lands from the CPU one: default flags, TF32 off
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 64, 32, 32, generator=g), torch.randn(64, 64, 3, 3, generator=g)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    def error():
        y = torch.nn.functional.conv2d(x.cuda(), w.cuda(), padding=1).cpu().double()
        return ((y - ref).abs().max() / ref.abs().max()).item()
    cpu = ((torch.nn.functional.conv2d(x, w, padding=1).double() - ref).abs().max() / ref.abs().max()).item()
    default = error()
    conv = torch.backends.cudnn.conv
    before, conv.fp32_precision = conv.fp32_precision, "ieee"  # the new API alone: mixing raises
    print(f"conv2d float32, max error / max |y| against float64: CPU {cpu:.2e}, GPU default {default:.2e}, "
          f"GPU conv.fp32_precision=ieee {error():.2e}")
    conv.fp32_precision = before'

NCCL='import datetime, os, torch, torch.distributed as dist
backend = "nccl" if torch.cuda.is_available() else "gloo"
device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1")
kwargs = dict(device_id=device) if backend == "nccl" else {}
dist.init_process_group(backend, timeout=datetime.timedelta(seconds=60), **kwargs)
t = torch.arange(4.0, device=device)
dist.all_reduce(t)
got = [None]
dist.all_gather_object(got, {"rank": dist.get_rank()})
dist.barrier()
print(backend, "world", dist.get_world_size(), "all_reduce", t.tolist(), "all_gather_object", got)
dist.destroy_process_group()'

INIT_REPO='import sys
from pathlib import Path
sys.path.insert(0, "tests")
from helpers import init_repo, reduced_params, set_params
repo = init_repo(Path(sys.argv[1]), reduced_params())
set_params(repo, {"device": sys.argv[2]})
print("scratch repository", repo, "device", sys.argv[2])'

HASHES='import sys
sys.path.insert(0, "tests")
from pathlib import Path
from helpers import tree_hash
dirs = [Path(d) for d in sys.argv[1:]]
for item in ("calib.zarr", "samples.zarr", "les.safetensors"):
    hashes = [tree_hash(d / item) if (d / item).exists() else "missing" for d in dirs]
    print(item, *hashes, *([] if len(dirs) == 1 else ["same" if len(set(hashes)) == 1 else "DIFFERENT"]))'

# ------------------------------------------------------------------ setup
say "mode $mode, $gpus GPU(s), $total s in all, work folder $work"
py=${PYTHON:-}
if [ "$plan" = 1 ]; then
  py=${py:-python3}
  echo "plan: setup python 60s setup.log :: the first of python3, /opt/torch/.venv/bin/python3, python that imports torch"
elif [ -z "$py" ]; then
  say "setup python: start (limit 60 s)"
  for candidate in python3 /opt/torch/.venv/bin/python3 python; do
    if command -v "$candidate" >/dev/null && timeout 60 "$candidate" -c "import torch" >>"$out/setup.log" 2>&1; then
      py=$(command -v "$candidate")
      break
    fi
  done
  say "setup python: done: ${py:-none imports torch}"
  [ -n "$py" ] || exit 1
fi

bin=$work/bin
mkdir -p "$bin"
printf '#!/bin/sh\nexec %s "$@"\n' "$py" >"$bin/python"
printf '#!/bin/sh\nexec %s -m dvc "$@"\n' "$py" >"$bin/dvc"
printf '#!/bin/sh\nexec %s -m torch.distributed.run "$@"\n' "$py" >"$bin/torchrun"
chmod +x "$bin"/*
export PATH="$bin:$PATH"
# GNU time's `-f %M -o FILE`, with which scale.py reads each stage's peak: a stand-in where it is missing
cat >"$bin/gnu-time" <<SHIM
#!$py
import os, subprocess, sys
args, path = sys.argv[1:], None
while args[0] in ("-f", "-o"):
    path = args[1] if args[0] == "-o" else path
    args = args[2:]
child = subprocess.Popen(args)
_, status, usage = os.wait4(child.pid, 0)
open(path, "w").write(f"{usage.ru_maxrss}\n")
sys.exit(os.waitstatus_to_exitcode(status))
SHIM
chmod +x "$bin/gnu-time"
if [ ! -x /usr/bin/time ] && [ "$plan" != 1 ]; then
  cp "$bin/gnu-time" /usr/bin/time && say "setup: /usr/bin/time was missing: a Python stand-in written (-f %M -o FILE)"
fi
if [ "$mode" = rehearse ]; then  # the stand-in against a known peak (40 MiB more than the interpreter's)
  # shellcheck disable=SC2016  # bash -c's own arguments
  run check time-stand-in 30 setup.log bash -c '"$1" -f %M -o "$2" "$3" -c "b = bytearray(40 << 20)" && cat "$2"' _ \
    "$bin/gnu-time" "$work/rss" "$py"
fi

wheels=(.whl/*.whl)
if [ "$mode" = rehearse ] && [ "${WHEELS:-0}" != 1 ]; then
  export PYTHONPATH=$PWD
  run setup wheels 30 setup.log "$py" -c 'import collections, pathlib, sys
found = sorted(pathlib.Path(".whl").glob("*.whl"))
names = collections.Counter(p.name.split("-")[0].lower().replace("_", "-") for p in found)
print(len(found), "wheels,", round(sum(p.stat().st_size for p in found) / 2**20, 1), "MiB; the local install stands in")
sys.exit(f"two versions of {[n for n, c in names.items() if c > 1]}" if max(names.values(), default=1) > 1 else 0)'
elif [ -e "${wheels[0]}" ] || [ "$plan" = 1 ]; then
  export PYTHONPATH=/tmp/site:$PWD
  run setup install 90 setup.log "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}"
else
  export PYTHONPATH=$PWD
  if [ "$plan" = 1 ] || ! "$py" -c "import dvc, zarr, diffusers, torch_fidelity, pydantic, optimum.quanto" 2>/dev/null; then
    # pyproject's dependencies less torch and torchvision: pip keeps the image's torch
    mapfile -t deps < <("$py" -c 'import re, tomllib
for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    print(d) if not re.match(r"torch(vision)?\b", d) else None')
    run setup pip-install 240 setup.log "$py" -m pip install -q "${deps[@]}"
  fi
fi
run setup imports 90 setup.log "$py" -c "$IMPORTS" || say "setup imports: failed, see setup.log"
run info pip-check 30 setup.log "$py" -m pip check
if command -v nvidia-smi >/dev/null || [ "$plan" = 1 ]; then
  run setup nvidia-smi 20 setup.log nvidia-smi
else
  skip setup nvidia-smi "no nvidia-smi on this machine"
fi
run setup facts 60 setup.log "$py" -c "$FACTS"
[ "$plan" = 1 ] || grep -E "^(gpu |torch |conv2d|torch.backends.cudnn.conv|torch.backends.cuda.matmul)" "$out/setup.log" |
  tee -a "$out/progress.txt"

# ------------------------------------------------------------------ parts
scale=(benchmarks/scale.py --device cuda --divisors 4 --topologies sd-v1 --methods dmq qdiff --no-full-width
  --json "$out/scale_cuda.json")
if [ "$gpus" -ge 1 ]; then
  run part scale 110 scale.log "$py" "${scale[@]}"
  [ -f "$out/scale_cuda.json" ] && run post scale-tables 30 scale.log "$py" benchmarks/scale.py --tables "$out/scale_cuda.json"
else
  run check scale-args 60 scale.log "$py" -c "$ARGS_PARSE" "${scale[@]}"
  skip part scale "no GPU: --device cuda measures CUDA memory"
fi

repo=$work/repo
mkdir -p "$repo"
run setup pipeline-repo 60 pipeline.log "$py" -c "$INIT_REPO" "$repo" "$device"
target=()
[ "$mode" = rehearse ] && target=(sample@dmq-w4a6)  # the DMQ row's stages: the whole is over the limit on 2 cores
# shellcheck disable=SC2016  # $1 and $@ are bash -c's own
run part pipeline 190 pipeline.log bash -c 'cd "$1" && shift && dvc repro "$@" 2>&1 |
  while IFS= read -r line; do printf "%(%T)T %s\n" -1 "$line"; done' _ "$repo" "${target[@]}"
[ "$plan" = 1 ] || for metrics in "$repo"/metrics/*.json; do
  [ -f "$metrics" ] && { echo "=== $metrics" && cat "$metrics"; } >>"$out/pipeline.log"
done

run part nccl 20 distributed.log "$py" -c "$NCCL"
run part dist-1 40 distributed.log env DMQ_DIST_DEVICE="$device" OMP_NUM_THREADS=1 \
  torchrun --standalone --nproc_per_node 1 tests/dist_job.py "$work/one"
if [ "$gpus" -ge 2 ]; then
  run part dist-2 40 distributed.log env DMQ_DIST_DEVICE=cuda OMP_NUM_THREADS=1 \
    torchrun --standalone --nproc_per_node 2 tests/dist_job.py "$work/two"
  run post dist-compare 30 distributed.log "$py" -c "$HASHES" "$work/one" "$work/two"
else
  skip part dist-2 "$gpus GPU(s): NCCL needs one GPU per rank"
  run post dist-hashes 30 distributed.log "$py" -c "$HASHES" "$work/one"
fi

bench=(benchmarks/bench.py --device cuda --models default --json "$work/bench.json")
if [ "$gpus" -ge 1 ]; then
  run part bench 45 bench.log "$py" "${bench[@]}"
  [ -f "$work/bench.json" ] && { echo "=== bench.json" && cat "$work/bench.json"; } >>"$out/bench.log"
else
  run check bench-args 60 bench.log "$py" -c "$ARGS_PARSE" "${bench[@]}"
  skip part bench "no GPU: --device cuda"
fi

[ "$plan" = 1 ] && exit 0
say "finished in $SECONDS s, $failed step(s) failed; $out: $(cd "$out" && echo *)"
cat "$out/timings.txt"
[ "$failed" = 0 ]
