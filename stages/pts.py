"""Stage pts@<row>: per-step activation calibration on the weight-quantized network, with PTS voting
for the methods that use it -> artifacts/act_params/<row>.safetensors, artifacts/votes/<row>.zarr."""

import zarr

from pipeline.calibration.dump import open_calibration, record_denoiser
from pipeline.calibration.stats import auto_pts_layers, open_stats
from pipeline.infra.device import resolve_device
from pipeline.infra.fingerprint import model_hash
from pipeline.infra.storage import atomic_store, write_json, write_tensors
from pipeline.method.activation_ranges import calibrate_activations
from pipeline.method.pts import PTSVoter, select_pts_layers, vote_summary
from pipeline.methods import METHODS
from pipeline.models.quantized import load_quantized_unet
from pipeline.preflight import load_config
from pipeline.quant.artifacts import act_tensors
from stages.layout import CALIB, FP_MODEL, STATS, act_params_path, entry_argument, report_path, votes_path, weights_path
from stages.lineage import check_input, stage_provenance


def main(row: str) -> None:
    cfg = load_config()
    pts = cfg.pts
    variant = cfg.row_variant(row)
    weights = cfg.rows[row].weights
    method = METHODS[variant.method]
    device = resolve_device(cfg.device)
    fp_hash = model_hash(FP_MODEL)
    calib = open_calibration(CALIB)
    check_input(calib.attrs, cfg, "dump", fp_hash, CALIB)
    steps = calib.attrs["steps"]
    quantized = load_quantized_unet(FP_MODEL, weights_path(weights), None, fp_hash, steps, a_bits=variant.a_bits)
    unet, layers = quantized.unet, quantized.layers
    check_input(
        quantized.headers["weights"], cfg, "recon", fp_hash, weights_path(weights), cfg.weights_variant(weights)
    )
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
    after_step = None if voter is None else (lambda s, inputs: voter(model, s, inputs, pts.batch_size))
    calibrate_activations(
        model,
        layers,
        calib,
        records=pts.calib_records,
        batch_size=pts.batch_size,
        momentum=pts.momentum,
        device=device,
        after_step=after_step,
    )
    provenance = stage_provenance(cfg, "pts", fp_hash, variant)
    header = {**provenance, **variant._asdict(), "steps": steps, "pts": voter is not None}
    write_tensors(act_params_path(row), act_tensors(layers), header)
    votes = voter.stacked() if voter else {}
    with atomic_store(votes_path(row)) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        root.attrs.update({**provenance, "steps": steps, "threshold": pts.ratio_threshold, "pts": voter is not None})
        for name, arrays in votes.items():
            for key, value in arrays.items():
                root.create_array(f"{name}/{key}", data=value.numpy())
    write_json(report_path("pts", row), vote_summary(votes))


if __name__ == "__main__":
    main(entry_argument())
