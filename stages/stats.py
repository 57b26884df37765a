"""Stage stats: per layer x step x channel statistics of every quantizable layer's FP input, captured
on calib.layer_records_per_step records of each step -> artifacts/stats.zarr, reports/stats.json, the
outlier-ratio table and two figures."""

from pipeline.calibration.capture import Budget
from pipeline.calibration.dump import open_calibration, record_denoiser, records_per_step
from pipeline.calibration.stats import (
    layer_statistics,
    showcase_layers,
    summary,
    write_outlier_table,
    write_stats_store,
)
from pipeline.infra.device import resolve_device
from pipeline.infra.figures import plot_channel_ranges, plot_outlier_heatmap
from pipeline.infra.fingerprint import model_hash
from pipeline.infra.storage import atomic_store
from pipeline.models.diffusion import load_fp_model
from pipeline.params import load_config
from pipeline.quant import quantizable_layers
from stages.layout import CALIB, FP_MODEL, STATS, STATS_HEATMAP_FIG, STATS_JSON, STATS_RANGES_FIG, STATS_TABLE
from stages.lineage import check_input, stage_provenance, write_report


def main() -> None:
    cfg = load_config()
    device = resolve_device(cfg.device)
    calib = open_calibration(CALIB)
    fp_hash = model_hash(FP_MODEL)
    check_input(calib.attrs, cfg, "dump", fp_hash, CALIB)
    unet, _ = load_fp_model(FP_MODEL)
    capture = cfg.capture
    stats = layer_statistics(
        record_denoiser(FP_MODEL, unet, calib).to(device),
        quantizable_layers(unet),
        calib,
        min(cfg.calib.layer_records_per_step, records_per_step(calib)),
        cfg.stats.percentile,
        Budget.from_config(capture),
        device,
        capture.batch_size,
    )
    steps = calib.attrs["steps"]
    provenance = stage_provenance(cfg, "stats", fp_hash)
    with atomic_store(STATS) as tmp:
        write_stats_store(tmp, stats, {**provenance, "steps": steps, "percentile": cfg.stats.percentile})
    report = {
        "steps": steps,
        "percentile": cfg.stats.percentile,
        "model_hash": provenance["model_hash"],
        "params_hash": provenance["params_hash"],
    }
    write_report(STATS_JSON, {**report, **summary(stats)})
    write_outlier_table(stats, STATS_TABLE)
    plot_channel_ranges(stats, showcase_layers(stats), steps // 2, STATS_RANGES_FIG)
    plot_outlier_heatmap(stats, STATS_HEATMAP_FIG)


if __name__ == "__main__":
    main()
