"""Stage dump: FP DDIM trajectories and a sample of per-layer FP inputs/outputs -> artifacts/calib.zarr."""

from pipeline.calibration.capture import GB
from pipeline.calibration.dump import dump_calibration
from pipeline.infra.distributed import init, shared_store
from pipeline.infra.fingerprint import model_hash
from pipeline.infra.storage import read_json
from pipeline.models.denoiser import load_denoiser, read_prompts
from pipeline.models.diffusion import ddim_scheduler, load_fp_model
from pipeline.preflight import load_config
from pipeline.quant import quantizable_layers
from stages.layout import CALIB, FP_MODEL, FP_PROVENANCE
from stages.lineage import check_input, stage_provenance


def main() -> None:
    cfg = load_config()
    check_input(read_json(FP_PROVENANCE), cfg, "fp_model", None, FP_MODEL)
    world, device = init(cfg.device)  # under torchrun, each rank dumps its share of the records
    unet, train_scheduler = load_fp_model(FP_MODEL)
    calib = cfg.calib
    prompts = read_prompts(calib.prompts, calib.num_samples) if calib.prompts else None
    denoiser = load_denoiser(FP_MODEL, unet, prompts).to(device)
    scheduler = ddim_scheduler(train_scheduler, cfg.diffusion.steps)
    with shared_store(CALIB, world) as tmp:
        dump_calibration(
            tmp,
            denoiser,
            scheduler,
            quantizable_layers(unet),
            guidance_scale=calib.guidance_scale,
            num_samples=calib.num_samples,
            layer_records_per_step=calib.layer_records_per_step,
            layer_io_gb=calib.layer_io_gb,
            batch_size=calib.batch_size,
            eta=calib.eta,
            seed=calib.seed,
            chunk_records=calib.chunk_records,
            device=device,
            attrs={**stage_provenance(cfg, "dump", model_hash(FP_MODEL)), "prompts": prompts},
            world=world,
            capture_bytes=int(cfg.capture.device_gb * GB),
        )


if __name__ == "__main__":
    main()
