"""Stage recon: quantize the weights (MSE-searched scales; nearest rounding for minmax)."""

from pipeline.config import load_config
from pipeline.diffusion import load_fp_model
from pipeline.fingerprint import model_hash
from pipeline.io import write_tensors
from pipeline.methods import METHODS
from pipeline.quant import QuantSpec, quantize
from pipeline.quant.artifacts import weight_tensors
from pipeline.recon import init_weight_quantizers
from stages.layout import FP_MODEL, WEIGHTS


def main() -> None:
    cfg = load_config()
    q = cfg.quant
    method = METHODS[q.method]
    unet, _ = load_fp_model(FP_MODEL)
    layers = quantize(unet, QuantSpec(w_bits=q.w_bits, split=method.split))
    init_weight_quantizers(layers, q.weight_clip_grid, q.weight_clip_p)
    header = {"model_hash": model_hash(FP_MODEL), "method": q.method, "w_bits": q.w_bits, "split": method.split}
    write_tensors(WEIGHTS, weight_tensors(layers), header)


if __name__ == "__main__":
    main()
