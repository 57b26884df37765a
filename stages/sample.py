"""Stage sample: DDIM with the FP and the quantized UNet from the same seeds (and conditions) ->
samples.zarr (pixels: latent models' samples decoded), grids."""

import zarr

from pipeline.components import find_layout
from pipeline.conditioning import Decoder, load_denoiser, read_prompts
from pipeline.config import load_config
from pipeline.diffusion import ddim_scheduler, load_fp_model, resolve_device
from pipeline.figures import save_grid
from pipeline.fingerprint import model_hash
from pipeline.io import atomic_store
from pipeline.quantized import load_quantized_unet
from pipeline.sampling import generate
from stages.layout import ACT_PARAMS, FP_MODEL, REPORTS, SAMPLES, WEIGHTS
from stages.lineage import check_input, stage_provenance


def main() -> None:
    cfg = load_config()
    s = cfg.sample
    device = resolve_device(cfg.device)
    fp_hash = model_hash(FP_MODEL)
    fp_unet, train_scheduler = load_fp_model(FP_MODEL)
    q_unet, _, _, headers = load_quantized_unet(FP_MODEL, WEIGHTS, ACT_PARAMS, fp_hash, cfg.diffusion.steps)
    check_input(headers["weights"], cfg, "recon", fp_hash, WEIGHTS)
    check_input(headers["act"], cfg, "pts", fp_hash, ACT_PARAMS)
    scheduler = ddim_scheduler(train_scheduler, cfg.diffusion.steps)
    fp = load_denoiser(FP_MODEL, fp_unet, read_prompts(s.prompts) if s.prompts else None, cfg.model.null_class)
    decode = Decoder(find_layout(FP_MODEL), device)
    runs = {
        name: decode(generate(model.to(device), scheduler, s.num_samples, s.batch_size, s.eta, s.seed, device, f"sample {name}", s.guidance_scale))
        for name, model in (("fp", fp), ("quant", fp.with_unet(q_unet)))
    }
    label = f"{headers['act']['method']} W{headers['act']['w_bits']}A{headers['act']['a_bits']}"
    with atomic_store(SAMPLES) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        for name, images in runs.items():
            root.create_array(name, data=images.numpy(), chunks=(min(256, len(images)), *images.shape[1:]))
        root.attrs.update({**stage_provenance(cfg, "sample", fp_hash), "steps": cfg.diffusion.steps, "quant_label": label})
    save_grid(runs["fp"], REPORTS / "samples_fp.png", s.grid_size, "FP")
    save_grid(runs["quant"], REPORTS / "samples_quant.png", s.grid_size, label)


if __name__ == "__main__":
    main()
