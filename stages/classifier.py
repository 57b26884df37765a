"""Stage classifier: train the digit classifier whose features FID uses (digit-classifier features)."""

from pipeline.infra.storage import write_tensors
from pipeline.models.classifier import train_classifier
from pipeline.models.digits import load_digits_images, seed_everything
from pipeline.params import load_config
from stages.layout import CLASSIFIER, REPORTS
from stages.lineage import stage_provenance, write_report


def main() -> None:
    cfg = load_config(model_checks=False)
    generator = seed_everything(cfg.classifier.seed)
    images, labels = load_digits_images(cfg.model.image_size)
    model, accuracy = train_classifier(
        images, labels, cfg.classifier.steps, cfg.classifier.batch_size, cfg.classifier.lr, generator
    )
    header = {
        **stage_provenance(cfg, "classifier", None),
        "image_size": cfg.model.image_size,
        "held_out_accuracy": accuracy,
    }
    write_tensors(CLASSIFIER, model.state_dict(), header)
    write_report(REPORTS / "classifier.json", {"held_out_accuracy": round(accuracy, 4)})


if __name__ == "__main__":
    main()
