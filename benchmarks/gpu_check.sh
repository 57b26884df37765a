#!/usr/bin/env bash
# The GPU check, one script for a lent device (one GPU, under 8 minutes): nothing is installed beyond
# the README's install command.
#   1. the whole pipeline with `device: cuda` on the reduced budget of the tests (tests/reduced.yaml),
#      in a scratch DVC repository, timed;
#   2. benchmarks/bench.py --device cuda on the default UNet (same-run ratios, as on the CPU);
#   3. the distributed test on NCCL (DMQ_DIST_DEVICE=cuda): 2 ranks need 2 GPUs, so on one GPU it
#      runs the single-rank half and says that the NCCL comparison was skipped.
# Everything it measures lands in $OUT (default /tmp/gpu_check): pipeline.log, timings.txt,
# bench.json / bench.txt, distributed.log.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
pip install -q -e ".[dev]"
nvidia-smi -L | tee "$out/gpus.txt"
gpus=$(nvidia-smi -L | wc -l)

scratch=$(mktemp -d)
python - "$scratch" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from helpers import init_repo, reduced_params, set_params

repo = init_repo(Path(sys.argv[1]), reduced_params())
set_params(repo, {"device": "cuda"})
PY
start=$(date +%s)
(cd "$scratch" && dvc repro) > "$out/pipeline.log" 2>&1
echo "reduced pipeline on cuda: $(( $(date +%s) - start )) s" | tee "$out/timings.txt"
cp "$scratch"/metrics/*.json "$out/" 2>/dev/null || true

timeout 240 python benchmarks/bench.py --device cuda --models default --json "$out/bench.json" > "$out/bench.txt" 2>&1 \
  || echo "bench.py did not finish within 240 s" | tee -a "$out/timings.txt"

if [ "$gpus" -ge 2 ]; then
  DMQ_DIST_DEVICE=cuda python -m pytest -q tests/test_distributed.py > "$out/distributed.log" 2>&1 || true
else
  echo "one GPU: NCCL needs one GPU per rank, so the 2-rank comparison is skipped" | tee "$out/distributed.log"
  DMQ_DIST_DEVICE=cuda python -m pytest -q tests/test_distributed.py -k "not two_gloo" >> "$out/distributed.log" 2>&1 || true
fi
tail -n 3 "$out/distributed.log"
