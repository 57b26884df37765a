"""Stage fid: FID / KID / ISC / precision-recall (digit-classifier features) of FP and quantized
samples against the real digits -> metrics.json."""

import torch
import zarr

from pipeline.config import load_config
from pipeline.data import load_digits_images, to_uint8_rgb
from pipeline.io import write_json
from pipeline.metrics import FEATURE_NOTE, confident_share, fidelity_metrics, paired_error
from stages.layout import CLASSIFIER, METRICS, SAMPLES


def main() -> None:
    cfg = load_config()
    e = cfg.eval
    samples = zarr.open_group(str(SAMPLES), mode="r")
    reference = to_uint8_rgb(load_digits_images(cfg.model.image_size)[0])
    metrics = {"features": FEATURE_NOTE, "quant_label": samples.attrs["quant_label"]}
    for name in ("fp", "quant"):
        images = to_uint8_rgb(torch.from_numpy(samples[name][:]))
        metrics[name] = fidelity_metrics(images, reference, str(CLASSIFIER), e.kid_subset_size, e.isc_splits, e.prc_neighborhood)
        metrics[name]["confident_share"] = confident_share(images, str(CLASSIFIER))
        metrics[name]["num_samples"] = len(images)
    metrics["paired"] = paired_error(torch.from_numpy(samples["fp"][:]), torch.from_numpy(samples["quant"][:]))
    write_json(METRICS, metrics)


if __name__ == "__main__":
    main()
