"""Stage eval_files (always run; cheap): what the metrics read from outside the repository, listed so
that DVC reruns the stages that read it when it changes -> artifacts/eval_files/reference.json (the
reference folder's images: name, size, modification time; the Inception weights file's size and
time), artifacts/eval_files/clip.json (the CLIP folder's files). A listing that comes out unchanged
reruns nothing downstream."""

from pipeline.eval.metrics import file_listing, reference_listing
from pipeline.infra.storage import write_json
from pipeline.preflight import load_config
from stages.layout import CLIP_FILES, REFERENCE_FILES


def main() -> None:
    cfg = load_config()
    e = cfg.eval
    write_json(
        REFERENCE_FILES,
        {
            "reference_images": reference_listing(e.reference_images),
            "inception_weights": file_listing(e.inception_weights),
        },
    )
    write_json(CLIP_FILES, {"clip_model": file_listing(e.clip_model)})


if __name__ == "__main__":
    main()
