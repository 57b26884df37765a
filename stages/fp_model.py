"""Stage fp_model: train the embedded default UNet on scikit-learn's digits (DDPM, 1000 steps), or
import a local diffusers model (model.source: local) into the pipeline's layout."""

import time

from pipeline.infra.storage import atomic_path, write_json
from pipeline.models.diffusion import save_fp_model
from pipeline.models.local import import_model
from pipeline.models.training import train_embedded
from pipeline.params import load_config
from stages.layout import FP_MODEL, FP_PROVENANCE, REPORTS
from stages.lineage import stage_provenance, write_report


def main() -> None:
    cfg = load_config()
    model = cfg.model
    if model.source == "local":
        with atomic_path(FP_MODEL) as tmp:
            layout = import_model(model.path, tmp)
            write_json(tmp / FP_PROVENANCE.name, stage_provenance(cfg, "fp_model", None))
        write_report(
            REPORTS / "fp_model.json",
            {
                "source": model.path,
                "unet": str(layout.unet.name),
                "autoencoder": layout.autoencoder is not None,
                "text_encoder": layout.text_encoder is not None,
            },
        )
        return
    start = time.perf_counter()
    ema, scheduler, losses = train_embedded(model, cfg.seed)
    with atomic_path(FP_MODEL) as tmp:
        save_fp_model(ema, scheduler, tmp)
        write_json(tmp / FP_PROVENANCE.name, stage_provenance(cfg, "fp_model", None))
    tail = losses[-100:]
    write_report(
        REPORTS / "fp_model.json",
        {
            "train_loss_last100": sum(tail) / len(tail),
            "train_seconds": round(time.perf_counter() - start, 1),
            "parameters": sum(p.numel() for p in ema.parameters()),
        },
    )


if __name__ == "__main__":
    main()
