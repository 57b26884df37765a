"""Paper-style Markdown tables from metrics: FP first, then one row per method and bit-width.

A row may hold several runs (seeds); each cell then shows ``mean ± std`` over them."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

COLUMNS = (  # (metric key, header, digits)
    ("fid", "FID ↓", 2),
    ("kid", "KID ↓", 1),
    ("isc", "ISC ↑", 2),
    ("precision", "Precision ↑", 3),
    ("recall", "Recall ↑", 3),
)


@dataclass
class Row:
    method: str
    bits: str  # "W4A6", or "32/32" for the FP model
    runs: list[dict] = field(default_factory=list)  # one metrics dict per seed


def cell(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(rows: list[Row], steps: int, feature_note: str, columns=COLUMNS) -> str:
    """Rows in the given order; the caption says which features the metrics use."""
    header = ["Method", "Bits", *(h for _, h, _ in columns), "Steps", "Samples"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for row in rows:
        values = [cell([run[key] for run in row.runs if key in run], digits) for key, _, digits in columns]
        samples = sorted({run.get("num_samples") for run in row.runs})
        seeds = f" × {len(row.runs)} seeds" if len(row.runs) > 1 else ""
        sample_text = "/".join(str(s) for s in samples) + seeds
        lines.append("| " + " | ".join([row.method, row.bits, *values, str(steps), sample_text]) + " |")
    lines.append("")
    lines.append(f"Metrics on {feature_note}; DDIM with {steps} steps.")
    return "\n".join(lines) + "\n"
