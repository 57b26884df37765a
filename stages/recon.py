"""Stage recon@<weights entry>: fold γ into the weights, search weight scales, then learn the rounding
(AdaRound) or round to nearest (methods without AdaRound), once per quantization seed (the seed draws
the records and orders the batches) -> artifacts/weights/<entry>/q<seed>.safetensors. Each
reconstructed block is checkpointed, so a rerun after a kill resumes."""

import copy
import time
from functools import partial

from pipeline.calibration.capture import Budget
from pipeline.calibration.dump import open_calibration, random_records, record_denoiser
from pipeline.config import Config
from pipeline.infra.checkpoint import Checkpoints
from pipeline.infra.device import resolve_device, to_device
from pipeline.infra.fingerprint import model_hash
from pipeline.infra.storage import read_tensors, write_tensors
from pipeline.method.adaround import AdaRoundSettings, adaround
from pipeline.method.weight_init import init_weight_quantizers
from pipeline.method.weighting import make_weighting
from pipeline.methods import METHODS
from pipeline.models.diffusion import load_fp_model
from pipeline.preflight import load_config
from pipeline.quant import QuantSpec, quantize
from pipeline.quant.artifacts import load_gamma, weight_tensors
from stages.layout import CALIB, FP_MODEL, checkpoints_path, entry_argument, les_path, report_path, weights_path
from stages.lineage import check_input, checkpoint_key, stage_provenance, write_report


def main(name: str) -> None:
    cfg = load_config()
    variant = cfg.weights_variant(name)
    method = METHODS[variant.method]
    fp_hash = model_hash(FP_MODEL)
    calib = None
    if method.adaround:
        calib = open_calibration(CALIB)
        check_input(calib.attrs, cfg, "dump", fp_hash, CALIB)
    reports = {str(seed): reconstruct(cfg, name, seed, fp_hash, calib) for seed in cfg.quant.seeds}
    write_report(
        report_path("recon", name), {"method": variant.method, "adaround": method.adaround, "quant_seeds": reports}
    )


def reconstruct(cfg: Config, name: str, seed: int, fp_hash: str, calib) -> dict:
    """The weights of entry ``name`` for quantization seed ``seed``; returns the seed's report."""
    quant, recon = cfg.quant, cfg.recon
    variant = cfg.weights_variant(name)
    method = METHODS[variant.method]
    device = resolve_device(cfg.device)
    fp_unet, _ = load_fp_model(FP_MODEL)
    provenance = stage_provenance(cfg, "recon", fp_hash, variant, seed)
    gammas, les_header = read_tensors(les_path(name, seed))
    check_input(les_header, cfg, "les", fp_hash, les_path(name, seed), variant, seed)
    q_unet = copy.deepcopy(fp_unet)
    layers = quantize(q_unet, QuantSpec(w_bits=variant.w_bits, split=method.split))
    load_gamma(layers, gammas, str(les_path(name, seed)))
    q_unet.to(device)  # before the weight-scale search: its 80 clipping ratios per layer are the device's work
    init_weight_quantizers(layers, quant.weight_clip_grid, quant.weight_clip_p)
    report = {}
    checkpoints = None
    if method.adaround:
        records, step = random_records(calib, recon.records, seed)
        weighting = None
        if recon.weighting == "method":
            steps = calib.attrs["steps"]
            weighting = partial(make_weighting, method.weighting, steps, cfg.les.focal_r, cfg.les.focal_momentum)
        settings = AdaRoundSettings(
            iters=recon.iters,
            lr=recon.lr,
            batch_size=recon.batch_size,
            reg_lambda=recon.reg_lambda,
            beta_start=recon.beta_start,
            beta_end=recon.beta_end,
            warmup=recon.warmup,
            seed=seed,
            precision=cfg.autocast,
        )
        checkpoints = Checkpoints(checkpoints_path("recon", name, seed), checkpoint_key(provenance))
        start = time.perf_counter()
        inputs = tuple(to_device(v, device) for v in records)
        fp = record_denoiser(FP_MODEL, fp_unet, calib)
        units = adaround(
            fp.with_unet(q_unet).to(device),
            fp.to(device),
            inputs,
            settings,
            make_weighting=weighting,
            steps=to_device(step, device),
            checkpoints=checkpoints,
            budget=Budget.of(cfg.capture.device_gb, cfg.capture.host_gb, cfg.capture.scratch),
            capture_batch=cfg.capture.batch_size,
        )
        report.update(seconds=round(time.perf_counter() - start, 1), units=units)
        report["mean_loss_before"] = sum(u["before"] for u in units.values()) / len(units)
        report["mean_loss_after"] = sum(u["after"] for u in units.values()) / len(units)
    header = {**provenance, **variant._asdict(), "split": list(method.split)}
    write_tensors(weights_path(name, seed), weight_tensors(layers), header)
    if checkpoints:
        checkpoints.remove()
    return report


if __name__ == "__main__":
    main(entry_argument())
