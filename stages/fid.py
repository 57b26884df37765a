"""Stage fid@<row> (and fid_fp): the distribution metrics of each seed's samples against the reference
features of the reference stage (FID, sFID with Inception, KID, ISC, precision-recall), the CLIP score
of a text-to-image model with eval.clip_model, and the paired error against the FP samples of the same
seed -> metrics/<row>.json. A local model without Inception weights gets the paired error only."""

from pipeline.eval.metrics import ClipScorer, evaluate_runs, measured_features, read_reference
from pipeline.eval.report import metrics_record
from pipeline.eval.sampling import read_samples
from pipeline.infra.storage import read_tensors, write_json
from pipeline.models.denoiser import read_prompts
from pipeline.preflight import load_config
from stages.layout import CLASSIFIER, FP, REFERENCE, entry_argument, metrics_path, samples_path
from stages.lineage import check_input, stage_provenance


def main(row: str) -> None:
    cfg = load_config()
    evaluation, sample = cfg.eval, cfg.sample
    variant = None if row == FP else cfg.row_variant(row)
    runs, attrs = read_samples(samples_path(row))
    # fid does not read the model: its hash comes from the samples
    check_input(attrs, cfg, "sample_fp" if row == FP else "sample", None, samples_path(row), variant)
    check_input(read_tensors(CLASSIFIER)[1], cfg, "classifier", None, CLASSIFIER)
    tensors, header = read_tensors(REFERENCE)
    check_input(header, cfg, "reference", attrs["model_hash"], REFERENCE)
    reference = read_reference(tensors, header, next(iter(runs.values())), str(REFERENCE))
    fp_runs = None
    if row != FP:
        fp_runs, fp_attrs = read_samples(samples_path(FP))
        check_input(fp_attrs, cfg, "sample_fp", attrs["model_hash"], samples_path(FP))
    found = evaluate_runs(
        runs,
        reference,
        measured_features(cfg.model.source, str(CLASSIFIER), evaluation.inception_weights, evaluation.reference_images),
        kid_subset_size=evaluation.kid_subset_size,
        isc_splits=evaluation.isc_splits,
        prc_neighborhood=evaluation.prc_neighborhood,
        fp_runs=fp_runs,
        clip=ClipScorer(evaluation.clip_model) if evaluation.clip_model else None,
        prompts=read_prompts(sample.prompts, sample.num_samples) if sample.prompts else None,
    )
    provenance = stage_provenance(cfg, "fid_fp" if row == FP else "fid", attrs["model_hash"], variant)
    write_json(metrics_path(row), metrics_record(attrs["label"], variant, attrs["steps"], found, provenance))


if __name__ == "__main__":
    main(entry_argument())
