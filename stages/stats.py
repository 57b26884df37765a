"""Stage stats: per layer x step x channel statistics of the dumped layer inputs -> artifacts/stats.zarr,
reports/stats.json, the outlier-ratio table and two figures."""

from pipeline.calibration.dump import open_calibration
from pipeline.calibration.stats import (
    layer_statistics,
    showcase_layers,
    summary,
    write_outlier_table,
    write_stats_store,
)
from pipeline.infra.figures import plot_channel_ranges, plot_outlier_heatmap
from pipeline.infra.storage import atomic_store
from pipeline.preflight import load_config
from stages.layout import CALIB, STATS, STATS_HEATMAP_FIG, STATS_JSON, STATS_RANGES_FIG, STATS_TABLE
from stages.lineage import check_input, stage_provenance, write_report


def main() -> None:
    cfg = load_config(model_checks=False)
    calib = open_calibration(CALIB)
    check_input(calib.attrs, cfg, "dump", None, CALIB)  # stats does not read the model: its hash comes from calib
    stats = layer_statistics(calib, cfg.stats.percentile)
    steps = calib.attrs["steps"]
    provenance = stage_provenance(cfg, "stats", calib.attrs["model_hash"])
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
