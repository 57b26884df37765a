"""Stage report: the paper's tables from the metrics of every row -> reports/paper_table.md,
reports/ablation.md, FID against activation bits, and the samples of each method at one bit-width
next to FP's. Refuses metrics that the current params did not produce."""

import csv
import datetime
import statistics

import torch

from pipeline.config import Config
from pipeline.eval.paired import per_sample_mse
from pipeline.eval.report import (
    ABLATION_COLUMNS,
    COLUMNS,
    compare_rows,
    comparisons_document,
    plot_fid_against_activation_bits,
    plot_les_effect,
    plot_sample_grids,
    report_document,
    rows_against_fp,
)
from pipeline.eval.sampling import read_samples
from pipeline.infra.storage import ArtifactError, read_json, write_text
from pipeline.params import load_config
from stages.layout import (
    ABLATION,
    COMPARISONS,
    FID_FIG,
    FP,
    GRIDS_FIG,
    LES_EFFECT_FIG,
    PAPER_TABLE,
    STATS_HEATMAP_FIG,
    STATS_TABLE,
    metrics_path,
    report_path,
    samples_path,
)
from stages.lineage import stage_provenance

GRID_SIDE = 6  # samples per side of each method's grid: only these are read from the stores


def current_record(cfg: Config, name: str) -> dict:
    record = read_json(metrics_path(name))
    if name == FP:
        stage, variant = "fid_fp", None
    else:
        stage = "peer" if name in cfg.peers else "guard" if name in cfg.guards else "fid"
        variant = cfg.row_variant(name)
    expected = stage_provenance(cfg, stage, record["provenance"]["model_hash"], variant)["params_hash"]
    if record["provenance"]["params_hash"] != expected:
        raise ArtifactError(
            f"{metrics_path(name)} was made with other parameters than the current ones; run `dvc repro` first"
        )
    return record


def configuration(cfg: Config, fp: dict) -> list[str]:
    sample, calib, weights = cfg.sample, cfg.calib, cfg.weights
    return [
        f"generated {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC by `dvc repro` (stage report); FP "
        f"model {fp['provenance']['model_hash']}",
        f"quantization seeds {', '.join(map(str, cfg.quant.seeds))} (each draws the calibration records and "
        "orders the LES and AdaRound batches)",
        f"sampling: DDIM {cfg.diffusion.steps} steps, eta {sample.eta}, {sample.num_samples} samples per noise seed, "
        f"noise seeds {', '.join(map(str, sample.seeds))} (shared by every row and quantization seed)",
        f"calibration: {calib.num_samples} trajectories, {calib.layer_records_per_step} layer records per step",
        f"LES: {cfg.les.iters} iterations per layer, lr {cfg.les.learning_rate:g}, r = {cfg.les.focal_r}; AdaRound: "
        f"{cfg.recon.iters} iterations per block, {cfg.recon.records} records",
        f"PTS: τ = {cfg.pts.ratio_threshold}, {cfg.pts.num_candidates} candidates, layers {cfg.pts.layers}",
        "rows: "
        + "; ".join(
            f"{name} = {row.method + ' on ' if row.method else ''}weights {row.weights} "
            f"({weights[row.weights].method}) + A{row.a_bits}"
            for name, row in cfg.rows.items()
        ),
        *(
            f"peer {name}: {p.library} W{p.w_bits}A{p.a_bits}, {p.calib_records} calibration records"
            for name, p in cfg.peers.items()
        ),
        *(
            f"guard {name}: {g.les} or {g.no_les} per quantization seed, whichever is closer to FP on "
            f"{cfg.guard.num_samples} held-out samples (noise seed {cfg.guard.seed})"
            for name, g in cfg.guards.items()
        ),
    ]


def main() -> None:
    cfg = load_config(model_checks=False)
    report = cfg.report
    records = {name: current_record(cfg, name) for name in [FP, *dict.fromkeys(report.table + report.ablation)]}
    fp = records[FP]
    setup = configuration(cfg, fp)
    spread = (
        "± is the standard deviation over the quantization seeds (FP: over the noise seeds): each seed quantizes the "
        "model anew (calibration draw, LES and AdaRound batch orders), and every row and seed is sampled from the same "
        "noise as FP. ΔFID is the row's FID minus FP's on the same noise. A difference between rows counts only "
        f"beyond that spread: `{COMPARISONS}` compares rows sample by sample and says which differences do."
    )
    peers = [
        f"{records[name]['label']} ({name}) is a peer row: another library on the same model, calibration data, "
        "seeds and metric."
        for name in report.table
        if name in cfg.peers
    ]
    table = [fp, *(records[name] for name in report.table)]
    write_text(
        PAPER_TABLE,
        report_document(
            "Paper table",
            table,
            fp["features"],
            [spread, *peers, f"Outlier statistics: `{STATS_HEATMAP_FIG}`."],
            setup,
            COLUMNS,
            report.protocol_samples,
        ),
    )
    ablation = [fp, *(records[name] for name in report.ablation)]
    write_text(
        ABLATION,
        report_document(
            "Ablation",
            ablation,
            fp["features"],
            [spread, "MSE / PSNR vs FP: per-sample pixel error against the FP sample from the same noise."],
            setup,
            ABLATION_COLUMNS,
            report.protocol_samples,
        ),
    )
    plot_fid_against_activation_bits(table, FID_FIG)
    seed = cfg.sample.seeds[0]
    at_grid_bits = [name for name in report.table if cfg.row_variant(name).label == report.grid_bits]
    panels = [(records[FP]["label"], read_samples(samples_path(FP), GRID_SIDE**2)[0][seed])]
    first = str(cfg.quant.seeds[0])  # a row's samples of its first quantization seed (a guard's: the row it kept)
    panels += [
        (records[n]["label"], read_samples(quant_seed_samples(n, records[n], first), GRID_SIDE**2)[0][seed])
        for n in at_grid_bits
    ]
    plot_sample_grids(panels, GRIDS_FIG, GRID_SIDE)
    write_text(COMPARISONS, comparisons(cfg, records))
    plot_les_effect(les_effect_points(cfg, report.table + report.ablation), LES_EFFECT_FIG)


def quant_seed_samples(name: str, record: dict, seed: str):
    """The samples store of row ``name``'s quantization seed ``seed`` (a guard's: the row it kept)."""
    return samples_path(record["quant_seeds"][seed].get("row", name), int(seed))


def sample_errors(cfg: Config, name: str, record: dict, fp: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per quantization seed, the per-sample error against FP of every noise seed's samples of row
    ``name`` (a guard's: those of the row it kept for that seed)."""
    errors = {}
    for seed in record["quant_seeds"]:
        runs, _ = read_samples(quant_seed_samples(name, record, seed))
        errors[seed] = torch.cat([per_sample_mse(fp[s], runs[s]) for s in cfg.sample.seeds])
    return errors


def comparisons(cfg: Config, records: dict[str, dict]) -> str:
    """DMQ's rows against the best other row of their bit-width (lowest mean paired error), and each
    ablation row against the ablation's first row of its bit-width."""
    fp, _ = read_samples(samples_path(FP))
    names = [name for name in dict.fromkeys(cfg.report.table + cfg.report.ablation)]
    errors = {name: sample_errors(cfg, name, records[name], fp) for name in names}
    fid = {
        name: [
            run.get("fid_vs_fp") for run in rows_against_fp([records[FP], records[name]], str(metrics_path(FP)))[1].runs
        ]
        for name in names
    }
    fid = {name: values if None not in values else [] for name, values in fid.items()}
    pairs = []
    for bits in dict.fromkeys(cfg.row_variant(n).label for n in cfg.report.table):
        group = [n for n in cfg.report.table if cfg.row_variant(n).label == bits]
        ours = [n for n in group if records[n]["method"].startswith("dmq")]
        others = [n for n in group if n not in ours]
        if not ours or not others:
            continue
        best = min(others, key=lambda n: records[n]["mean"]["paired_mse"])
        pairs += [(n, best, compare_rows(errors[n], errors[best], fid[n], fid[best])) for n in ours]
    reference: dict[str, str] = {}  # per bit-width, the ablation's first row of it
    for n in cfg.report.ablation:
        first = reference.setdefault(cfg.row_variant(n).label, n)
        if n != first:
            pairs.append((n, first, compare_rows(errors[n], errors[first], fid[n], fid[first])))
    note = (
        "Per-sample error = mean squared pixel difference from the FP sample of the same noise. Seed spread: the "
        "standard deviation over quantization seeds of the per-seed difference of means; SE: the standard error "
        "of the mean over all paired samples. A difference counts (a verdict other than 'within the spread') "
        "only when it exceeds both. At each bit-width, DMQ's rows face the best other row by mean error; the "
        "ablation rows face the ablation's first row of their bit-width."
    )
    return comparisons_document(pairs, note)


def les_effect_points(cfg: Config, names: list[str]) -> list[tuple[str, float, float]]:
    """(weights entry, outlier ratio, relative LES-loss change) per layer of every LES entry of the rows."""
    ratios: dict[str, float] = {}
    with STATS_TABLE.open() as f:
        for line in csv.DictReader(f):
            ratios[line["layer"]] = max(ratios.get(line["layer"], 0.0), float(line["outlier_ratio"]))
    points = []
    entries = dict.fromkeys(cfg.rows[n].weights for n in names if n in cfg.rows)
    for entry in entries:
        report = read_json(report_path("les", entry))
        if not report["les"]:
            continue
        per_layer: dict[str, list[float]] = {}
        for found in report["quant_seeds"].values():
            for layer, losses in found["layers"].items():
                per_layer.setdefault(layer, []).append(losses["loss_after"] / losses["loss_before"] - 1)
        points += [(entry, ratios[layer], statistics.fmean(c)) for layer, c in per_layer.items() if layer in ratios]
    return points


if __name__ == "__main__":
    main()
