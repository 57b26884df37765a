"""Stage fid@<row> (and fid_fp): the distribution metrics of each seed's samples against the reference
features of the reference stage (FID, sFID with Inception, KID, ISC, precision-recall), the CLIP score
of a text-to-image model with eval.clip_model, and the paired error against the FP samples of the same
noise seed, for every quantization seed of the row -> metrics/<row>.json. A local model without
Inception weights gets the paired error only."""

from pipeline.config import Config
from pipeline.eval.metrics import ClipScorer, evaluate_quant_seeds, evaluate_runs, measured_features, read_reference
from pipeline.eval.report import metrics_record
from pipeline.eval.sampling import read_samples
from pipeline.infra.device import resolve_device
from pipeline.infra.storage import read_tensors, write_json
from pipeline.models.denoiser import read_prompts
from pipeline.params import load_config
from stages.layout import CLASSIFIER, FP, REFERENCE, entry_argument, metrics_path, samples_path
from stages.lineage import check_classifier, check_input, stage_provenance


def main(row: str) -> None:
    cfg = load_config(model_checks=False)
    variant = None if row == FP else cfg.row_variant(row)
    fp_runs, fp_attrs = read_samples(samples_path(FP))
    check_input(fp_attrs, cfg, "sample_fp", None, samples_path(FP))
    model = fp_attrs["model_hash"]
    runs = {}
    for seed in [None] if row == FP else cfg.quant.seeds:
        path = samples_path(row, seed)
        runs[seed], attrs = read_samples(path)
        check_input(attrs, cfg, "sample_fp" if row == FP else "sample", model, path, variant, seed)
    measure = metric_settings(cfg, model, next(iter(fp_runs.values())))
    if row == FP:
        found = evaluate_runs(fp_runs, **measure)
    else:
        found = evaluate_quant_seeds(runs, fp_runs=fp_runs, **measure)
    provenance = stage_provenance(cfg, "fid_fp" if row == FP else "fid", model, variant)
    if attrs.get("attention"):  # the tables name the rows whose attention matmuls are quantized
        variant = variant._replace(method=f"{variant.method}+attn")
    write_json(metrics_path(row), metrics_record(attrs["label"], variant, attrs["steps"], found, provenance))


def metric_settings(cfg: Config, fp_hash: str, fp_samples) -> dict:
    """The settings of :func:`evaluate_runs` that the ``eval`` section and the reference stage give,
    for samples like ``fp_samples`` (the reference features must be of their size), inputs checked."""
    evaluation, sample = cfg.eval, cfg.sample
    device = resolve_device(cfg.device)
    check_classifier(cfg)
    tensors, header = read_tensors(REFERENCE)
    check_input(header, cfg, "reference", fp_hash, REFERENCE)
    return dict(
        reference=read_reference(tensors, header, fp_samples, str(REFERENCE)),
        features=measured_features(
            cfg.model.source,
            str(CLASSIFIER),
            evaluation.inception_weights,
            evaluation.reference_images,
            cuda=device.type == "cuda",
        ),
        kid_subset_size=evaluation.kid_subset_size,
        isc_splits=evaluation.isc_splits,
        prc_neighborhood=evaluation.prc_neighborhood,
        clip=ClipScorer(evaluation.clip_model, device=device) if evaluation.clip_model else None,
        prompts=read_prompts(sample.prompts, sample.num_samples) if sample.prompts else None,
    )


if __name__ == "__main__":
    main(entry_argument())
