"""Stage fid@<row> (and fid_fp): FID / KID / ISC / precision-recall (digit-classifier features) of
each seed's samples against the real digits, and the paired error against the FP samples of the same
seed -> metrics/<row>.json."""

from pipeline.eval.metrics import evaluate_runs, feature_space, reference_set
from pipeline.eval.report import metrics_record
from pipeline.eval.sampling import read_samples
from pipeline.infra.storage import read_tensors, write_json
from pipeline.preflight import load_config
from stages.layout import CLASSIFIER, FP, entry_argument, metrics_path, samples_path
from stages.lineage import check_input, stage_provenance


def main(row: str) -> None:
    cfg = load_config()
    evaluation = cfg.eval
    variant = None if row == FP else cfg.row_variant(row)
    runs, attrs = read_samples(samples_path(row))
    # fid does not read the model: its hash comes from the samples
    check_input(attrs, cfg, "sample_fp" if row == FP else "sample", None, samples_path(row), variant)
    check_input(read_tensors(CLASSIFIER)[1], cfg, "classifier", None, CLASSIFIER)
    fp_runs = None
    if row != FP:
        fp_runs, fp_attrs = read_samples(samples_path(FP))
        check_input(fp_attrs, cfg, "sample_fp", attrs["model_hash"], samples_path(FP))
    reference = reference_set(
        cfg.model.source, cfg.model.image_size, evaluation.reference_images, next(iter(runs.values()))
    )
    found = evaluate_runs(
        runs,
        reference,
        feature_space(str(CLASSIFIER), evaluation.inception_weights),
        kid_subset_size=evaluation.kid_subset_size,
        isc_splits=evaluation.isc_splits,
        prc_neighborhood=evaluation.prc_neighborhood,
        fp_runs=fp_runs,
    )
    provenance = stage_provenance(cfg, "fid_fp" if row == FP else "fid", attrs["model_hash"], variant)
    write_json(metrics_path(row), metrics_record(attrs["label"], variant, attrs["steps"], found, provenance))


if __name__ == "__main__":
    main(entry_argument())
