"""The numbers behind docs/real-models.md: FLOPs and per-record tensor sizes of the real UNets (built
on the meta device, no weights), and per-iteration costs measured on small random models on this CPU.

    OMP_NUM_THREADS=1 python docs/estimate_costs.py

Each phase's cost is measured as a multiple of "one UNet forward per record" (LES / AdaRound iterate
over layers / blocks whose FLOPs sum to about one forward; their iterations add backward passes and
quantizer overhead); real-model time = that multiple x the real UNet's forward FLOPs x the work the
paper's settings imply. The multiples are measured, the conversion to GPU time assumes a sustained
throughput: estimates, not measurements."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from benchmarks.topologies import LDM4_UNET, SD_V1_UNET  # noqa: E402
from pipeline.calibration.capture import Budget  # noqa: E402
from pipeline.calibration.dump import dump_calibration, open_calibration, random_records, records_by_step  # noqa: E402
from pipeline.config import CalibConfig  # noqa: E402
from pipeline.infra.storage import atomic_store  # noqa: E402
from pipeline.method.adaround import AdaRoundSettings, adaround  # noqa: E402
from pipeline.method.les import LESSettings, learn_all  # noqa: E402
from pipeline.method.weight_init import init_weight_quantizers  # noqa: E402
from pipeline.models.denoiser import Denoiser, probe_kwargs  # noqa: E402
from pipeline.models.diffusion import ddim_scheduler  # noqa: E402
from pipeline.preflight import calibration_store_bytes, layer_io_record_bytes  # noqa: E402
from pipeline.quant import QuantSpec, quantizable_layers, quantize  # noqa: E402

TEXT_LENGTH = 16  # tokens of the small models' prompts


def sd_like(width: int, size: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=4 * width // 2,
        attention_head_dim=8,
        norm_num_groups=4,
    )


def forward(unet, batch: int, device: str, text_length: int) -> None:
    c = unet.config
    x = torch.zeros(batch, c.in_channels, c.sample_size, c.sample_size, device=device)
    unet(x, torch.full((batch,), 500, device=device), **probe_kwargs(unet, batch, device, text_length))


def shape_facts(unet, text_length: int = 77) -> dict:
    """Per record: forward FLOPs, bytes of every quantized layer's input + output in float16 (the
    dump), the largest block input in float32 (AdaRound keeps one per record)."""
    layers = quantizable_layers(unet)
    blocks = {"max": 0}

    def block_hook(module, args, kwargs):
        blocks["max"] = max(blocks["max"], 4 * args[0][0].numel())

    handles = [
        m.register_forward_pre_hook(block_hook, with_kwargs=True)
        for m in unet.modules()
        if type(m).__name__ in ("ResnetBlock2D", "Transformer2DModel", "Attention") and len(list(m.children()))
    ]
    with FlopCounterMode(display=False) as counter:
        forward(unet, 1, "meta", text_length)
    for h in handles:
        h.remove()
    params = sum(p.numel() for p in unet.parameters())
    quantized = sum(m.weight.numel() for m in layers.values())
    defaults = CalibConfig()
    return {
        "params": params,
        "quantized_params": quantized,
        "gflops_per_forward": counter.get_total_flops() / 1e9,
        "layer_io_bytes_per_record": layer_io_record_bytes(unet, text_length),
        # calib.zarr at the paper's N = 256, S = 20 under the default calib budget
        "calib_store_bytes_n256_s20": calibration_store_bytes(
            unet, 20, 256, defaults.layer_records_per_step, defaults.layer_io_gb
        ),
        "max_block_input_bytes_per_record": blocks["max"],
    }


def per_record_forward_seconds(unet, batch: int = 8, repeats: int = 3) -> float:
    with torch.no_grad():
        forward(unet, batch, "cpu", TEXT_LENGTH)
        start = time.perf_counter()
        for _ in range(repeats):
            forward(unet, batch, "cpu", TEXT_LENGTH)
    return (time.perf_counter() - start) / repeats / batch


def measured_multiples(unet, folder: Path, iters: int = 10, batch: int = 8) -> dict:
    """Seconds per iteration of LES (all layers) and AdaRound (all blocks), and per record of the
    dump, each divided by the seconds of one forward of one record."""
    width = unet.config.cross_attention_dim
    den = Denoiser(
        unet, prompt_embeddings=torch.randn(2, TEXT_LENGTH, width), null_embedding=torch.zeros(TEXT_LENGTH, width)
    )
    from diffusers import DDPMScheduler

    scheduler = ddim_scheduler(DDPMScheduler(), 2)
    forward = per_record_forward_seconds(den.unet)
    start = time.perf_counter()
    with atomic_store(folder / "calib.zarr") as tmp:
        dump_calibration(
            tmp,
            den,
            scheduler,
            quantizable_layers(unet),
            num_samples=batch,
            layer_records_per_step=batch,
            layer_io_gb=8.0,
            batch_size=batch,
            eta=0.0,
            seed=0,
            chunk_records=64,
            attrs={"prompts": None},
            device=torch.device("cpu"),
            guidance_scale=7.5,
        )
    records = 2 * (2 * batch) + 2 * batch  # trajectories (CFG: 2 forwards per step) + layer I/O replay
    dump = (time.perf_counter() - start) / records
    les_unet = type(unet).from_config(unet.config)
    layers = quantize(les_unet, QuantSpec(w_bits=4, a_bits=8))
    start = time.perf_counter()
    calib = open_calibration(folder / "calib.zarr")
    learn_all(
        layers,
        den,
        quantizable_layers(unet),
        records_by_step(calib, batch, seed=0),
        calib.attrs["steps"],
        LESSettings("focal", iters=iters, lr=1e-3, batch_size=batch),
        budget=Budget.of(4, 16),
    )
    les = (time.perf_counter() - start) / iters
    q = type(unet).from_config(unet.config)
    q.load_state_dict(unet.state_dict())
    q_layers = quantize(q, QuantSpec(w_bits=4))
    init_weight_quantizers(q_layers, 80, 2.4)
    inputs, _ = random_records(open_calibration(folder / "calib.zarr"), batch, seed=0)
    settings = AdaRoundSettings(
        iters=iters, lr=1e-3, batch_size=batch, reg_lambda=0.01, beta_start=20, beta_end=2, warmup=0.2, seed=0
    )
    start = time.perf_counter()
    adaround(den.with_unet(q), den, inputs, settings)
    ada = (time.perf_counter() - start) / iters
    unit = forward * batch  # one forward of a batch
    return {
        "forward_seconds_per_record": forward,
        "dump_per_record": dump / forward,
        "les_per_iteration": les / unit,
        "adaround_per_iteration": ada / unit,
        "batch": batch,
    }


def main() -> None:
    torch.set_num_threads(1)
    with torch.device("meta"):
        real = {
            "sd-v1.4": shape_facts(UNet2DConditionModel(**SD_V1_UNET)),
            "ldm4-bedroom": shape_facts(UNet2DModel(**LDM4_UNET)),
        }
    small = {}
    for name, (width, size) in {"tiny (8 ch, 8x8)": (8, 8), "small (32 ch, 16x16)": (32, 16)}.items():
        torch.manual_seed(0)
        unet = sd_like(width, size).eval().requires_grad_(False)
        with tempfile.TemporaryDirectory() as folder:
            with torch.device("meta"):
                facts = shape_facts(sd_like(width, size), TEXT_LENGTH)
            small[name] = {**facts, **measured_multiples(unet, Path(folder))}
    print(json.dumps({"real": real, "measured": small}, indent=1))


if __name__ == "__main__":
    main()
