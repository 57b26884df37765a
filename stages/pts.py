"""Stage pts@<row>: activation calibration on the weight-quantized network, per step (with PTS voting
for the methods that use it) or shared by all steps (Q-Diffusion), once per quantization seed (the seed
draws the records) -> artifacts/act_params/<row>/q<seed>.safetensors, artifacts/votes/<row>/q<seed>.zarr."""

import zarr

from pipeline.calibration.dump import open_calibration, record_denoiser
from pipeline.calibration.stats import auto_pts_layers, open_stats
from pipeline.config import Config
from pipeline.infra.device import resolve_device
from pipeline.infra.fingerprint import model_hash
from pipeline.infra.storage import atomic_store, write_tensors
from pipeline.method.activation_ranges import calibrate_activations, calibrate_shared_activations
from pipeline.method.pts import PTSVoter, select_pts_layers, vote_summary
from pipeline.methods import METHODS
from pipeline.models.quantized import load_quantized_unet
from pipeline.preflight import load_config
from pipeline.quant.artifacts import act_tensors
from stages.layout import CALIB, FP_MODEL, STATS, act_params_path, entry_argument, report_path, votes_path, weights_path
from stages.lineage import check_input, stage_provenance, write_report


def main(row: str) -> None:
    cfg = load_config()
    cfg.row_variant(row)  # an unknown row fails here, naming the defined ones
    fp_hash = model_hash(FP_MODEL)
    calib = open_calibration(CALIB)
    check_input(calib.attrs, cfg, "dump", fp_hash, CALIB)
    summaries = {str(seed): calibrate(cfg, row, seed, fp_hash, calib) for seed in cfg.quant.seeds}
    write_report(report_path("pts", row), {"quant_seeds": summaries})


def calibrate(cfg: Config, row: str, seed: int, fp_hash: str, calib: zarr.Group) -> dict:
    """The activation parameters (and PTS votes) of ``row`` for quantization seed ``seed``; returns the
    vote summary."""
    pts = cfg.pts
    variant = cfg.row_variant(row)
    weights = cfg.rows[row].weights
    method = METHODS[variant.method]
    device = resolve_device(cfg.device)
    steps = calib.attrs["steps"]
    path = weights_path(weights, seed)
    quantized = load_quantized_unet(FP_MODEL, path, None, fp_hash, steps, a_bits=variant.a_bits)
    unet, layers = quantized.unet, quantized.layers
    check_input(quantized.headers["weights"], cfg, "recon", fp_hash, path, cfg.weights_variant(weights), seed)
    model = record_denoiser(FP_MODEL, unet, calib).to(device)
    voter = None
    if method.pts:
        if pts.layers == "auto":
            stats = open_stats(STATS)
            check_input(stats.attrs, cfg, "stats", fp_hash, STATS)
            names = auto_pts_layers(stats, pts.auto_outlier_ratio)
        else:
            names = select_pts_layers(list(layers), pts.layers)
        voter = PTSVoter({n: layers[n] for n in names}, pts.num_candidates, pts.ratio_threshold)
    drawn = dict(records=pts.calib_records, batch_size=pts.batch_size, device=device, seed=seed)
    if method.shared_acts:
        calibrate_shared_activations(model, layers, calib, grid=pts.shared_clip_grid, **drawn)
    else:
        after_step = None if voter is None else (lambda s, inputs: voter(model, s, inputs, pts.batch_size))
        calibrate_activations(model, layers, calib, momentum=pts.momentum, after_step=after_step, **drawn)
    provenance = stage_provenance(cfg, "pts", fp_hash, variant, seed)
    header = {**provenance, **variant._asdict(), "steps": steps, "pts": voter is not None}
    write_tensors(act_params_path(row, seed), act_tensors(layers), header)
    votes = voter.stacked() if voter else {}
    with atomic_store(votes_path(row, seed)) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        root.attrs.update({**provenance, "steps": steps, "threshold": pts.ratio_threshold, "pts": voter is not None})
        for name, arrays in votes.items():
            for key, value in arrays.items():
                root.create_array(f"{name}/{key}", data=value.numpy())
    return vote_summary(votes)


if __name__ == "__main__":
    main(entry_argument())
