"""Two reproductions of the table on the same FP model, row by row: how far a change of params that
keeps the model (a smaller LES or AdaRound budget, say) moves each row, measured against the seed spread
the table prints.

Each workspace is a repo root after ``dvc repro`` (its ``params.yaml``, ``metrics/`` and
``artifacts/samples``). Quantization seeds are paired in order, as the report pairs rows: for each row
the per-seed difference A − B of ΔFID (FID minus FP's on the same noise) and of the per-sample error
against FP (left out where a workspace has no samples: a committed table checked out from git), with
the verdict of :func:`pipeline.eval.report.compare_rows` (a difference counts only beyond both the
seed spread and twice the standard error over samples). Refuses workspaces whose FP models differ:
then rows are not paired, unless ``--unpaired``: each row's ΔFID (against its own FP) is set side by
side with the other's, per-sample errors left out, so what can be compared is whether a claim of the
table (a ranking, a row's distance to FP beyond the spread) survived a new FP model or protocol.

    python benchmarks/compare_tables.py /work/full /work/half --json benchmarks/budget_half.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # this checkout's code, whichever checkout pip installed

from pipeline.eval.report import compare_rows, mean_std, rows_against_fp  # noqa: E402
from pipeline.eval.sampling import read_samples  # noqa: E402
from pipeline.infra.fingerprint import config_values  # noqa: E402
from pipeline.infra.storage import read_json  # noqa: E402
from pipeline.params import load_config  # noqa: E402
from stages.layout import FP, metrics_path, samples_path  # noqa: E402
from stages.report import sample_errors  # noqa: E402


def flat_params(root: Path) -> dict:
    """params.yaml as dotted keys (``les.iters``: 300)."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    return config_values(params, params)


@contextmanager
def inside(root: Path):
    """Stage paths (``artifacts/…``, ``metrics/…``) are relative to the repo root (``contextlib.chdir``
    needs Python 3.11; the project supports 3.10)."""
    before = Path.cwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(before)


def table_of(root: Path, rows: list[str] | None):
    """The workspace's config and, per row (default: the report's table and ablation), its per-sample
    errors against FP and ΔFID per quantization seed."""
    with inside(root):
        cfg = load_config(model_checks=False)
        rows = rows or list(dict.fromkeys(cfg.report.table + cfg.report.ablation))
        fp_record = read_json(metrics_path(FP))
        kept = samples_path(FP).exists()  # a committed table checked out without its artifacts has none
        fp_samples = read_samples(samples_path(FP))[0] if kept else None
        found = {"model_hash": fp_record["provenance"]["model_hash"], "rows": {}}
        for name in rows:
            record = read_json(metrics_path(name))
            runs = rows_against_fp([fp_record, record], str(root / metrics_path(FP)))[1].runs
            found["rows"][name] = {
                "errors": sample_errors(cfg, name, record, fp_samples) if kept else None,
                "fid_vs_fp": [run["fid_vs_fp"] for run in runs],
            }
        return cfg, found


def fid_only(fid_a: list[float], fid_b: list[float]) -> dict:
    """:func:`compare_rows`'s ΔFID verdict where a workspace has metrics but no samples (a committed
    table checked out from git): the pixel comparison is left out and the verdict says so."""
    no_errors = {seed: torch.zeros(1) for seed in range(len(fid_a))}
    found = compare_rows(no_errors, no_errors, fid_a, fid_b)
    pixels = dict.fromkeys(
        ("mse_diff", "mse_diff_std", "mse_diff_se", "mse_diff_median", "a_closer_share"), float("nan")
    )
    return {**found, **pixels, "verdict": "no samples"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="the reference workspace")
    parser.add_argument("b", type=Path, help="the changed workspace")
    parser.add_argument("--rows", nargs="+", help="only these rows (default: the report's table and ablation)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--unpaired", action="store_true", help="compare ΔFID only where the FP models differ")
    args = parser.parse_args()
    cfg, a = table_of(args.a, args.rows)
    rows = list(a["rows"])
    _, b = table_of(args.b, rows)
    paired = a["model_hash"] == b["model_hash"]
    if not paired and not args.unpaired:
        raise SystemExit(
            f"the FP models differ ({a['model_hash']} vs {b['model_hash']}): "
            "rows are not paired (--unpaired: ΔFID alone)"
        )
    pa, pb = flat_params(args.a), flat_params(args.b)
    changed = {key: [pa.get(key), pb.get(key)] for key in sorted(pa.keys() | pb.keys()) if pa.get(key) != pb.get(key)}
    print("params A → B: " + ", ".join(f"{key} {old} → {new}" for key, (old, new) in changed.items()))
    print(f"{'row':<18} {'ΔFID A':>14} {'ΔFID B':>14} {'A − B':>16} {'FID verdict':<20} {'MSE A − B':>20} verdict")
    results = {}
    for name in rows:
        ra, rb = a["rows"][name], b["rows"][name]
        if not paired or ra["errors"] is None or rb["errors"] is None:
            found = fid_only(ra["fid_vs_fp"], rb["fid_vs_fp"])
        else:
            found = compare_rows(ra["errors"], rb["errors"], ra["fid_vs_fp"], rb["fid_vs_fp"])
        (fa, sa), (fb, sb) = mean_std(ra["fid_vs_fp"]), mean_std(rb["fid_vs_fp"])
        results[name] = {"fid_vs_fp_a": [fa, sa], "fid_vs_fp_b": [fb, sb], **found}
        print(
            f"{name:<18} {fa:>7.1f} ± {sa:>4.1f} {fb:>7.1f} ± {sb:>4.1f} "
            f"{found['fid_diff']:>+8.1f} ± {found['fid_diff_std']:>5.1f} {found['fid_verdict']:<20} "
            f"{found['mse_diff']:>+9.5f} ± {found['mse_diff_std']:.5f} {found['verdict']}"
        )
    unmoved = ("within the spread", "no samples")
    counted = [n for n, r in results.items() if r["fid_verdict"] not in unmoved or r["verdict"] not in unmoved]
    print(
        f"\n{len(rows) - len(counted)} of {len(rows)} rows within the spread on both; "
        f"beyond: {', '.join(counted) or 'none'}"
    )
    rankings = {}
    for bits in dict.fromkeys(cfg.row_variant(n).label for n in rows if n in cfg.report.table):
        group = [n for n in cfg.report.table if cfg.row_variant(n).label == bits and n in results]
        rankings[bits] = {side: sorted(group, key=lambda n: results[n][f"fid_vs_fp_{side}"][0]) for side in ("a", "b")}
        print(f"{bits} by ΔFID  A: {' < '.join(rankings[bits]['a'])}\n{'':>11}B: {' < '.join(rankings[bits]['b'])}")
    if args.json:
        summary = {
            "a": str(args.a),
            "b": str(args.b),
            "params_a_to_b": changed,
            "model_hash": a["model_hash"] if paired else [a["model_hash"], b["model_hash"]],
            "rows": results,
            "rankings_by_fid_vs_fp": rankings,
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
