"""Stage sample@<row> (and sample_fp): DDIM from the same seeds (and conditions) with the row's
quantized UNet, or the FP UNet for "fp" -> artifacts/samples/<row>.zarr (one array per seed; pixels,
latent models' samples decoded), reports/samples/<row>.png."""

from pipeline.eval.sampling import read_samples, write_samples
from pipeline.infra.distributed import init
from pipeline.infra.figures import save_grid
from pipeline.infra.fingerprint import model_hash
from pipeline.models.denoiser import Decoder, load_denoiser, read_prompts
from pipeline.models.diffusion import ddim_scheduler, load_fp_model
from pipeline.models.local import find_layout
from pipeline.models.quantized import load_quantized_unet
from pipeline.preflight import load_config
from stages.layout import FP, FP_MODEL, act_params_path, entry_argument, grid_path, samples_path, weights_path
from stages.lineage import check_input, stage_provenance


def main(row: str) -> None:
    cfg = load_config()
    sample = cfg.sample
    world, device = init(cfg.device)  # under torchrun, each rank makes its share of the samples
    fp_hash = model_hash(FP_MODEL)
    if row == FP:
        variant, stage, label = None, "sample_fp", "FP"
        unet, train_scheduler = load_fp_model(FP_MODEL)
    else:
        variant, stage = cfg.row_variant(row), "sample"
        label = f"{variant.method} {variant.label}"
        weights = cfg.rows[row].weights
        quantized = load_quantized_unet(
            FP_MODEL, weights_path(weights), act_params_path(row), fp_hash, cfg.diffusion.steps
        )
        unet, train_scheduler = quantized.unet, quantized.scheduler
        check_input(
            quantized.headers["weights"], cfg, "recon", fp_hash, weights_path(weights), cfg.weights_variant(weights)
        )
        check_input(quantized.headers["act"], cfg, "pts", fp_hash, act_params_path(row), variant)
    scheduler = ddim_scheduler(train_scheduler, cfg.diffusion.steps)
    model = load_denoiser(
        FP_MODEL, unet, read_prompts(sample.prompts, sample.num_samples) if sample.prompts else None
    ).to(device)
    decode = Decoder(find_layout(FP_MODEL), device)
    attrs = {**stage_provenance(cfg, stage, fp_hash, variant), "steps": cfg.diffusion.steps, "label": label}
    write_samples(
        samples_path(row),
        model,
        scheduler,
        seeds=sample.seeds,
        num_samples=sample.num_samples,
        batch_size=sample.batch_size,
        eta=sample.eta,
        device=device,
        attrs=attrs,
        desc=f"sample {row}",
        world=world,
        precision=cfg.autocast,
        guidance_scale=sample.guidance_scale,
        decode=decode,
    )
    if world.main:
        save_grid(
            read_samples(samples_path(row), sample.grid_size**2)[0][sample.seeds[0]],
            grid_path(row),
            sample.grid_size,
            label,
        )


if __name__ == "__main__":
    main(entry_argument())
