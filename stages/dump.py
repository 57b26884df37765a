"""Stage dump: FP DDIM trajectories and a sample of per-layer FP inputs/outputs -> artifacts/calib.zarr."""

from pipeline.calibration.dump import dump_model
from pipeline.infra.distributed import init, shared_store
from pipeline.infra.fingerprint import model_hash
from pipeline.infra.storage import read_json
from pipeline.models.denoiser import read_prompts
from pipeline.models.diffusion import load_fp_model
from pipeline.params import load_config
from stages.layout import CALIB, FP_MODEL, FP_PROVENANCE
from stages.lineage import check_input, stage_provenance


def main() -> None:
    cfg = load_config()
    check_input(read_json(FP_PROVENANCE), cfg, "fp_model", None, FP_MODEL)
    world, device = init(cfg.device)  # under torchrun, each rank dumps its share of the records
    unet, train_scheduler = load_fp_model(FP_MODEL)
    calib = cfg.calib
    prompts = read_prompts(calib.prompts, calib.num_samples) if calib.prompts else None
    attrs = stage_provenance(cfg, "dump", model_hash(FP_MODEL))
    with shared_store(CALIB, world) as tmp:
        dump_model(tmp, FP_MODEL, unet, train_scheduler, cfg, prompts, device=device, attrs=attrs, world=world)


if __name__ == "__main__":
    main()
