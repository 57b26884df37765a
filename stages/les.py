"""Stage les: learned equivalent scaling γ per quantized layer -> artifacts/les.safetensors
(γ = 1 everywhere for methods without LES, so later stages always read one artifact). Each finished
layer is checkpointed, so a rerun after a kill resumes."""

import time

import torch

from pipeline.calib import open_calibration
from pipeline.checkpoint import Checkpoints
from pipeline.config import load_config
from pipeline.diffusion import load_fp_model
from pipeline.distributed import init
from pipeline.fingerprint import model_hash
from pipeline.io import write_json, write_tensors
from pipeline.les import learn_all
from pipeline.methods import METHODS
from pipeline.quant import QuantSpec, quantize
from stages.layout import CALIB, FP_MODEL, LES, LES_CHECKPOINTS, REPORTS
from stages.lineage import check_input, checkpoint_key, stage_provenance


def main() -> None:
    cfg = load_config()
    world, device = init(cfg.device)  # under torchrun, the layers are spread over the ranks
    q, c = cfg.quant, cfg.les
    method = METHODS[q.method]
    fp_hash = model_hash(FP_MODEL)
    check_input(open_calibration(CALIB).attrs, cfg, "dump", fp_hash, CALIB)
    provenance = stage_provenance(cfg, "les", fp_hash)
    unet, _ = load_fp_model(FP_MODEL)
    layers = quantize(unet, QuantSpec(w_bits=q.w_bits, a_bits=q.a_bits, num_steps=1, split=method.split))
    start = time.perf_counter()
    with world.main_first():  # rank 0 removes stale checkpoints before any rank saves new ones
        checkpoints = Checkpoints(LES_CHECKPOINTS, checkpoint_key(provenance)) if method.les else None
    if method.les:
        gammas, losses = learn_all(
            layers, CALIB, weighting=method.weighting, iters=c.iters, lr=c.lr, batch_size=c.batch_size,
            r=c.focal_r, momentum=c.focal_momentum, seed=c.seed, workers=c.workers, checkpoints=checkpoints,
            device=device, world=world,
        )  # fmt: skip
    else:
        gammas, losses = {name: torch.ones_like(layer.gamma) for name, layer in layers.items()}, {}
    if not world.main:
        return
    header = {
        **provenance, "method": q.method, "w_bits": q.w_bits, "a_bits": q.a_bits,
        "weighting": method.weighting, "iters": c.iters if method.les else 0,
    }  # fmt: skip
    write_tensors(LES, {f"{name}.gamma": gamma for name, gamma in gammas.items()}, header)
    if checkpoints:
        checkpoints.remove()
    report = {
        "les": method.les,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "layers": {name: {"loss_before": before, "loss_after": after} for name, (before, after) in losses.items()},
    }
    if losses:
        report["mean_loss_before"] = sum(b for b, _ in losses.values()) / len(losses)
        report["mean_loss_after"] = sum(a for _, a in losses.values()) / len(losses)
    write_json(REPORTS / "les.json", report)


if __name__ == "__main__":
    main()
