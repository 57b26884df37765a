"""Stage eval_files (always run; cheap): what the metrics read from outside the repository, listed so
that DVC reruns the stages that read it when it changes -> artifacts/eval_files/reference.json (the
reference folder's images: name, size, modification time; the Inception weights file's size and
time), artifacts/eval_files/clip.json (the CLIP folder's files). A listing that comes out unchanged
reruns nothing downstream."""

from pipeline.config import read_params
from pipeline.infra.listing import file_listing, reference_listing
from pipeline.infra.storage import write_json
from stages.layout import CLIP_FILES, REFERENCE_FILES


def main() -> None:
    evaluation = read_params().eval  # the schema alone: the model checks would import torch and diffusers
    write_json(
        REFERENCE_FILES,
        {
            "reference_images": reference_listing(evaluation.reference_images),
            "inception_weights": file_listing(evaluation.inception_weights),
        },
    )
    write_json(CLIP_FILES, {"clip_model": file_listing(evaluation.clip_model)})


if __name__ == "__main__":
    main()
