"""Stage pts: per-step activation calibration on the weight-quantized network, with PTS voting for
the methods that use it -> artifacts/act_params.safetensors, artifacts/votes.zarr."""

import zarr

from pipeline.actcalib import calibrate_activations
from pipeline.calib import open_calibration
from pipeline.config import load_config
from pipeline.diffusion import resolve_device
from pipeline.fingerprint import check_same_model
from pipeline.io import atomic_path, write_json, write_tensors
from pipeline.methods import METHODS
from pipeline.pts import PTSVoter, select_pts_layers, vote_summary
from pipeline.quant.artifacts import act_tensors
from pipeline.quantized import load_quantized_unet
from pipeline.stats import auto_pts_layers
from stages.layout import ACT_PARAMS, CALIB, FP_MODEL, REPORTS, STATS, VOTES, WEIGHTS


def main() -> None:
    cfg = load_config()
    p = cfg.pts
    method = METHODS[cfg.quant.method]
    device = resolve_device(cfg.device)
    calib = open_calibration(CALIB)
    steps = calib.attrs["steps"]
    unet, _, layers, headers = load_quantized_unet(FP_MODEL, WEIGHTS, None, a_bits=cfg.quant.a_bits, steps=steps)
    check_same_model(calib.attrs, headers["weights"]["model_hash"], str(CALIB))
    unet.to(device)
    voter = None
    if method.pts:
        names = auto_pts_layers(STATS, p.auto_outlier_ratio) if p.layers == "auto" else select_pts_layers(list(layers), p.layers)
        voter = PTSVoter({n: layers[n] for n in names}, p.num_candidates, p.ratio_threshold)
    after_step = None if voter is None else (lambda s, x, t: voter(unet, s, x, t, p.batch_size))
    calibrate_activations(unet, layers, calib, p.calib_records, p.batch_size, p.momentum, device, after_step)
    header = {**headers["weights"], "a_bits": cfg.quant.a_bits, "steps": steps, "pts": voter is not None}
    write_tensors(ACT_PARAMS, act_tensors(layers), header)
    votes = voter.stacked() if voter else {}
    with atomic_path(VOTES) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        root.attrs.update({"steps": steps, "threshold": p.ratio_threshold, "pts": voter is not None})
        for name, arrays in votes.items():
            for key, value in arrays.items():
                root.create_array(f"{name}/{key}", data=value.numpy())
    write_json(REPORTS / "pts.json", vote_summary(votes))


if __name__ == "__main__":
    main()
