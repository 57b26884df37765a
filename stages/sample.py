"""Stage sample: DDIM with the FP and the quantized UNet from the same seeds -> samples.zarr, grids."""

import torch

from pipeline.config import load_config
from pipeline.diffusion import ddim_scheduler, load_fp_model
from pipeline.distributed import init, shared_store
from pipeline.figures import save_grid
from pipeline.fingerprint import model_hash
from pipeline.io import open_store
from pipeline.quantized import load_quantized_unet
from pipeline.sampling import create_sample_arrays, generate, image_shape
from stages.layout import ACT_PARAMS, FP_MODEL, REPORTS, SAMPLES, WEIGHTS
from stages.lineage import check_input, stage_provenance


def main() -> None:
    cfg = load_config()
    s = cfg.sample
    world, device = init(cfg.device)  # under torchrun, each rank makes its share of the samples
    fp_hash = model_hash(FP_MODEL)
    fp_unet, train_scheduler = load_fp_model(FP_MODEL)
    q_unet, _, _, headers = load_quantized_unet(FP_MODEL, WEIGHTS, ACT_PARAMS, fp_hash, cfg.diffusion.steps)
    check_input(headers["weights"], cfg, "recon", fp_hash, WEIGHTS)
    check_input(headers["act"], cfg, "pts", fp_hash, ACT_PARAMS)
    scheduler = ddim_scheduler(train_scheduler, cfg.diffusion.steps)
    label = f"{headers['act']['method']} W{headers['act']['w_bits']}A{headers['act']['a_bits']}"
    attrs = {**stage_provenance(cfg, "sample", fp_hash), "steps": cfg.diffusion.steps, "quant_label": label}
    unets = {"fp": fp_unet.to(device), "quant": q_unet.to(device)}
    with shared_store(SAMPLES, world) as tmp:
        root = create_sample_arrays(tmp, list(unets), s.num_samples, image_shape(fp_unet), s.batch_size, attrs, world)
        for name, unet in unets.items():
            generate(unet, scheduler, root[name], s.batch_size, s.eta, s.seed, device, f"sample {name}", world, cfg.autocast)
    if world.main:
        root = open_store(SAMPLES, "samples store")
        for name, title in (("fp", "FP"), ("quant", label)):
            save_grid(torch.from_numpy(root[name][: s.grid_size**2]), REPORTS / f"samples_{name}.png", s.grid_size, title)


if __name__ == "__main__":
    main()
