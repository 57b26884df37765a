"""The quantization seeds one after another on all of torch's threads (the code before, in the workspace
``--before``) against side by side, one thread each, in ``recon.workers`` / ``pts.workers`` processes (this
workspace), in one run: each stage's script as a plain process (``python -m stages.<stage> <name>``), the
two workspaces alternated ``--rounds`` times. Both workspaces must be up to date with identical inputs to
these stages (the same dump and LES, which the change leaves bit-identical); afterwards ``dvc status`` of
the stages here must find them up to date (a rerun writes the bytes the lock records).

    python benchmarks/seed_workers.py --before ../run --json benchmarks/seed_workers_avx2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

STAGES = ["recon@qdiff-w4", "recon@dmq-w4a6", "pts@qdiff-w4a6", "pts@dmq-w4a6"]


def timed(stage: str, workspace: Path) -> float:
    kind, name = stage.split("@")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", f"stages.{kind}", name], cwd=workspace, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="*", default=STAGES)
    parser.add_argument("--before", type=Path, required=True, help="workspace at the commit before")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    here = Path.cwd()
    seconds = {stage: {"before_s": [], "side_by_side_s": []} for stage in args.stages}
    for round_ in range(args.rounds):
        for stage in args.stages:
            order = [("before_s", args.before), ("side_by_side_s", here)]
            for key, workspace in order if round_ % 2 == 0 else order[::-1]:
                seconds[stage][key].append(round(timed(stage, workspace), 1))
                print(stage, key, seconds[stage][key][-1], flush=True)
    status = subprocess.run(["dvc", "status", "-q", *args.stages]).returncode
    ratio = {
        s: round(statistics.median(t["side_by_side_s"]) / statistics.median(t["before_s"]), 3)
        for s, t in seconds.items()
    }
    result = {"seconds": seconds, "side_by_side_over_before": ratio, "up_to_date_after": status == 0}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
