"""Wall time and peak memory of each DVC stage on this machine.

Runs ``dvc repro --force --single-item STAGE`` for each stage in pipeline order under
``/usr/bin/time -v`` (peak RSS of the largest process of the stage) and prints a table; ``--json``
also writes the figures. The lock file stays consistent, so the run doubles as a full reproduction.

    python benchmarks/stage_costs.py                       # every stage
    python benchmarks/stage_costs.py dump recon pts        # some stages (their inputs must exist)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path


def measure(stage: str) -> dict:
    done = subprocess.run(
        ["/usr/bin/time", "-v", "dvc", "repro", "--force", "--single-item", stage], capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"stage {stage} failed:\n{done.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", done.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return {"stage": stage, "wall_s": round(seconds, 1), "peak_rss_mb": round(rss_kb / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="*", help="stages to time (default: all, in dvc.yaml order)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    # -R .: external/dvc.yaml's eval_files too
    command = ["dvc", "stage", "list", "-R", ".", "--name-only"]
    listed = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    stages = args.stages or listed.split()  # foreach stages expanded: les@dmq-w4a6, …
    rows = []
    print(f"{'stage':<28} {'wall s':>8} {'peak RSS MB':>12}", flush=True)
    for stage in stages:
        rows.append(measure(stage))
        print(f"{stage:<28} {rows[-1]['wall_s']:>8} {rows[-1]['peak_rss_mb']:>12}", flush=True)
    print(f"{'total':<28} {sum(r['wall_s'] for r in rows):>8.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
