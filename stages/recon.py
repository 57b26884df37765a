"""Stage recon@<weights entry>: fold γ into the weights, search weight scales, then learn the rounding
(AdaRound) or round to nearest (methods without AdaRound), once per quantization seed (the seed draws
the records and orders the batches; the seeds run side by side in ``recon.workers`` processes, one thread
each) -> artifacts/weights/<entry>/q<seed>.safetensors. Each reconstructed block is checkpointed, so a
rerun after a kill resumes."""

import torch

from pipeline.calibration.dump import open_calibration, record_denoiser
from pipeline.config import Config
from pipeline.infra.device import resolve_device
from pipeline.infra.fingerprint import model_hash
from pipeline.infra.storage import read_tensors, write_tensors
from pipeline.infra.workers import per_seed
from pipeline.method.weight_init import reconstruct_weights
from pipeline.methods import METHODS
from pipeline.models.denoiser import as_denoiser
from pipeline.models.diffusion import load_fp_model
from pipeline.params import load_config
from pipeline.quant.artifacts import weight_tensors
from stages.layout import CALIB, FP_MODEL, entry_argument, les_path, report_path, weights_path
from stages.lineage import check_input, drop_checkpoints, seed_checkpoints, stage_provenance, write_report


def main(name: str) -> None:
    cfg = load_config()
    variant = cfg.weights_variant(name)
    method = METHODS[variant.method]
    fp_hash = model_hash(FP_MODEL)
    if method.adaround:
        check_input(open_calibration(CALIB).attrs, cfg, "dump", fp_hash, CALIB)
    device = resolve_device(cfg.device)
    reports = per_seed(reconstruct, (cfg, name, fp_hash, device), cfg.quant.seeds, cfg.recon.workers, device)
    write_report(
        report_path("recon", name),
        {
            "method": variant.method,
            "adaround": method.adaround,
            "quant_seeds": {str(seed): report for seed, report in reports.items()},
        },
        device,
    )
    drop_checkpoints("recon", name)


def reconstruct(cfg: Config, name: str, fp_hash: str, device: torch.device, seed: int) -> dict:
    """The weights of entry ``name`` for quantization seed ``seed``, learned on ``device``; returns its report."""
    variant = cfg.weights_variant(name)
    method = METHODS[variant.method]
    calib = open_calibration(CALIB) if method.adaround else None
    fp_unet, _ = load_fp_model(FP_MODEL)
    provenance = stage_provenance(cfg, "recon", fp_hash, variant, seed)
    gammas, les_header = read_tensors(les_path(name, seed))
    check_input(les_header, cfg, "les", fp_hash, les_path(name, seed), variant, seed)
    checkpoints = None
    fp = as_denoiser(fp_unet)
    if method.adaround:
        checkpoints = seed_checkpoints("recon", name, seed, provenance)
        fp = record_denoiser(FP_MODEL, fp_unet, calib)
    _, layers, report = reconstruct_weights(
        cfg,
        name,
        seed,
        fp,
        gammas,
        calib,
        device=device,
        checkpoints=checkpoints,
        gamma_source=str(les_path(name, seed)),
    )
    header = {**provenance, **variant._asdict(), "split": list(method.split)}
    write_tensors(weights_path(name, seed), weight_tensors(layers), header)
    return report


if __name__ == "__main__":
    main(entry_argument())
