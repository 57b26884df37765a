"""Cold against warm stage processes, in one run: ``dvc repro --force --single-item STAGES`` as plain
processes, then with every stage forked from a fork server (``pipeline/infra/forkserver.py``, as
``cli.py run`` does; its preload timed apart, since a run pays it once), alternated ``--rounds`` times.
Afterwards ``dvc status`` of the stages must find them up to date: the warm processes wrote the bytes
the lock records. Run it in a workspace whose stages are up to date (after ``dvc repro``).

    python benchmarks/warm_stages.py --json benchmarks/warm_stages_avx2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))
from pipeline.infra import forkserver  # noqa: E402 -- the workspace's own copy

# a stage of each kind that runs per row or per entry, cheap ones (minmax learns nothing) and learning ones
STAGES = [
    "les@minmax-w4",
    "recon@minmax-w4",
    "pts@minmax-w4a8",
    "sample@minmax-w4a8",
    "fid@minmax-w4a8",
    "pts@dmq-no-pts-w4a6",
    "sample@dmq-no-pts-w4a6",
    "fid@dmq-no-pts-w4a6",
]


def timed(command: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="*", default=STAGES)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    command = ["dvc", "repro", "-q", "--force", "--single-item", *args.stages]
    runs = {"cold_s": [], "warm_s": [], "preload_s": [], "forked": []}
    for _ in range(args.rounds):
        runs["cold_s"].append(timed(command))
        started = time.perf_counter()
        with forkserver.started(wait=True) as server:
            runs["preload_s"].append(time.perf_counter() - started)
            runs["warm_s"].append(timed(command, server.env))
            runs["forked"].append(sum(line.startswith("forked ") for line in server.requests()))
    status = subprocess.run(["dvc", "status", "-q", *args.stages]).returncode
    result = {
        "stages": args.stages,
        **{key: [round(v, 1) for v in values] for key, values in runs.items()},
        "warm_over_cold": round(statistics.median(runs["warm_s"]) / statistics.median(runs["cold_s"]), 3),
        "saved_per_stage_s": round(
            (statistics.median(runs["cold_s"]) - statistics.median(runs["warm_s"])) / len(args.stages), 2
        ),
        "up_to_date_after": status == 0,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
