"""Stage pts: per-step activation calibration on the weight-quantized network (PTS voting for the
methods that use it) -> artifacts/act_params.safetensors."""

from pipeline.actcalib import calibrate_activations
from pipeline.calib import open_calibration
from pipeline.config import load_config
from pipeline.diffusion import resolve_device
from pipeline.fingerprint import check_same_model
from pipeline.io import write_tensors
from pipeline.quant.artifacts import act_tensors
from pipeline.quantized import load_quantized_unet
from stages.layout import ACT_PARAMS, CALIB, FP_MODEL, WEIGHTS


def main() -> None:
    cfg = load_config()
    device = resolve_device(cfg.device)
    calib = open_calibration(CALIB)
    steps = calib.attrs["steps"]
    unet, _, layers, headers = load_quantized_unet(FP_MODEL, WEIGHTS, None, a_bits=cfg.quant.a_bits, steps=steps)
    check_same_model(calib.attrs, headers["weights"]["model_hash"], str(CALIB))
    unet.to(device)
    p = cfg.pts
    calibrate_activations(unet, layers, calib, p.calib_records, p.batch_size, p.momentum, device)
    header = {**headers["weights"], "a_bits": cfg.quant.a_bits, "steps": steps}
    write_tensors(ACT_PARAMS, act_tensors(layers), header)


if __name__ == "__main__":
    main()
