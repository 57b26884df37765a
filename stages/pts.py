"""Stage pts@<row>: activation calibration on the weight-quantized network (the attention matmuls' inputs
too for the rows that quantize them), per step (with PTS voting for the methods that use it) or shared
by all steps (Q-Diffusion: initialised, then learned block by block, each block checkpointed), once per
quantization seed (the seed draws the records; the seeds run side by side in ``pts.workers`` processes,
one thread each) -> artifacts/act_params/<row>/q<seed>.safetensors,
artifacts/votes/<row>/q<seed>.zarr."""

import torch
import zarr

from pipeline.calibration.dump import open_calibration, record_denoiser
from pipeline.calibration.stats import auto_pts_layers, open_stats
from pipeline.config import Config
from pipeline.infra.device import resolve_device
from pipeline.infra.fingerprint import model_hash
from pipeline.infra.storage import atomic_store, create_array, write_tensors
from pipeline.infra.workers import per_seed
from pipeline.method.activation_ranges import calibrate_row
from pipeline.method.pts import select_pts_layers, vote_summary
from pipeline.methods import METHODS
from pipeline.models.diffusion import load_fp_model
from pipeline.models.quantized import load_quantized_unet
from pipeline.params import load_config
from pipeline.quant.artifacts import act_tensors
from pipeline.quant.attention import matmul_inputs
from stages.layout import (
    CALIB,
    FP_MODEL,
    STATS,
    act_params_path,
    entry_argument,
    report_path,
    votes_path,
    weights_path,
)
from stages.lineage import check_input, drop_checkpoints, seed_checkpoints, stage_provenance, write_report


def main(row: str) -> None:
    cfg = load_config()
    cfg.row_variant(row)  # an unknown row fails here, naming the defined ones
    fp_hash = model_hash(FP_MODEL)
    check_input(open_calibration(CALIB).attrs, cfg, "dump", fp_hash, CALIB)
    device = resolve_device(cfg.device)
    summaries = per_seed(calibrate, (cfg, row, fp_hash, device), cfg.quant.seeds, cfg.pts.workers, device)
    quant_seeds = {str(seed): summary for seed, summary in summaries.items()}
    write_report(report_path("pts", row), {"quant_seeds": quant_seeds}, device)
    drop_checkpoints("pts", row)


def calibrate(cfg: Config, row: str, fp_hash: str, device: torch.device, seed: int) -> dict:
    """The activation parameters (and PTS votes) of ``row`` for quantization seed ``seed``, calibrated on
    ``device``; returns its vote summary (and the shared steps' learning)."""
    calib = open_calibration(CALIB)
    pts = cfg.pts
    variant = cfg.row_variant(row)
    weights = cfg.rows[row].weights
    method = METHODS[variant.method]
    steps = calib.attrs["steps"]
    path = weights_path(weights, seed)
    softmax_bits = cfg.row_attention(row)
    quantized = load_quantized_unet(FP_MODEL, path, None, fp_hash, steps, variant.a_bits, softmax_bits)
    unet, layers = quantized.unet, quantized.layers
    quantizers = {**layers, **matmul_inputs(unet)}  # the attention matmuls' inputs calibrate like the layers'
    check_input(quantized.headers["weights"], cfg, "recon", fp_hash, path, cfg.weights_variant(weights), seed)
    model = record_denoiser(FP_MODEL, unet, calib).to(device)
    names = []
    if method.pts:
        if pts.layers == "auto":
            stats = open_stats(STATS)
            check_input(stats.attrs, cfg, "stats", fp_hash, STATS)
            names = auto_pts_layers(stats, pts.auto_outlier_ratio)
        else:
            names = select_pts_layers(list(layers), pts.layers)
    provenance = stage_provenance(cfg, "pts", fp_hash, variant, seed)
    voter, learned = calibrate_row(
        cfg,
        row,
        seed,
        model,
        quantizers,
        calib,
        fp_unet=load_fp_model(FP_MODEL)[0] if method.shared_acts else None,
        pts_layers=names,
        device=device,
        checkpoints=lambda: seed_checkpoints("pts", row, seed, provenance),
    )
    header = {**provenance, **variant._asdict(), "steps": steps, "pts": voter is not None, "attention": softmax_bits}
    write_tensors(act_params_path(row, seed), act_tensors(quantizers), header)
    votes = voter.stacked() if voter else {}
    with atomic_store(votes_path(row, seed)) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        root.attrs.update({**provenance, "steps": steps, "threshold": pts.ratio_threshold, "pts": voter is not None})
        for name, arrays in votes.items():
            for key, value in arrays.items():
                create_array(root, f"{name}/{key}", data=value.numpy())
    return {**vote_summary(votes), **learned}


if __name__ == "__main__":
    main(entry_argument())
