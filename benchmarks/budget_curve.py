"""The budget curve: how rows of the table move with the LES and AdaRound iterations (issue 28).

Each workspace is a repo root after ``dvc repro`` of the rows at one budget (``les.iters`` and
``les.lr``, ``recon.iters``; everything else equal), on the same FP model (refused otherwise). Per row and budget:
ΔFID against FP and the paired per-sample MSE against FP, each as mean ± spread over the quantization
seeds, and γ's range (rows with LES). Against the largest budget measured (the last workspace), every
other budget gets :func:`pipeline.eval.report.compare_rows`'s verdict per row: a budget whose rows are
all "within the spread" of the largest one's changes no verdict of the table. ``--pairs A:B`` adds the
table's own claims: row A against row B within each budget, and whether every such verdict is the
largest budget's (a budget can move both rows of a pair and keep what the table says of them).
``--markdown`` writes the same as a table for the docs, with what the learners that vary took.

    python benchmarks/budget_curve.py /work/b300 /work/b1000 /work/b3000 --rows dmq-w4a6 dmq-w4a4 \\
        --pairs dmq-w4a6:qdiff-steps-w4a6 --json benchmarks/budget_curve.json --figure budget_curve.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.compare_tables import inside, table_of  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.eval.report import compare_rows, mean_std  # noqa: E402
from pipeline.infra.storage import read_json  # noqa: E402


def gamma_range(root: Path, cfg, row: str, seeds) -> list[float] | None:
    """γ's min and max over the layers and the quantization ``seeds`` of the row's LES (None without LES)."""
    path = root / "reports" / "les" / f"{cfg.rows[row].weights}.json"
    if not path.exists():
        return None
    learned = read_json(path)["quant_seeds"]
    layers = [layer for seed in seeds for layer in learned[str(seed)]["layers"].values()]
    if not layers or "gamma_min" not in layers[0]:
        return None
    return [min(layer["gamma_min"] for layer in layers), max(layer["gamma_max"] for layer in layers)]


def budget_of(cfg: Config) -> dict:
    """LES's iterations and learning rate (the one it ran with: ``les.lr`` or the paper's sum spread over
    the iterations), AdaRound's iterations and learning rate."""
    return {
        "les_iters": cfg.les.iters,
        "les_lr": cfg.les.learning_rate,
        "recon_iters": cfg.recon.iters,
        "recon_lr": cfg.recon.learning_rate,
    }


VERDICT_KEYS = ("fid_diff", "fid_diff_std", "fid_verdict", "mse_diff", "mse_diff_std", "verdict")  # of compare_rows


LEARNERS = {"les": "LES", "recon": "AdaRound"}  # the learners a budget sets, by their stage
# in the learner's stage report: whether the entry learned, a quantization seed's seconds
REPORT_KEYS = {"les": ("les", "wall_seconds"), "recon": ("adaround", "seconds")}


def learner_seconds(root: Path, cfg, rows: list[str], learner: str) -> list[float]:
    """What the learner took per weights entry of ``rows`` that it learns, the quantization seeds summed
    (the seed times of its stage's reports, which leave out loading the model). Where the seeds ran side
    by side (``recon.workers``, ``pts.workers``) the sum exceeds the stage's wall time and each seed took
    longer than alone: compare only budgets run with the same workers on the same machine."""
    entries = dict.fromkeys(cfg.rows[row].weights for row in rows)
    learned, seconds = REPORT_KEYS[learner]
    reports = [read_json(root / "reports" / learner / f"{entry}.json") for entry in entries]
    return [sum(seed[seconds] for seed in r["quant_seeds"].values()) for r in reports if r[learned]]


def pair_verdicts(found: dict, pairs: list[tuple[str, str]]) -> dict[str, dict]:
    """Row A against row B of one workspace, as the table compares them."""
    verdicts = {}
    for a, b in pairs:
        (errors_a, fid_a), (errors_b, fid_b) = (
            (found["rows"][r]["errors"], found["rows"][r]["fid_vs_fp"]) for r in (a, b)
        )
        against = compare_rows(errors_a, errors_b, fid_a, fid_b)
        verdicts[f"{a} vs {b}"] = {key: against[key] for key in VERDICT_KEYS}
    return verdicts


def only_seeds(found: dict, positions: list[int]) -> None:
    """Keep, in every row, the quantization seeds at these positions of ``quant.seeds`` (a subset of a
    workspace run with more seeds reads as a run with those seeds alone: each seed is quantized anew)."""
    for row in found["rows"].values():
        seeds = list(row["errors"])
        row["errors"] = {seeds[i]: row["errors"][seeds[i]] for i in positions}
        row["fid_vs_fp"] = [row["fid_vs_fp"][i] for i in positions]


def curve(
    workspaces: list[Path], rows: list[str], pairs: list[tuple[str, str]] = (), seeds: list[int] | None = None
) -> dict:
    tables = []
    for root in workspaces:
        cfg, found = table_of(root, list(dict.fromkeys([*rows, *(row for pair in pairs for row in pair)])))
        if seeds is not None:
            only_seeds(found, seeds)
        with inside(root):
            gammas = {row: gamma_range(root.resolve(), cfg, row, found["rows"][row]["errors"]) for row in rows}
        tables.append((root, cfg, found, gammas))
    hashes = {found["model_hash"] for _, _, found, _ in tables}
    if len(hashes) > 1:
        raise SystemExit(f"the FP models differ ({', '.join(sorted(hashes))}): the budgets are not paired")
    reference = tables[-1][2]["rows"]
    reference_pairs = pair_verdicts(tables[-1][2], pairs)
    points = []
    for root, cfg, found, gammas in tables:
        point = {"workspace": str(root), **budget_of(cfg), "rows": {}}
        point["seconds"] = {learner: learner_seconds(root, cfg, rows, learner) for learner in LEARNERS}
        for row in rows:
            errors, fid = found["rows"][row]["errors"], found["rows"][row]["fid_vs_fp"]
            per_seed_mse = [float(e.mean()) for e in errors.values()]
            against = compare_rows(errors, reference[row]["errors"], fid, reference[row]["fid_vs_fp"])
            point["rows"][row] = {
                "fid_vs_fp": list(mean_std(fid)),
                "mse_vs_fp": list(mean_std(per_seed_mse)),
                "gamma_range": gammas[row],
                "against_largest": {key: against[key] for key in VERDICT_KEYS},
            }
        point["changes_no_verdict"] = all(
            r["against_largest"]["fid_verdict"] == r["against_largest"]["verdict"] == "within the spread"
            for r in point["rows"].values()
        )
        point["pairs"] = pair_verdicts(found, pairs)
        point["keeps_pair_verdicts"] = all(
            point["pairs"][pair][key] == reference_pairs[pair][key]
            for pair in point["pairs"]
            for key in ("fid_verdict", "verdict")
        )
        points.append(point)
    return {"model_hash": hashes.pop(), "largest": str(workspaces[-1]), "points": points}


def varying(points: list[dict]) -> list[str]:
    """The learners whose budget differs between the points (AdaRound's when none does)."""
    found = [what for what in LEARNERS if len({(p[f"{what}_iters"], p[f"{what}_lr"]) for p in points}) > 1]
    return found or ["recon"]


def budget(point: dict, what: str) -> str:
    return f"{point[f'{what}_iters']} at lr {point[f'{what}_lr']:g}"


def figure(found: dict, rows: list[str], path: Path) -> None:
    """ΔFID and paired MSE against FP per budget, one line per row, the seed spread as error bars."""
    points = found["points"]
    # a learner whose budget is the same at every point goes into the title, not under every tick
    shown = varying(points)
    labels = ["\n".join(f"{p[f'{what}_iters']}\nlr {p[f'{what}_lr']:g}" for what in shown) for p in points]
    xlabel = " / ".join(f"{LEARNERS[what]} iterations, learning rate" for what in shown)
    fixed = [f"{LEARNERS[w]} {budget(points[0], w)}" for w in LEARNERS if w not in shown]
    fig, axes = plt.subplots(1, 2, figsize=(max(11, 1.5 * len(points)), 4))
    for ax, key, title in (
        (axes[0], "fid_vs_fp", "ΔFID vs FP, same noise ↓"),
        (axes[1], "mse_vs_fp", "paired MSE vs FP ↓"),
    ):
        for offset, row in enumerate(rows):
            xs = [i + 0.06 * (offset - (len(rows) - 1) / 2) for i in range(len(points))]
            means = [p["rows"][row][key][0] for p in points]
            spreads = [p["rows"][row][key][1] for p in points]
            ax.errorbar(xs, means, yerr=spreads, marker="o", capsize=3, label=row)
        ax.set_xticks(range(len(points)), labels, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    held = f"; {', '.join(fixed)} throughout" if fixed else ""
    fig.suptitle(f"Rows against the LES / AdaRound budget (mean ± spread over quantization seeds{held})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# compare_rows' verdict, difference, its seed spread and the digits shown, by FID and by pixel error
BY_FID, BY_PIXELS = ("fid_verdict", "fid_diff", "fid_diff_std", 1), ("verdict", "mse_diff", "mse_diff_std", 4)


def _against(verdict: dict, metric: tuple) -> str:
    """A row's verdict against itself at the largest budget (the spread shown for FID only)."""
    key, diff, spread, digits = metric
    if verdict[key] == "within the spread":
        return "within"
    shown = f" ± {verdict[spread]:.{digits}f}" if metric is BY_FID else ""
    return f"{'closer' if verdict[diff] < 0 else 'farther'} by {abs(verdict[diff]):.{digits}f}{shown}"


def _pair(verdict: dict, a: str, b: str, key: str) -> str:
    return {"within the spread": "within", "A closer to FP": f"`{a}` closer", "B closer to FP": f"`{b}` closer"}.get(
        verdict[key], verdict[key]
    )


def markdown(found: dict, rows: list[str]) -> str:
    """The curve as a Markdown table, a line per budget: each row against itself at the largest budget
    (FID; pixel error), how many of those verdicts moved, each pair's verdicts within the budget (FID;
    pixel error, in bold where they differ from the largest budget's; with the differences at the
    largest), and the varying learners' seconds per weights entry (min–max over the entries)."""
    points, shown = found["points"], varying(found["points"])
    header = ["budget", *(f"`{row}`" for row in rows), "moved"]
    pairs = list(points[-1]["pairs"])
    header += ["`{}` vs `{}`".format(*pair.split(" vs ")) for pair in pairs]
    header += [f"{LEARNERS[what]} s an entry, its seeds summed" for what in shown]
    numbers = {"moved", *header[-len(shown) :]}  # right-aligned
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if h in numbers else "---|" for h in header)]
    largest = points[-1]
    for point in points:
        label = ", ".join(f"{LEARNERS[what]} {budget(point, what)}" for what in shown)
        if point is largest:
            cells = [
                f"ΔFID {r['fid_vs_fp'][0]:.1f} ± {r['fid_vs_fp'][1]:.1f}, MSE {r['mse_vs_fp'][0]:.4f}"
                for r in (point["rows"][row] for row in rows)
            ]
            cells.append("–")
            label += " (largest)"
        else:
            verdicts = [point["rows"][row]["against_largest"] for row in rows]
            cells = [f"{_against(v, BY_FID)}; {_against(v, BY_PIXELS)}" for v in verdicts]
            cells.append(str(sum(_against(v, metric) != "within" for v in verdicts for metric in (BY_FID, BY_PIXELS))))
        for pair in pairs:
            a, b = pair.split(" vs ")
            texts = []
            for key, diff, spread, digits in (BY_FID, BY_PIXELS):
                text = _pair(point["pairs"][pair], a, b, key)
                if point is largest:
                    text += f" ({point['pairs'][pair][diff]:+.{digits}f} ± {point['pairs'][pair][spread]:.{digits}f})"
                elif point["pairs"][pair][key] != largest["pairs"][pair][key]:
                    text = f"**{text}**"
                texts.append(text)
            cells.append("; ".join(texts))
        for what in shown:
            seconds = point["seconds"][what] or [0.0]
            cells.append(f"{min(seconds):,.0f}–{max(seconds):,.0f}".replace(",", " "))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspaces", type=Path, nargs="+", help="one per budget, the largest last")
    parser.add_argument("--rows", nargs="+", required=True)
    parser.add_argument("--pairs", nargs="*", default=[], help="A:B, row A against row B within each budget")
    parser.add_argument("--seeds", nargs="+", type=int, help="positions in quant.seeds to keep (default: all)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--figure", type=Path)
    parser.add_argument("--markdown", type=Path, help="the curve as a table, for the docs")
    args = parser.parse_args()
    found = curve(args.workspaces, args.rows, [tuple(pair.split(":")) for pair in args.pairs], args.seeds)
    for point in found["points"]:
        learners = ", ".join(f"{LEARNERS[what]} {budget(point, what)}" for what in LEARNERS)
        print(f"{learners}: changes no verdict against the largest: {point['changes_no_verdict']}")
        for row, r in point["rows"].items():
            (fid, fid_s), (mse, mse_s), vs = r["fid_vs_fp"], r["mse_vs_fp"], r["against_largest"]
            print(
                f"  {row:<18} ΔFID {fid:7.1f} ± {fid_s:4.1f}  MSE {mse:.5f} ± {mse_s:.5f}  γ {r['gamma_range']}  "
                f"vs largest: {vs['fid_verdict']} / {vs['verdict']}"
            )
        if point["pairs"]:
            print(f"  keeps the largest budget's verdicts of the pairs: {point['keeps_pair_verdicts']}")
        for pair, v in point["pairs"].items():
            print(
                f"  {pair:<36} ΔFID {v['fid_diff']:+6.1f} ± {v['fid_diff_std']:4.1f} {v['fid_verdict']:<18} "
                f"MSE {v['mse_diff']:+.4f} ± {v['mse_diff_std']:.4f} {v['verdict']}"
            )
    if args.json:
        args.json.write_text(json.dumps(found, indent=1) + "\n")
    if args.figure:
        figure(found, args.rows, args.figure)
    if args.markdown:
        args.markdown.write_text(markdown(found, args.rows))


if __name__ == "__main__":
    main()
