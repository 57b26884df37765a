"""Stage peer@<name>: the FP UNet quantized by another library (optimum-quanto), calibrated on records
of the dumped trajectories drawn by each quantization seed, sampled from the same noise and measured
like every row -> artifacts/samples/<name>/q<seed>.zarr, reports/samples/<name>.png, metrics/<name>.json."""

from pipeline.calibration.dump import open_calibration, random_records, record_denoiser
from pipeline.eval.metrics import evaluate_quant_seeds
from pipeline.eval.peers import quanto_quantize
from pipeline.eval.report import metrics_record
from pipeline.eval.sampling import read_samples
from pipeline.infra.device import resolve_device
from pipeline.infra.distributed import SINGLE
from pipeline.infra.fingerprint import model_hash
from pipeline.infra.storage import write_json
from pipeline.models.diffusion import load_fp_model
from pipeline.params import load_config
from stages.fid import metric_settings
from stages.layout import CALIB, FP, FP_MODEL, entry_argument, metrics_path, samples_path
from stages.lineage import check_input, stage_provenance
from stages.sample import sample_into


def main(name: str) -> None:
    cfg = load_config()
    peer = cfg.entry("peers", name)
    variant = cfg.row_variant(name)
    label = f"{peer.library} {variant.label}"
    device = resolve_device(cfg.device)
    fp_hash = model_hash(FP_MODEL)
    calib = open_calibration(CALIB)
    check_input(calib.attrs, cfg, "dump", fp_hash, CALIB)
    fp_runs, fp_attrs = read_samples(samples_path(FP))
    check_input(fp_attrs, cfg, "sample_fp", fp_hash, samples_path(FP))
    measure = metric_settings(cfg, fp_hash, fp_runs[cfg.sample.seeds[0]])
    runs = {}
    for seed in cfg.quant.seeds:  # the seed draws the calibration records
        unet, train_scheduler = load_fp_model(FP_MODEL)
        records, _ = random_records(calib, peer.calib_records, seed)
        quanto_quantize(
            record_denoiser(FP_MODEL, unet, calib).to(device),
            w_bits=variant.w_bits,
            a_bits=variant.a_bits,
            inputs=tuple(v.to(device) for v in records),
            batch_size=cfg.sample.batch_size,
        )
        sample_into(cfg, name, seed, unet, train_scheduler, "peer", label, fp_hash, SINGLE, device)
        runs[seed], _ = read_samples(samples_path(name, seed))
    found = evaluate_quant_seeds(runs, fp_runs=fp_runs, **measure)
    provenance = stage_provenance(cfg, "peer", fp_hash, variant)
    write_json(metrics_path(name), metrics_record(label, variant, cfg.diffusion.steps, found, provenance))


if __name__ == "__main__":
    main(entry_argument())
