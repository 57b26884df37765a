"""Stage les@<weights entry>: learned equivalent scaling γ per quantized layer, once per quantization
seed -> artifacts/les/<entry>/q<seed>.safetensors (γ = 1 everywhere for methods without LES, so later
stages always read one artifact). Each layer learns from its FP I/O captured on ``les.records``
trajectory records of calib.zarr. Each finished layer is checkpointed, so a rerun after a kill resumes."""

import time

import torch

from pipeline.calibration.capture import Budget
from pipeline.calibration.dump import open_calibration, record_denoiser, records_by_step, records_per_step
from pipeline.infra.checkpoint import Checkpoints
from pipeline.infra.distributed import init
from pipeline.infra.fingerprint import model_hash
from pipeline.infra.storage import write_tensors
from pipeline.method.les import learn_all
from pipeline.methods import METHODS
from pipeline.models.diffusion import load_fp_model
from pipeline.preflight import load_config
from pipeline.quant import QuantSpec, quantizable_layers, quantize
from stages.layout import CALIB, FP_MODEL, checkpoints_path, entry_argument, les_path, report_path
from stages.lineage import check_input, checkpoint_key, stage_provenance, write_report


def main(name: str) -> None:
    cfg = load_config()
    world, device = init(cfg.device)  # under torchrun, the layers are spread over the ranks
    les = cfg.les
    variant = cfg.weights_variant(name)
    method = METHODS[variant.method]
    fp_hash = model_hash(FP_MODEL)
    if method.les:
        calib = open_calibration(CALIB)
        check_input(calib.attrs, cfg, "dump", fp_hash, CALIB)
        steps = calib.attrs["steps"]
        fp_unet, _ = load_fp_model(FP_MODEL)
        fp_model = record_denoiser(FP_MODEL, fp_unet, calib).to(device)
        fp_layers = quantizable_layers(fp_unet)
        per_step = (les.records or steps * records_per_step(calib)) // steps
    reports = {}
    for seed in cfg.quant.seeds:
        provenance = stage_provenance(cfg, "les", fp_hash, variant, seed)
        unet, _ = load_fp_model(FP_MODEL)
        spec = QuantSpec(w_bits=variant.w_bits, a_bits=variant.a_bits, num_steps=1, split=method.split)
        layers = quantize(unet, spec)
        start = time.perf_counter()
        checkpoints = None
        if method.les:
            with world.main_first():  # rank 0 removes stale checkpoints before any rank saves new ones
                checkpoints = Checkpoints(checkpoints_path("les", name, seed), checkpoint_key(provenance))
            gammas, losses = learn_all(
                layers,
                fp_model,
                fp_layers,
                records_by_step(calib, per_step, seed),
                steps,
                weighting=method.weighting,
                iters=les.iters,
                lr=les.lr,
                batch_size=les.batch_size,
                r=les.focal_r,
                momentum=les.focal_momentum,
                seed=seed,
                budget=Budget.of(cfg.capture.device_gb, cfg.capture.host_gb, cfg.capture.scratch),
                capture_batch=cfg.capture.batch_size,
                workers=les.workers,
                checkpoints=checkpoints,
                device=device,
                world=world,
            )
        else:
            gammas, losses = {name: torch.ones_like(layer.gamma) for name, layer in layers.items()}, {}
        if not world.main:
            continue
        header = {
            **provenance,
            **variant._asdict(),
            "weighting": method.weighting,
            "iters": les.iters if method.les else 0,
            "records": steps * per_step if method.les else 0,
        }
        write_tensors(les_path(name, seed), {f"{layer}.gamma": gamma for layer, gamma in gammas.items()}, header)
        if checkpoints:
            checkpoints.remove()
        reports[str(seed)] = seed_report(losses, time.perf_counter() - start, gammas)
    if world.main:
        write_report(report_path("les", name), {"les": method.les, "quant_seeds": reports})


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
