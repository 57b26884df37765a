#!/usr/bin/env bash
# The GPU check, one script for a lent device (one GPU, under 10 minutes); each part has its own time
# limit, so that one that fails or hangs leaves the others their time:
#   1. benchmarks/scale.py --device cuda: the stages on the GPU for Stable Diffusion's UNet at 1/4 width,
#      DMQ's row and Q-Diffusion's (attention matmuls quantized, shared steps learned), each stage's peak
#      of CUDA memory against pipeline/resources.py's prediction;
#   2. the whole pipeline with `device: cuda` on the reduced budget of the tests (tests/reduced.yaml),
#      in a scratch DVC repository, timed;
#   3. the distributed test on NCCL (DMQ_DIST_DEVICE=cuda): 2 ranks need 2 GPUs, so on one GPU it
#      runs the single-rank half and says that the NCCL comparison was skipped;
#   4. benchmarks/bench.py --device cuda on the default UNet (same-run ratios, as on the CPU).
# It installs with the README's command unless the requirements import already (an image that reaches
# no registry, the packages brought as wheels). Everything it measures lands in $OUT (default
# /tmp/gpu_check): gpus.txt, scale_cuda.json / .log, pipeline.log, timings.txt, bench.json / .txt,
# distributed.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
python -c "import dvc, zarr, diffusers, torch_fidelity, pydantic, optimum.quanto" 2>/dev/null || pip install -q -e ".[dev]"
nvidia-smi -L | tee "$out/gpus.txt"
gpus=$(nvidia-smi -L | wc -l)
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpus.txt"

part() {  # part SECONDS NAME COMMAND...: COMMAND under a time limit, its wall time to timings.txt
  local limit=$1 name=$2 start=$SECONDS
  shift 2
  timeout --kill-after=10 "$limit" "$@"
  local code=$?
  echo "$name: $(( SECONDS - start )) s, exit $code$([ $code = 124 ] && echo " (cut at $limit s)")" | tee -a "$out/timings.txt"
}

part 240 "scale.py --device cuda" python benchmarks/scale.py --device cuda --divisors 4 --topologies sd-v1 \
  --methods dmq qdiff --no-full-width --json "$out/scale_cuda.json" > "$out/scale_cuda.log" 2>&1
[ -f "$out/scale_cuda.json" ] && python benchmarks/scale.py --tables "$out/scale_cuda.json" > "$out/scale_cuda.md"

scratch=$(mktemp -d)
python - "$scratch" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from helpers import init_repo, reduced_params, set_params

repo = init_repo(Path(sys.argv[1]), reduced_params())
set_params(repo, {"device": "cuda"})
PY
part 200 "reduced pipeline on cuda" bash -c "cd '$scratch' && dvc repro" > "$out/pipeline.log" 2>&1
cp "$scratch"/metrics/*.json "$out/" 2>/dev/null || true

if [ "$gpus" -ge 2 ]; then
  part 45 distributed env DMQ_DIST_DEVICE=cuda python -m pytest -q tests/test_distributed.py > "$out/distributed.log" 2>&1
else
  echo "one GPU: NCCL needs one GPU per rank, so the 2-rank comparison is skipped" | tee "$out/distributed.log"
  part 45 distributed env DMQ_DIST_DEVICE=cuda python -m pytest -q tests/test_distributed.py -k "not two_gloo" \
    >> "$out/distributed.log" 2>&1
fi
tail -n 3 "$out/distributed.log"

part 45 bench.py python benchmarks/bench.py --device cuda --models default --json "$out/bench.json" > "$out/bench.txt" 2>&1
cat "$out/timings.txt"
