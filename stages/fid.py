"""Stage fid: FID / KID / ISC / precision-recall (digit-classifier features) of FP and quantized
samples against the real digits -> metrics.json."""

import torch

from pipeline.config import load_config
from pipeline.data import load_digits_images, to_uint8_rgb
from pipeline.io import open_store, read_tensors, write_json
from pipeline.metrics import FEATURE_NOTE, confident_share, fidelity_metrics, paired_error
from stages.layout import CLASSIFIER, METRICS, SAMPLES
from stages.lineage import check_input, stage_provenance


def main() -> None:
    cfg = load_config()
    e = cfg.eval
    samples = open_store(SAMPLES, "samples store")
    check_input(samples.attrs, cfg, "sample", None, SAMPLES)  # fid does not read the model: its hash comes from samples
    check_input(read_tensors(CLASSIFIER)[1], cfg, "classifier", None, CLASSIFIER)
    provenance = stage_provenance(cfg, "fid", samples.attrs["model_hash"])
    reference = to_uint8_rgb(load_digits_images(cfg.model.image_size)[0])
    metrics = {
        "features": FEATURE_NOTE,
        "quant_label": samples.attrs["quant_label"],
        # strings, so that `dvc metrics diff` does not list them as numbers
        "provenance": {
            "model_hash": provenance["model_hash"],
            "params_hash": provenance["params_hash"],
            "seeds": ", ".join(f"{key}={value}" for key, value in provenance["seeds"].items()),
        },
    }
    for name in ("fp", "quant"):
        images = to_uint8_rgb(torch.from_numpy(samples[name][:]))
        metrics[name] = fidelity_metrics(images, reference, str(CLASSIFIER), e.kid_subset_size, e.isc_splits, e.prc_neighborhood)
        metrics[name]["confident_share"] = confident_share(images, str(CLASSIFIER))
        metrics[name]["num_samples"] = len(images)
    metrics["paired"] = paired_error(torch.from_numpy(samples["fp"][:]), torch.from_numpy(samples["quant"][:]))
    write_json(METRICS, metrics)


if __name__ == "__main__":
    main()
