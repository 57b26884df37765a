"""Two runs of the committed table on different FP models, row by row and verdict by verdict: does what
the tables say hold when the same code and params run on another CPU kind? (oneDNN and MKL pick other
kernels per instruction set, so the FP model differs in its last digits and every row downstream with it.)

A and B are folders holding a run's committed ``metrics/`` and ``reports/``; no artifacts are needed
(``git archive <rev> metrics reports params.yaml dvc.lock | tar -x -C /tmp/a``). The rows are those of
reports/paper_table.md, then those of reports/ablation.md not in it, each found in metrics/ by the method
and bits the table prints. Reported:

1. Per row, ΔFID vs FP (FID minus FP's FID on the same noise seed, as the tables compute it) as mean ±
   spread over quantization seeds in each run. The two runs sample different models, so seeds cannot be
   paired as benchmarks/compare_tables.py pairs them; a row is *within the spreads* when
   |mean_A − mean_B| ≤ spread_A + spread_B, i.e. when the mean ± spread intervals the two tables print
   overlap. As spread_A + spread_B ≥ √(spread_A² + spread_B²), the spread of one seed of A minus one of B,
   a row moves only beyond the seed spread, the bar :func:`pipeline.eval.report.compare_rows` sets. A row
   whose params hash (which does not depend on the FP model) differs is flagged: it is no CPU-kind comparison.
2. Per pair of reports/comparisons.md, its MSE and FID verdicts in each run and whether each holds (a pair
   only one run has, when the best other row of a bit-width changed, counts as two moved verdicts); per
   bit-width, the paper table's methods ranked by mean ΔFID in each run and whether the order holds.
3. Each run's FP model hash and environment, with the CPU where the record names it.

    python benchmarks/compare_runs.py /tmp/a /tmp/b --json /tmp/a_vs_b.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # this checkout's code, whichever checkout pip installed

from pipeline.eval.includes import first_table  # noqa: E402
from pipeline.eval.report import Row, mean_std, rows_against_fp  # noqa: E402
from pipeline.infra.storage import ArtifactError, read_json  # noqa: E402
from stages.layout import ABLATION, COMPARISONS, FP, METRICS, PAPER_TABLE, metrics_path  # noqa: E402

CPU_MARK = "; CPU "  # pipeline.infra.machine.environment ends with it; records written before it have no CPU part
VERDICTS = {"mse_verdict": "MSE verdict", "fid_verdict": "FID verdict"}  # JSON key: comparisons.md column
WITHIN, MOVED = "within the spreads", "moved"
ONE_SEED = "undecided (one quantization seed: no spread)"


def split_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().removeprefix("|").removesuffix("|").split("|")]


def markdown_rows(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of the first Markdown table of ``path``, each as {header: cell}; refuses a table without
    the header separator, a row with another number of cells than the header, or a missing column."""
    header, separator, *lines = first_table(path.read_text(), path).splitlines()
    if set(separator) - set("|-: "):
        raise ArtifactError(f"{path}: the table's second line should separate the header (|---|), not {separator!r}")
    names = split_cells(header)
    missing = [name for name in columns if name not in names]
    if missing:
        raise ArtifactError(f"{path}: the table has no column {', '.join(missing)} (its columns: {', '.join(names)})")
    rows = [split_cells(line) for line in lines]
    for number, cells in enumerate(rows, start=3):
        if len(cells) != len(names):
            raise ArtifactError(f"{path}: line {number} of the table has {len(cells)} cells, its header {len(names)}")
    return [dict(zip(names, cells)) for cells in rows]


@dataclass
class Run:
    """What one run's committed outputs say, as far as this comparison reads them."""

    folder: Path
    fp: dict  # metrics/fp.json
    rows: dict[str, Row]  # per metrics record (file stem): its runs carry fid_vs_fp per quantization seed
    params_hashes: dict[str, str]  # per metrics record: the params it was made with
    table: list[str]  # the paper table's rows, in its order
    ablation: list[str]
    verdicts: dict[tuple[str, str], dict[str, str]]  # per (A, B) pair of comparisons.md: its verdict per VERDICTS key

    def fid_vs_fp(self, name: str) -> list[float]:
        return [run["fid_vs_fp"] for run in self.rows[name].runs]

    def provenance(self) -> dict[str, str]:
        """Where the FP model came from: its hash and environment, the latter also split into the software
        (package versions, torch threads) and the CPU."""
        environment = self.fp["provenance"]["environment"]
        software, _, cpu = environment.partition(CPU_MARK)
        return {
            "folder": str(self.folder),
            "model_hash": self.fp["provenance"]["model_hash"],
            "environment": environment,
            "software": software,
            "cpu": cpu or "not recorded",
        }


def report_rows(path: Path, fp_row: Row, rows: dict[str, Row]) -> list[str]:
    """The metrics records of the rows of the report at ``path``, in its order, FP's left out."""
    named: dict[tuple[str, str], list[str]] = {}
    for name, row in rows.items():
        named.setdefault((row.method, row.bits), []).append(name)
    found = []
    for line in markdown_rows(path, ("Method", "Bits")):
        label = (line["Method"], line["Bits"])
        if label == (fp_row.method, fp_row.bits):
            continue
        names = named.get(label, [])
        if len(names) != 1:
            raise ArtifactError(
                f"{path}: the row {' '.join(label)} matches {len(names)} records in {path.parent.parent / METRICS} "
                f"({', '.join(names) or 'none'}); expected exactly one, with that method and bits"
            )
        found += names
    return found


def load_run(folder: Path) -> Run:
    fp = read_json(folder / metrics_path(FP))
    if not any("fid" in run for run in fp["seeds"].values()):
        raise ArtifactError(f"{folder / metrics_path(FP)} has no FID (no Inception features): no ΔFID to compare")
    records = {path.stem: read_json(path) for path in sorted((folder / METRICS).glob("*.json")) if path.stem != FP}
    fp_row, *others = rows_against_fp([fp, *records.values()])
    rows = dict(zip(records, others))
    comparisons = markdown_rows(folder / COMPARISONS, ("A", "B", *VERDICTS.values()))
    return Run(
        folder=folder,
        fp=fp,
        rows=rows,
        params_hashes={name: record["provenance"]["params_hash"] for name, record in records.items()},
        table=report_rows(folder / PAPER_TABLE, fp_row, rows),
        ablation=report_rows(folder / ABLATION, fp_row, rows),
        verdicts={
            (line["A"], line["B"]): {key: line[column] for key, column in VERDICTS.items()} for line in comparisons
        },
    )


def row_change(a: Run, b: Run, name: str) -> dict:
    """Row ``name``'s ΔFID vs FP in runs A and B as [mean, spread] over quantization seeds, the difference
    of means and whether it is within the spreads (module docstring)."""
    if name not in a.rows or name not in b.rows:
        return {"status": f"only in {'A' if name in a.rows else 'B'}"}
    fid_a, fid_b = a.fid_vs_fp(name), b.fid_vs_fp(name)
    (mean_a, spread_a), (mean_b, spread_b) = mean_std(fid_a), mean_std(fid_b)
    if min(len(fid_a), len(fid_b)) < 2:
        status = ONE_SEED
    else:
        status = WITHIN if abs(mean_a - mean_b) <= spread_a + spread_b else MOVED
    return {
        "fid_vs_fp_a": [mean_a, spread_a],
        "fid_vs_fp_b": [mean_b, spread_b],
        "difference": mean_a - mean_b,
        "status": status,
        "same_params": a.params_hashes[name] == b.params_hashes[name],
    }


def pair_change(a: Run, b: Run, pair: tuple[str, str]) -> dict:
    """The verdicts of one comparisons.md pair in runs A and B (None where a run has no such pair)."""
    found: dict = {"pair": list(pair)}
    for key in VERDICTS:
        in_a, in_b = (run.verdicts[pair][key] if pair in run.verdicts else None for run in (a, b))
        found[key] = {"a": in_a, "b": in_b, "holds": in_a is not None and in_a == in_b}
    return found


def ranking(run: Run) -> dict[str, list[str]]:
    """Per bit-width of the paper table, its methods from the lowest mean ΔFID to the highest (ties keep the
    table's order)."""
    groups: dict[str, list[str]] = {}
    for name in run.table:
        groups.setdefault(run.rows[name].bits, []).append(name)
    return {
        bits: [run.rows[n].method for n in sorted(names, key=lambda n: mean_std(run.fid_vs_fp(n))[0])]
        for bits, names in groups.items()
    }


def verdict_change(change: dict) -> str:
    if change["holds"]:
        return f"{change['a']} (holds)"
    return f"{change['a'] or '–'} → {change['b'] or '–'} (moves)"


def tally(total: int, moved: list[str], holding: str) -> str:
    return f"{total - len(moved)} of {total} {holding}; moved: {', '.join(moved) or 'none'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="a folder with one run's metrics/ and reports/")
    parser.add_argument("b", type=Path, help="a folder with the other run's metrics/ and reports/")
    parser.add_argument("--json", type=Path, help="also write everything reported here")
    args = parser.parse_args()
    a, b = load_run(args.a), load_run(args.b)

    runs = {"a": a.provenance(), "b": b.provenance()}
    for side, found in runs.items():
        print(
            f"{side.upper()} {found['folder']}: FP model {found['model_hash']}, CPU {found['cpu']}, {found['software']}"
        )
    if runs["a"]["model_hash"] == runs["b"]["model_hash"]:
        print("  the same FP model in both: where the artifacts exist, benchmarks/compare_tables.py pairs the seeds")

    names = list(dict.fromkeys(a.table + a.ablation + b.table + b.ablation))
    rows = {name: row_change(a, b, name) for name in names}
    width = max(map(len, names))
    print(f"\n{'row':<{width}}  {'ΔFID vs FP, A':>15}  {'ΔFID vs FP, B':>15}  {'A − B':>8}  unpaired")
    for name, row in rows.items():
        if "difference" not in row:
            print(f"{name:<{width}}  {row['status']}")
            continue
        (mean_a, spread_a), (mean_b, spread_b) = row["fid_vs_fp_a"], row["fid_vs_fp_b"]
        params = "" if row["same_params"] else " (made with other params)"
        print(
            f"{name:<{width}}  {mean_a:>7.2f} ± {spread_a:>5.2f}  {mean_b:>7.2f} ± {spread_b:>5.2f}  "
            f"{row['difference']:>+8.2f}  {row['status']}{params}"
        )

    pairs = [pair_change(a, b, pair) for pair in dict.fromkeys([*a.verdicts, *b.verdicts])]
    width = max((len(" vs ".join(pair["pair"])) for pair in pairs), default=0)
    print("\nreports/comparisons.md, verdicts of run A (→ run B where it moves)")
    for pair in pairs:
        print(
            f"{' vs '.join(pair['pair']):<{width}}  MSE: {verdict_change(pair['mse_verdict'])}; "
            f"FID: {verdict_change(pair['fid_verdict'])}"
        )

    ranked_a, ranked_b = ranking(a), ranking(b)
    rankings = {
        bits: {"a": ranked_a.get(bits), "b": ranked_b.get(bits), "holds": ranked_a.get(bits) == ranked_b.get(bits)}
        for bits in dict.fromkeys([*ranked_a, *ranked_b])
    }
    print("\nmethods by mean ΔFID vs FP")
    for bits, ranked in rankings.items():
        print(f"{bits} A: {' < '.join(ranked['a'] or ['–'])}" + (" (holds)" if ranked["holds"] else ""))
        if not ranked["holds"]:
            print(f"{'':{len(bits)}} B: {' < '.join(ranked['b'] or ['–'])} (moves)")

    print()
    print(tally(len(rows), [name for name, row in rows.items() if row["status"] != WITHIN], "rows within the spreads"))
    print(
        tally(
            len(pairs) * len(VERDICTS),
            [
                f"{' vs '.join(pair['pair'])} ({VERDICTS[key]})"
                for pair in pairs
                for key in VERDICTS
                if not pair[key]["holds"]
            ],
            "verdicts hold",
        )
    )
    print(tally(len(rankings), [bits for bits, ranked in rankings.items() if not ranked["holds"]], "rankings hold"))
    other_params = [name for name, row in rows.items() if not row.get("same_params", True)]
    if other_params:
        print(f"made with other params in A than in B (not a CPU-kind comparison): {', '.join(other_params)}")
    if args.json:
        summary = {"runs": runs, "rows": rows, "pairs": pairs, "rankings_by_fid_vs_fp": rankings}
        args.json.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
