"""Stage peer@<name>: the FP UNet quantized by another library (optimum-quanto), calibrated on records
of the dumped trajectories drawn by each quantization seed, sampled from the same noise and measured
like every row -> artifacts/samples/<name>/q<seed>.zarr, reports/samples/<name>.png, metrics/<name>.json."""

from pipeline.calibration.dump import open_calibration, random_records, record_denoiser
from pipeline.eval.metrics import ClipScorer, evaluate_quant_seeds, measured_features, read_reference
from pipeline.eval.peers import quanto_quantize
from pipeline.eval.report import metrics_record
from pipeline.eval.sampling import read_samples, write_samples
from pipeline.infra.device import resolve_device
from pipeline.infra.figures import save_grid
from pipeline.infra.fingerprint import model_hash
from pipeline.infra.storage import read_tensors, write_json
from pipeline.models.denoiser import Decoder, load_denoiser, read_prompts
from pipeline.models.diffusion import ddim_scheduler, load_fp_model
from pipeline.models.local import find_layout
from pipeline.preflight import load_config
from stages.layout import (
    CALIB,
    CLASSIFIER,
    FP,
    FP_MODEL,
    REFERENCE,
    entry_argument,
    grid_path,
    metrics_path,
    samples_path,
)
from stages.lineage import check_input, stage_provenance


def main(name: str) -> None:
    cfg = load_config()
    sample, evaluation = cfg.sample, cfg.eval
    peer = cfg.entry("peers", name)
    variant = cfg.row_variant(name)
    label = f"{peer.library} {variant.label}"
    device = resolve_device(cfg.device)
    fp_hash = model_hash(FP_MODEL)
    calib = open_calibration(CALIB)
    check_input(calib.attrs, cfg, "dump", fp_hash, CALIB)
    fp_runs, fp_attrs = read_samples(samples_path(FP))
    check_input(fp_attrs, cfg, "sample_fp", fp_hash, samples_path(FP))
    check_input(read_tensors(CLASSIFIER)[1], cfg, "classifier", None, CLASSIFIER)
    reference_tensors, reference_header = read_tensors(REFERENCE)
    check_input(reference_header, cfg, "reference", fp_hash, REFERENCE)
    prompts = read_prompts(sample.prompts, sample.num_samples) if sample.prompts else None  # the rows' sampling prompts
    runs = {}
    for seed in cfg.quant.seeds:  # the seed draws the calibration records
        unet, train_scheduler = load_fp_model(FP_MODEL)
        records, _ = random_records(calib, peer.calib_records, seed)
        calibration = record_denoiser(FP_MODEL, unet, calib).to(device)
        quanto_quantize(
            calibration,
            w_bits=variant.w_bits,
            a_bits=variant.a_bits,
            inputs=tuple(v.to(device) for v in records),
            batch_size=sample.batch_size,
        )
        scheduler = ddim_scheduler(train_scheduler, cfg.diffusion.steps)
        model = load_denoiser(FP_MODEL, unet, prompts).to(device)
        write_samples(
            samples_path(name, seed),
            model,
            scheduler,
            seeds=sample.seeds,
            num_samples=sample.num_samples,
            batch_size=sample.batch_size,
            eta=sample.eta,
            device=device,
            attrs={
                **stage_provenance(cfg, "peer", fp_hash, variant, seed),
                "steps": cfg.diffusion.steps,
                "label": label,
            },
            desc=f"sample {name} q{seed}",
            guidance_scale=sample.guidance_scale,
            decode=Decoder(find_layout(FP_MODEL), device),
        )
        runs[seed], _ = read_samples(samples_path(name, seed))
    save_grid(runs[cfg.quant.seeds[0]][sample.seeds[0]], grid_path(name), sample.grid_size, label)
    found = evaluate_quant_seeds(
        runs,
        reference=read_reference(reference_tensors, reference_header, fp_runs[sample.seeds[0]], str(REFERENCE)),
        features=measured_features(
            cfg.model.source, str(CLASSIFIER), evaluation.inception_weights, evaluation.reference_images
        ),
        kid_subset_size=evaluation.kid_subset_size,
        isc_splits=evaluation.isc_splits,
        prc_neighborhood=evaluation.prc_neighborhood,
        fp_runs=fp_runs,
        clip=ClipScorer(evaluation.clip_model) if evaluation.clip_model else None,
        prompts=prompts,
    )
    provenance = stage_provenance(cfg, "peer", fp_hash, variant)
    write_json(metrics_path(name), metrics_record(label, variant, cfg.diffusion.steps, found, provenance))


if __name__ == "__main__":
    main(entry_argument())
