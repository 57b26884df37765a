"""Stage sample@<row> (and sample_fp): DDIM from the same noise seeds (and conditions) with the row's
quantized UNet of each quantization seed, or the FP UNet for "fp" -> artifacts/samples/<row>/q<seed>.zarr
(artifacts/samples/fp.zarr; one array per noise seed; pixels, latent models' samples decoded),
reports/samples/<row>.png."""

from pipeline.config import Config
from pipeline.deploy.integer import to_integer
from pipeline.eval.sampling import read_samples, write_samples
from pipeline.infra.distributed import init
from pipeline.infra.figures import save_grid
from pipeline.infra.fingerprint import model_hash
from pipeline.models.denoiser import Decoder, load_denoiser, read_prompts
from pipeline.models.diffusion import ddim_scheduler, load_fp_model
from pipeline.models.local import find_layout
from pipeline.models.quantized import load_quantized_unet
from pipeline.params import load_config
from stages.layout import FP, FP_MODEL, act_params_path, entry_argument, grid_path, samples_path, weights_path
from stages.lineage import check_input, stage_provenance


def main(row: str) -> None:
    cfg = load_config()
    world, device = init(cfg.device)  # under torchrun, each rank makes its share of the samples
    fp_hash = model_hash(FP_MODEL)
    if row == FP:
        unet, scheduler = load_fp_model(FP_MODEL)
        sample_into(cfg, FP, None, unet, scheduler, "sample_fp", "FP", fp_hash, world, device)
        return
    variant = cfg.row_variant(row)
    weights = cfg.rows[row].weights
    for seed in cfg.quant.seeds:
        quantized = load_quantized_unet(
            FP_MODEL, weights_path(weights, seed), act_params_path(row, seed), fp_hash, cfg.diffusion.steps
        )
        headers = quantized.headers
        weights_variant = cfg.weights_variant(weights)
        check_input(headers["weights"], cfg, "recon", fp_hash, weights_path(weights, seed), weights_variant, seed)
        check_input(headers["act"], cfg, "pts", fp_hash, act_params_path(row, seed), variant, seed)
        attention = headers["act"].get("attention")  # the softmax bits of quantized attention matmuls
        label = f"{variant.method}{'+attn' if attention else ''} {variant.label}"
        if cfg.sample.backend == "int8":
            try:
                to_integer(quantized.unet)
            except ValueError as error:
                raise ValueError(f"sample.backend int8, row {row}: {error}") from None
        unet, scheduler = quantized.unet, quantized.scheduler
        sample_into(cfg, row, seed, unet, scheduler, "sample", label, fp_hash, world, device, attention)


def sample_into(
    cfg: Config, row: str, seed: int | None, unet, train_scheduler, stage, label, fp_hash, world, device, attention=None
):
    """Sample ``unet`` from every noise seed into the store of ``row`` and quantization seed ``seed``
    (None: FP's), and draw the grid of the first noise seed's samples (of the first quantization seed);
    the store says the softmax bits ``attention`` of quantized attention matmuls."""
    sample = cfg.sample
    variant = None if row == FP else cfg.row_variant(row)
    scheduler = ddim_scheduler(train_scheduler, cfg.diffusion.steps)
    model = load_denoiser(
        FP_MODEL, unet, read_prompts(sample.prompts, sample.num_samples) if sample.prompts else None
    ).to(device)
    decode = Decoder(find_layout(FP_MODEL), device)
    provenance = stage_provenance(cfg, stage, fp_hash, variant, seed)
    attrs = {**provenance, "steps": cfg.diffusion.steps, "label": label, "quant_seed": seed, "attention": attention}
    path = samples_path(row, seed)
    write_samples(
        path,
        model,
        scheduler,
        seeds=sample.seeds,
        num_samples=sample.num_samples,
        batch_size=sample.batch_size,
        eta=sample.eta,
        device=device,
        attrs=attrs,
        desc=f"sample {row}" + ("" if seed is None else f" q{seed}"),
        world=world,
        precision=cfg.autocast,
        guidance_scale=sample.guidance_scale,
        decode=decode,
    )
    if world.main and seed in (None, cfg.quant.seeds[0]):
        grid = read_samples(path, sample.grid_size**2)[0][sample.seeds[0]]
        save_grid(grid, grid_path(row), sample.grid_size, label)


if __name__ == "__main__":
    main(entry_argument())
