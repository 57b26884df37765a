"""Paper-style Markdown tables and figures from the per-row metrics records: FP first, then one row
per method and bit-width.

A quantized row holds one run per quantization seed (its metrics averaged over the noise seeds, which
every row shares with FP); each cell shows ``mean ± std`` over those runs (sample standard deviation),
the spread that decides a ranking. FP's runs are its noise seeds. Row against row, the samples are
compared one by one on the same noise (:func:`compare_rows`)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config import Variant
from pipeline.infra.figures import plt, save_figure
from pipeline.infra.fingerprint import check_same_model
from pipeline.infra.machine import environment

COLUMNS = (  # (metric key, header, digits); a column no row has a value for is left out
    ("fid", "FID ↓", 2),
    ("fid_vs_fp", "ΔFID vs FP ↓", 2),
    ("sfid", "sFID ↓", 2),
    ("clip_score", "CLIP score ↑", 2),
    ("kid", "KID ↓", 1),
    ("isc", "ISC ↑", 2),
    ("precision", "Precision ↑", 3),
    ("recall", "Recall ↑", 3),
)
ABLATION_COLUMNS = (
    ("fid", "FID ↓", 2),
    ("fid_vs_fp", "ΔFID vs FP ↓", 2),
    ("sfid", "sFID ↓", 2),
    ("clip_score", "CLIP score ↑", 2),
    ("paired_mse", "MSE vs FP ↓", 5),
    ("paired_psnr_db", "PSNR vs FP (dB) ↑", 2),
    ("confident_share", "Confident ↑", 3),
)
PAIRED_COLUMNS = (  # what a table without distribution metrics shows
    ("paired_mse", "MSE vs FP ↓", 5),
    ("paired_psnr_db", "PSNR vs FP (dB) ↑", 2),
)
FP_VARIANT = Variant("FP", 32, 32)
NOT_COMPUTED = (
    "FID and sFID were not computed: there are no Inception features. Set `eval.inception_weights` (InceptionV3 "
    "weights for torch-fidelity's inception-v3-compat) and `eval.reference_images` (a folder of real images) to "
    "compute them; the table shows the paired error against FP on the same seeds."
)


def metrics_record(label: str, variant: Variant | None, steps: int, found: dict, provenance: dict) -> dict:
    """What a fid (or peer) stage writes for one row: the metrics of each seed and their mean."""
    variant = variant or FP_VARIANT
    return {
        "label": label,
        **variant._asdict(),
        "steps": steps,
        **found,
        # strings, so that `dvc metrics diff` does not list them as numbers
        "provenance": {
            "model_hash": provenance["model_hash"],
            "params_hash": provenance["params_hash"],
            "seeds": ", ".join(f"{key}={value}" for key, value in provenance["seeds"].items()),
            "environment": environment(),
        },
    }


@dataclass
class Row:
    method: str
    bits: str  # "W4A6", or "32/32" for the FP model
    runs: list[dict] = field(default_factory=list)  # one metrics dict per quantization seed (FP: per noise seed)


def _seed_mean(per_noise_seed: dict[str, dict], fp_seeds: dict[str, dict]) -> dict:
    """One quantization seed's run: each metric averaged over the noise seeds, with ``fid_vs_fp``, the
    FID minus FP's on the same noise seed."""
    runs = [run for seed, run in per_noise_seed.items() if seed in fp_seeds]
    keys = set.intersection(*(set(run) for run in runs))
    mean = {key: statistics.fmean(run[key] for run in runs) for key in keys}
    if "fid" in mean:
        mean["fid_vs_fp"] = statistics.fmean(per_noise_seed[s]["fid"] - fp_seeds[s]["fid"] for s in per_noise_seed)
    return mean


def rows_against_fp(records: list[dict], fp_source: str = "the FP record") -> list[Row]:
    """Table rows of the records, FP's first. Every row is sampled from FP's noise seeds, so the noise
    of FID is shared: each run also gets ``fid_vs_fp``, its FID minus FP's on the same noise. A FP record
    (read from ``fp_source``) of another FP model than a row's is refused: a partial ``dvc repro fid@ROW``
    leaves git's."""
    fp, *others = records
    bits = "32/32"
    rows = [Row(fp["method"], bits, list(fp["seeds"].values()))]
    for record in others:
        check_same_model(fp["provenance"], record["provenance"]["model_hash"], fp_source)
        runs = [_seed_mean(found["seeds"], fp["seeds"]) for found in record["quant_seeds"].values()]
        rows.append(Row(record["method"], f"W{record['w_bits']}A{record['a_bits']}", runs))
    return rows


def guarded_record(records: dict[str, dict], decisions: dict[str, dict], provenance: dict) -> dict:
    """The metrics record of a guard row: per quantization seed, the run of the row it kept
    (``decisions[seed]["kept"]``: "les" or "no_les", keys of ``records``)."""
    les = records["les"]
    per_seed = {
        seed: {**records[decision["kept"]]["quant_seeds"][seed], "kept": decision["kept"], "row": decision["row"]}
        for seed, decision in decisions.items()
    }
    means = [found["mean"] for found in per_seed.values()]
    record = metrics_record(
        f"{les['label']} + guard",
        Variant(f"{les['method']}+guard", les["w_bits"], les["a_bits"]),
        les["steps"],
        {
            "features": les["features"],
            "quant_seeds": per_seed,
            "mean": {k: statistics.fmean(m[k] for m in means) for k in means[0]},
        },
        provenance,
    )
    return record


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


OPTIONAL = {"sfid", "clip_score", "confident_share"}  # shown only where some row has them


def shown_columns(rows: list[Row], columns) -> list:
    """The columns of the table: the optional ones (sFID with Inception features, the CLIP score of a
    text-to-image model, the digits' confident share) where some row has them; without FID (a model
    measured without a feature extractor) only the columns with values, and the paired error."""
    has = {key for row in rows for run in row.runs for key in run}
    if "fid" in has:
        return [c for c in columns if c[0] in has or c[0] not in OPTIONAL]
    present = [c for c in columns if c[0] in has]
    return present + [c for c in PAIRED_COLUMNS if c not in present]


def markdown_table(
    rows: list[Row], steps: int, feature_note: str, columns=COLUMNS, protocol_samples: int | None = None
) -> str:
    """Rows in the given order; the caption says which features the metrics use. With the protocol's
    sample count, the Samples header names it."""
    columns = shown_columns(rows, columns)
    samples_header = "Samples" if protocol_samples is None else f"Samples (protocol: {protocol_samples})"
    header = ["Method", "Bits", *(h for _, h, _ in columns), "Steps", samples_header]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for row in rows:
        values = [cell([run[key] for run in row.runs if key in run], digits) for key, _, digits in columns]
        samples = sorted({round(run.get("num_samples", 0)) for run in row.runs})
        kind = "noise" if row.method == FP_VARIANT.method else "quantization"
        seeds = f" × {len(row.runs)} {kind} seeds" if len(row.runs) > 1 else ""
        sample_text = "/".join(str(s) for s in samples) + seeds
        lines.append("| " + " | ".join([row.method, row.bits, *values, str(steps), sample_text]) + " |")
    lines.append("")
    lines.append(f"Metrics on {feature_note}; DDIM with {steps} steps.")
    return "\n".join(lines) + "\n"


def protocol_warning(records: list[dict], protocol_samples: int | None) -> str | None:
    """A sentence for the header of a table computed on fewer samples than the paper's protocol."""
    if protocol_samples is None:
        return None
    fewest = min(run.get("num_samples", 0) for record in records for run in record["seeds"].values())
    if fewest >= protocol_samples:
        return None
    return (
        f"**Computed on {fewest:g} samples per seed, fewer than the protocol's {protocol_samples}**: FID and sFID "
        "are biased upward at small sample counts, so these values are not comparable with the paper's."
    )


def report_document(
    title: str,
    records: list[dict],
    feature_note: str,
    notes: list[str],
    configuration: list[str],
    columns=COLUMNS,
    protocol_samples: int | None = None,
) -> str:
    """A Markdown report: a warning when the table has fewer samples than the protocol, the table (FP
    first), notes under it (with the metrics that were not computed), and the configuration that
    produced it (so a committed copy says what it shows)."""
    rows = rows_against_fp(records)
    table = markdown_table(rows, records[0]["steps"], feature_note, columns, protocol_samples)
    warning = protocol_warning(records, protocol_samples)
    missing = [] if any("fid" in run for row in rows for run in row.runs) else [NOT_COMPUTED, ""]
    lines = [
        f"# {title}",
        "",
        *([warning, ""] if warning else []),
        table,
        *missing,
        *notes,
        "",
        "## Configuration",
        "",
        *(f"- {item}" for item in configuration),
        "",
    ]
    return "\n".join(lines)


def plot_fid_against_activation_bits(records: list[dict], path: str | Path) -> None:
    """ΔFID against FP on the same seeds (mean ± std over seeds) against activation bits, one line per
    method and weight bits; FP (the first record) is the zero line. The y axis is linear within ±10
    and logarithmic beyond, so a row far off does not flatten the others."""
    fp, *others = records
    fp_row, *rows = rows_against_fp(records)
    fig, ax = plt.subplots(figsize=(7.5, 4), dpi=100)
    if not any("fid" in run for run in fp_row.runs):
        ax.text(0.5, 0.5, NOT_COMPUTED.split(":")[0] + " (no Inception features)", ha="center", va="center")
        ax.axis("off")
        save_figure(fig, path)
        return
    mean, std = mean_std([run["fid"] for run in fp_row.runs])
    ax.axhline(0, color="grey", linewidth=1, label=f"FP (FID {mean:.1f} ± {std:.1f})")
    groups: dict[tuple[str, int], list[tuple[int, Row]]] = {}
    for record, row in zip(others, rows):
        groups.setdefault((record["method"], record["w_bits"]), []).append((record["a_bits"], row))
    offsets = [0.3 * (i / max(len(groups) - 1, 1) - 0.5) for i in range(len(groups))]  # so error bars do not overlap
    for offset, ((method, w_bits), group) in zip(offsets, groups.items()):
        group.sort(key=lambda item: item[0])
        points = [mean_std([run["fid_vs_fp"] for run in row.runs]) for _, row in group]
        ax.errorbar(
            [a_bits + offset for a_bits, _ in group],
            [m for m, _ in points],
            yerr=[s for _, s in points],
            marker="o",
            capsize=3,
            label=f"{method} W{w_bits}",
        )
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("activation bits")
    ax.set_ylabel(f"ΔFID vs FP, same seeds ({fp['features']}) ↓")
    ax.set_xticks(sorted({r["a_bits"] for r in others}))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title("FID minus FP's FID on the same seeds (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_sample_grids(panels: list[tuple[str, torch.Tensor]], path: str | Path, per_side: int = 6) -> None:
    """The first ``per_side``² samples of each panel (same seed, so the same noise), side by side."""
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.5), dpi=100, squeeze=False)
    for ax, (title, images) in zip(axes[0], panels):
        side = min(per_side, math.isqrt(len(images)))
        tiles = images[: side * side, 0].clamp(-1, 1)
        h, w = tiles.shape[1:]
        canvas = tiles.reshape(side, side, h, w).permute(0, 2, 1, 3).reshape(side * h, side * w)
        ax.imshow(canvas.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def compare_rows(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], fid_a: list[float], fid_b: list[float]
) -> dict[str, float | str]:
    """Row A against row B on the same noise: ``a[q]`` / ``b[q]`` are the per-sample errors against FP
    (one value per sample, every noise seed) of each quantization seed; ``fid_a`` / ``fid_b`` their
    ΔFID per quantization seed (empty without FID). Seeds are paired in order (independent draws).

    The difference of means per seed gives the mean and its spread over quantization seeds; pooled
    over seeds, the per-sample differences give the standard error of the paired mean, the median
    (the tail of a few mode-changing trajectories dominates the mean) and the share of samples on
    which A is closer to FP. A difference counts when it exceeds both the seed spread and twice the
    standard error."""
    pairs = list(zip(a.values(), b.values()))
    per_seed = [float((x - y).mean()) for x, y in pairs]
    pooled = torch.cat([x - y for x, y in pairs]).double()
    mean, spread = mean_std(per_seed)
    se = float(pooled.std() / math.sqrt(len(pooled))) if len(pooled) > 1 else 0.0
    found = {
        "mse_diff": mean,
        "mse_diff_std": spread,
        "mse_diff_se": se,
        "mse_diff_median": float(pooled.median()),
        "a_closer_share": float((pooled < 0).double().mean()),
        "seeds": len(per_seed),
    }
    found["verdict"] = _verdict(mean, spread, se, len(per_seed))
    if fid_a and fid_b:
        diffs = [x - y for x, y in zip(fid_a, fid_b)]
        fid_mean, fid_spread = mean_std(diffs)
        found.update(
            fid_diff=fid_mean, fid_diff_std=fid_spread, fid_verdict=_verdict(fid_mean, fid_spread, 0.0, len(diffs))
        )
    return found


def _verdict(mean: float, spread: float, se: float, seeds: int) -> str:
    if seeds < 2:
        return "undecided (one quantization seed: no spread)"
    if abs(mean) <= max(spread, 2 * se):
        return "within the spread"
    return "A closer to FP" if mean < 0 else "B closer to FP"


def comparisons_document(pairs: list[tuple[str, str, dict]], note: str) -> str:
    """A Markdown table of :func:`compare_rows` results, one line per (A, B) pair."""
    header = (
        "| A | B | ΔMSE (A − B) ± seed spread | SE (samples) | median | A closer on | MSE verdict | "
        "ΔFID (A − B) ± seed spread | FID verdict |"
    )
    lines = ["# Row against row on the same noise", "", note, "", header, "|---|---|---:|---:|---:|---:|---|---:|---|"]
    for a, b, c in pairs:
        fid = f"{c['fid_diff']:+.2f} ± {c['fid_diff_std']:.2f}" if "fid_diff" in c else "–"
        lines.append(
            f"| {a} | {b} | {c['mse_diff']:+.5f} ± {c['mse_diff_std']:.5f} | {c['mse_diff_se']:.5f} | "
            f"{c['mse_diff_median']:+.5f} | {100 * c['a_closer_share']:.0f} % | {c['verdict']} | {fid} | "
            f"{c.get('fid_verdict', '–')} |"
        )
    return "\n".join(lines) + "\n"


def plot_les_effect(points: list[tuple[str, float, float]], path: str | Path) -> float:
    """One point per (LES entry, layer): the layer's inter-channel outlier ratio (max over steps) against
    the relative change of its LES loss from γ = 1 to the learned γ (mean over quantization seeds).
    Returns Spearman's rank correlation of the two."""
    ratios = torch.tensor([r for _, r, _ in points], dtype=torch.float64)
    changes = torch.tensor([c for _, _, c in points], dtype=torch.float64)
    rho = _spearman(ratios, changes) if len(points) > 2 else float("nan")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for entry in dict.fromkeys(e for e, _, _ in points):
        chosen = [(r, c) for e, r, c in points if e == entry]
        ax.scatter([r for r, _ in chosen], [100 * c for _, c in chosen], s=14, label=entry)
    ax.axhline(0, color="grey", linewidth=1)
    ax.set_xlabel("outlier ratio of the input (max / median channel range, max over steps)")
    ax.set_ylabel("LES loss change, learned γ vs γ = 1 (%)")
    ax.set_title(f"Where LES lowers the layer error (Spearman ρ = {rho:.2f})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return rho


def _spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rank_x, rank_y = x.argsort().argsort().double(), y.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rank_x, rank_y]))[0, 1])
