"""Stage reference: the features of the reference set, computed once for every row, seed and peer ->
artifacts/reference.safetensors (the features FID, KID and precision / recall use, and sFID's spatial
features with Inception). The real digits for the embedded default; the images of
eval.reference_images, at the size of the model's samples, for a local model; no features (an empty
file that says so) for a local model without Inception weights or reference images."""

from pipeline.eval.metrics import featurize, measured_features, reference_set, sample_pixel_size
from pipeline.infra.device import resolve_device
from pipeline.infra.fingerprint import model_hash
from pipeline.infra.storage import write_tensors
from pipeline.models.local import find_layout
from pipeline.params import load_config
from stages.layout import CLASSIFIER, FP_MODEL, REFERENCE
from stages.lineage import check_classifier, stage_provenance


def main() -> None:
    cfg = load_config(model_checks=False)
    e = cfg.eval
    check_classifier(cfg)
    cuda = resolve_device(cfg.device).type == "cuda"
    features = measured_features(cfg.model.source, str(CLASSIFIER), e.inception_weights, e.reference_images, cuda)
    header = stage_provenance(cfg, "reference", model_hash(FP_MODEL))
    if features is None:
        write_tensors(REFERENCE, {}, {**header, "features": None})
        return
    images = reference_set(
        cfg.model.source, cfg.model.image_size, e.reference_images, sample_pixel_size(find_layout(FP_MODEL))
    )
    found = featurize(images, features, reference=True)
    write_tensors(
        REFERENCE, found, {**header, "features": features.note, "size": list(images.shape[-2:]), "count": len(images)}
    )


if __name__ == "__main__":
    main()
