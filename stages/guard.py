"""Stage guard@<name>: LES that never hurts (docs/method.md §2, the guard). For each quantization seed, the row with
learned γ and the row with γ = 1 (same bits, same activation method) are sampled on held-out noise
(guard.seed, never a noise seed of the tables) and compared with FP sample by sample (guard.criterion:
in FID's feature space, or by pixel MSE); the one closer to FP is kept, and its metrics become the
guard row's -> metrics/<name>.json, reports/guard/<name>.json."""

import time
from functools import partial

from pipeline.eval.metrics import distance_features, feature_space
from pipeline.eval.paired import per_sample_mse
from pipeline.eval.report import guarded_record
from pipeline.eval.sampling import generate
from pipeline.infra.device import resolve_device
from pipeline.infra.fingerprint import model_hash
from pipeline.infra.storage import read_json, write_json
from pipeline.models.denoiser import load_denoiser, read_prompts
from pipeline.models.diffusion import ddim_scheduler, load_fp_model
from pipeline.models.quantized import load_quantized_unet
from pipeline.params import load_config
from stages.layout import (
    CLASSIFIER,
    FP_MODEL,
    act_params_path,
    entry_argument,
    metrics_path,
    report_path,
    weights_path,
)
from stages.lineage import check_classifier, check_input, stage_provenance, write_report


def main(name: str) -> None:
    cfg = load_config()
    guard, sample = cfg.guard, cfg.sample
    entry = cfg.entry("guards", name)
    device = resolve_device(cfg.device)
    fp_hash = model_hash(FP_MODEL)
    prompts = read_prompts(sample.prompts, guard.num_samples) if sample.prompts else None

    criterion = cfg.guard_criterion()
    represent = None  # pixels: the samples themselves
    if criterion == "features":
        check_classifier(cfg)
        represent = partial(
            distance_features,
            features=feature_space(str(CLASSIFIER), cfg.eval.inception_weights, device.type == "cuda"),
        )

    def held_out(unet, train_scheduler, desc):
        """The held-out samples, or their features under the features criterion."""
        model = load_denoiser(FP_MODEL, unet, prompts).to(device)
        scheduler = ddim_scheduler(train_scheduler, cfg.diffusion.steps)
        images = generate(
            model,
            scheduler,
            num_samples=guard.num_samples,
            batch_size=guard.batch_size,
            eta=sample.eta,
            seed=guard.seed,
            device=device,
            desc=desc,
            guidance_scale=sample.guidance_scale,
            precision=cfg.autocast,
        )
        return images if represent is None else represent(images)

    candidates = {"les": entry.les, "no_les": entry.no_les}
    records = {role: read_json(metrics_path(row)) for role, row in candidates.items()}
    for role, row in candidates.items():  # before the sampling: a stale metrics file fails at once
        check_input(records[role]["provenance"], cfg, "fid", fp_hash, metrics_path(row), cfg.row_variant(row))
    start = time.perf_counter()
    fp = held_out(*load_fp_model(FP_MODEL), "guard: FP held-out")
    decisions = {}
    for seed in cfg.quant.seeds:
        errors = {}
        for role, row in candidates.items():
            weights = cfg.rows[row].weights
            paths = weights_path(weights, seed), act_params_path(row, seed)
            quantized = load_quantized_unet(FP_MODEL, *paths, fp_hash, cfg.diffusion.steps)
            check_input(
                quantized.headers["weights"], cfg, "recon", fp_hash, paths[0], cfg.weights_variant(weights), seed
            )
            check_input(quantized.headers["act"], cfg, "pts", fp_hash, paths[1], cfg.row_variant(row), seed)
            found = held_out(quantized.unet, quantized.scheduler, f"guard: {row} q{seed} held-out")
            errors[role] = float(per_sample_mse(fp, found).mean())
        kept = "les" if errors["les"] <= errors["no_les"] else "no_les"
        decisions[str(seed)] = {"held_out_error": errors, "kept": kept, "row": candidates[kept]}
    provenance = stage_provenance(cfg, "guard", fp_hash, cfg.row_variant(name))
    write_json(metrics_path(name), guarded_record(records, decisions, provenance))
    report = {
        "rule": "per quantization seed, keep learned γ unless γ = 1 is closer to FP on the held-out samples",
        "criterion": criterion,
        "held_out": {"seed": guard.seed, "num_samples": guard.num_samples},
        "quant_seeds": decisions,
        "kept_les": sum(d["kept"] == "les" for d in decisions.values()),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_report(report_path("guard", name), report)


if __name__ == "__main__":
    main(entry_argument())
