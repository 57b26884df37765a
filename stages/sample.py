"""Stage sample@<row> (and sample_fp): DDIM from the same seeds (and conditions) with the row's
quantized UNet, or the FP UNet for "fp" -> artifacts/samples/<row>.zarr (one array per seed; pixels,
latent models' samples decoded), reports/samples/<row>.png. ``sample.backend: int8`` runs the row's
quantized layers on int8 kernels instead of fake quantization."""

from pipeline.config import ConfigError
from pipeline.deploy.integer import to_integer
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
    s = cfg.sample
    world, device = init(cfg.device)  # under torchrun, each rank makes its share of the samples
    fp_hash = model_hash(FP_MODEL)
    if row == FP:
        variant, stage, label = None, "sample_fp", "FP"
        unet, train_scheduler = load_fp_model(FP_MODEL)
    else:
        variant, stage = cfg.row_variant(row), "sample"
        label = f"{variant.method} {variant.label}"
        weights = cfg.rows[row].weights
        unet, train_scheduler, _, headers = load_quantized_unet(
            FP_MODEL, weights_path(weights), act_params_path(row), fp_hash, cfg.diffusion.steps
        )
        check_input(headers["weights"], cfg, "recon", fp_hash, weights_path(weights), cfg.weights_variant(weights))
        check_input(headers["act"], cfg, "pts", fp_hash, act_params_path(row), variant)
        if s.backend == "int8":
            if device.type != "cpu" or cfg.autocast != "none":
                raise ConfigError(
                    f"sample.backend: int8 runs on the CPU in float32 (device {device.type}, autocast {cfg.autocast}); "
                    "set device: cpu and autocast: none, or sample.backend: fake"
                )
            try:
                to_integer(unet)
            except ValueError as error:
                raise ConfigError(f"sample.backend: int8 cannot run row {row!r}: {error}") from None
            label += " (int8)"
    scheduler = ddim_scheduler(train_scheduler, cfg.diffusion.steps)
    model = load_denoiser(FP_MODEL, unet, read_prompts(s.prompts, s.num_samples) if s.prompts else None).to(device)
    decode = Decoder(find_layout(FP_MODEL), device)
    attrs = {**stage_provenance(cfg, stage, fp_hash, variant), "steps": cfg.diffusion.steps, "label": label}
    write_samples(
        samples_path(row),
        model,
        scheduler,
        s.seeds,
        s.num_samples,
        s.batch_size,
        s.eta,
        device,
        attrs,
        f"sample {row}",
        world,
        cfg.autocast,
        s.guidance_scale,
        decode,
    )
    if world.main:
        save_grid(read_samples(samples_path(row), s.grid_size**2)[0][s.seeds[0]], grid_path(row), s.grid_size, label)


if __name__ == "__main__":
    main(entry_argument())
