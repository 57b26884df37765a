"""Stage report: the paper's tables from the metrics of every row -> reports/paper_table.md,
reports/ablation.md, FID against activation bits, and the samples of each method at one bit-width
next to FP's. Refuses metrics that the current params did not produce."""

import datetime

from pipeline.config import Config
from pipeline.eval.report import (
    ABLATION_COLUMNS,
    COLUMNS,
    plot_fid_against_activation_bits,
    plot_sample_grids,
    report_document,
)
from pipeline.eval.sampling import read_samples
from pipeline.infra.storage import ArtifactError, read_json, write_text
from pipeline.preflight import load_config
from stages.layout import ABLATION, FID_FIG, FP, GRIDS_FIG, PAPER_TABLE, STATS_HEATMAP_FIG, metrics_path, samples_path
from stages.lineage import stage_provenance

GRID_SIDE = 6  # samples per side of each method's grid: only these are read from the stores


def current_record(cfg: Config, name: str) -> dict:
    record = read_json(metrics_path(name))
    stage, variant = ("fid_fp", None) if name == FP else ("peer" if name in cfg.peers else "fid", cfg.row_variant(name))
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
        f"sampling: DDIM {cfg.diffusion.steps} steps, eta {sample.eta}, {sample.num_samples} samples per seed, seeds "
        f"{', '.join(map(str, sample.seeds))}",
        f"calibration: {calib.num_samples} trajectories, {calib.layer_records_per_step} layer records per step",
        f"LES: {cfg.les.iters} iterations per layer, lr {cfg.les.lr}, r = {cfg.les.focal_r}; AdaRound: "
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
    ]


def main() -> None:
    cfg = load_config()
    report = cfg.report
    records = {name: current_record(cfg, name) for name in [FP, *dict.fromkeys(report.table + report.ablation)]}
    fp = records[FP]
    setup = configuration(cfg, fp)
    spread = (
        "± is the standard deviation over the sampling seeds (the same quantized model, other noise). Every row is "
        "sampled from the same seeds as FP, so that noise is shared: read ΔFID (the row's FID minus FP's on the same "
        "seed), whose ± is the run-to-run spread a difference between rows has to beat."
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
    panels = [
        (records[name]["label"], read_samples(samples_path(name), GRID_SIDE**2)[0][seed])
        for name in [FP, *at_grid_bits]
    ]
    plot_sample_grids(panels, GRIDS_FIG, GRID_SIDE)


if __name__ == "__main__":
    main()
