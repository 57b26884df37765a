"""Stage les@<weights entry>: learned equivalent scaling γ per quantized layer, once per quantization
seed -> artifacts/les/<entry>/q<seed>.safetensors (γ = 1 everywhere for methods without LES, so later
stages always read one artifact). Each layer learns from its FP I/O captured on ``les.records``
trajectory records of calib.zarr. Each finished layer is checkpointed, so a rerun after a kill resumes."""

import time

import torch

from pipeline.calibration.dump import open_calibration, record_denoiser
from pipeline.infra.distributed import init
from pipeline.infra.fingerprint import model_hash
from pipeline.infra.storage import write_tensors
from pipeline.method.les import learn_gammas, les_records_per_step
from pipeline.methods import METHODS
from pipeline.models.denoiser import as_denoiser
from pipeline.models.diffusion import load_fp_model
from pipeline.params import load_config
from stages.layout import CALIB, FP_MODEL, entry_argument, les_path, report_path
from stages.lineage import check_input, drop_checkpoints, seed_checkpoints, stage_provenance, write_report


def main(name: str) -> None:
    cfg = load_config()
    world, device = init(cfg.device)  # under torchrun, the layers are spread over the ranks
    les = cfg.les
    variant = cfg.weights_variant(name)
    method = METHODS[variant.method]
    fp_hash = model_hash(FP_MODEL)
    fp_unet, _ = load_fp_model(FP_MODEL)
    calib, fp = None, as_denoiser(fp_unet)
    if method.les:
        calib = open_calibration(CALIB)
        check_input(calib.attrs, cfg, "dump", fp_hash, CALIB)
        fp = record_denoiser(FP_MODEL, fp_unet, calib)
    reports = {}
    for seed in cfg.quant.seeds:
        provenance = stage_provenance(cfg, "les", fp_hash, variant, seed)
        start = time.perf_counter()
        checkpoints = None
        if method.les:
            with world.main_first():  # rank 0 removes stale checkpoints before any rank saves new ones
                checkpoints = seed_checkpoints("les", name, seed, provenance)
        gammas, losses = learn_gammas(cfg, name, seed, fp, calib, device=device, world=world, checkpoints=checkpoints)
        if not world.main:
            continue
        header = {
            **provenance,
            **variant._asdict(),
            "weighting": method.weighting,
            "iters": les.iters if method.les else 0,
            "records": calib.attrs["steps"] * les_records_per_step(cfg, calib) if method.les else 0,
        }
        write_tensors(les_path(name, seed), {f"{layer}.gamma": gamma for layer, gamma in gammas.items()}, header)
        reports[str(seed)] = seed_report(losses, time.perf_counter() - start, gammas)
    if world.main:
        write_report(report_path("les", name), {"les": method.les, "quant_seeds": reports}, device)
        drop_checkpoints("les", name)


def seed_report(losses: dict[str, tuple[float, float]], seconds: float, gammas: dict[str, torch.Tensor]) -> dict:
    """Per layer the LES loss with γ = 1 and with the learned γ, and γ's range; their means."""
    report = {
        "wall_seconds": round(seconds, 1),
        "layers": {
            layer: {
                "loss_before": before,
                "loss_after": after,
                "gamma_min": float(gammas[layer].min()),
                "gamma_max": float(gammas[layer].max()),
            }
            for layer, (before, after) in losses.items()
        },
    }
    if losses:
        report["mean_loss_before"] = sum(b for b, _ in losses.values()) / len(losses)
        report["mean_loss_after"] = sum(a for _, a in losses.values()) / len(losses)
    return report


if __name__ == "__main__":
    main(entry_argument())
