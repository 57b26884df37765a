"""Predicted peak memory and disk of each stage, known before a run: from the model's shapes on the meta
device, nothing allocated and nothing computed.

A pass's peak is simulated rather than guessed: the UNet runs on meta tensors under :class:`LiveBytes`,
a dispatch mode that adds a storage's bytes when an operator creates it and removes them when the last
tensor on it is gone, as the allocator sees them (less its rounding and caching). Training passes keep
what autograd saves until their backward pass. A stage's peak adds what it holds besides: the weights
(one network, or FP and quantized), the captures the capture budget places on the device and in host
memory (:mod:`pipeline.calibration.capture`, cut into the same windows), the dump's layer I/O batch,
reconstruction's rounding variables with their gradients and Adam's moments (the shared activation steps'
learning is counted as a reconstruction), the score matrices of quantized attention matmuls, the text encoder that
embeds the prompts (host memory, while the stage loads) and the autoencoder that decodes samples.

Not counted: allocator rounding, caching and fragmentation, and the process's own baseline (the
interpreter and libraries), which callers add from a measurement of their own process.
"""

from __future__ import annotations

import copy
import inspect
import json
import weakref
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipeline.calibration.capture import GB, Budget, capture_io, io_numel, windows
from pipeline.config import Config
from pipeline.method.adaround import RoundingOffsets, attach_rounding, reconstruction_units, soft_rounding
from pipeline.methods import METHODS
from pipeline.models.denoiser import Decoder, probe_kwargs
from pipeline.models.local import diffusers_class, find_layout
from pipeline.quant import QuantSpec, quant_layers, quantizable_layers, quantize
from pipeline.quant.attention import quantize_attention


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that operators create, live and at their peak, while the mode is on.

    Attention runs as the fused kernel that CPU and CUDA pick (output and log-sum-exp, no score
    matrix); on the meta device torch would otherwise decompose it into matmuls and a softmax. Quantized
    attention matmuls (:func:`with_unfused_attention`) hold the score matrix, and are counted so."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage -> [bytes, tensors on it]
        self.now = self.peak = 0
        self._attention = F.scaled_dot_product_attention

    def __enter__(self):
        F.scaled_dot_product_attention = _fused_attention
        return super().__enter__()

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self._attention
        return super().__exit__(*exc)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    if key in inputs:  # a view or an in-place result of a tensor made before the mode
                        continue
                    self.live[key] = [storage.nbytes(), 0]
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                self.live[key][1] += 1
                weakref.finalize(tensor, self._release, key)
        return out


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return fused(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def _inputs(unet: nn.Module, batch: int, text_length: int) -> tuple[tuple, dict]:
    c = unet.config
    x = torch.empty(batch, c.in_channels, c.sample_size, c.sample_size, device="meta")
    return (x, torch.zeros(batch, dtype=torch.long, device="meta")), probe_kwargs(unet, batch, "meta", text_length)


def forward_peak(unet: nn.Module, batch: int, text_length: int = 77, keep_layer_io: bool = False) -> int:
    """Peak bytes of one no-grad forward pass of ``batch`` records; with ``keep_layer_io`` every
    quantized layer's input and output stays alive to the end of the pass (the dump's layer I/O pass)."""
    args, kwargs = _inputs(unet, batch, text_length)
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if keep_layer_io:
            stack.enter_context(capture_io(quantizable_layers(unet)))
        live = stack.enter_context(LiveBytes())
        unet(*args, **kwargs)
    return live.peak


def with_unfused_attention(unet: nn.Module) -> nn.Module:
    """A meta copy of ``unet`` whose attention runs as the quantized attention matmuls do: two matmuls and
    the score matrix between them (quantizers off: their temporaries are the passes' allowance)."""
    q_unet = copy.deepcopy(unet)
    with torch.device("meta"):
        quantize(q_unet, QuantSpec(w_bits=4, a_bits=8))
        quantize_attention(q_unet, 8, 8, 1)
    return q_unet


def _unit_calls(
    unet: nn.Module, batch: int, text_length: int, unfused: bool = False
) -> dict[str, tuple[nn.Module, tuple, object]]:
    """Per reconstruction unit of the weight-quantized network (blocks, stray layers) with AdaRound's
    rounding variables attached: the unit, its call's (args, kwargs) and its output on ``batch``
    records, meta tensors. ``unfused``: attention as :func:`with_unfused_attention` runs it."""
    q_unet = with_unfused_attention(unet) if unfused else copy.deepcopy(unet)
    with torch.device("meta"):
        for layer in (quant_layers(q_unet) if unfused else quantize(q_unet, QuantSpec(w_bits=4))).values():
            layer.quantize_weights = True
            attach_rounding(layer)
    args, kwargs = _inputs(q_unet, 1, text_length)
    units = dict(reconstruction_units(q_unet, lambda: q_unet(*args, **kwargs)))
    calls: dict[str, tuple] = {}

    def keep(name, module, a, k, output):
        calls.setdefault(name, (module, a, k, output))

    handles = [m.register_forward_hook(partial(keep, n), with_kwargs=True) for n, m in units.items()]
    try:
        with torch.no_grad():
            args, kwargs = _inputs(q_unet, batch, text_length)
            q_unet(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (module, (a, k), output) for name, (module, a, k, output) in calls.items()}


def unit_training_peak(calls: dict) -> int:
    """Peak bytes of the costliest unit's AdaRound iteration: the forward pass with soft rounding, the
    backward pass into the rounding variables and Adam's step (its moments made on the first), the
    unit's inputs not counted (they are the captures')."""
    peak = 0
    for module, (args, kwargs), _ in calls.values():
        offsets = [m for m in module.modules() if isinstance(m, RoundingOffsets)]
        # the identity hooks keep what autograd saves alive as Python tensors, so LiveBytes sees it held
        saved = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        with soft_rounding(offsets), saved, LiveBytes() as live:
            out = module(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            out.float().pow(2).mean().backward()
            torch.optim.Adam([o.v for o in offsets], foreach=True).step()  # as on CUDA: all at once
        module.zero_grad(set_to_none=True)
        peak = max(peak, live.peak)
    return peak


def _companions(model_cfg) -> tuple[int, nn.Module | None]:
    """Bytes of the model's text encoder (0 without one) and its autoencoder on the meta device (None
    without one), from their configs."""
    if model_cfg.source != "local":
        return 0, None
    layout = find_layout(model_cfg.path)
    text = 0
    if layout.text_encoder is not None:
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device("meta"):
            encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(layout.text_encoder))
        text = _parameter_bytes(encoder)  # float32, as it is loaded
    if layout.autoencoder is None:
        return text, None
    config = json.loads((layout.autoencoder / "config.json").read_text())
    with torch.device("meta"):
        return text, diffusers_class(config["_class_name"]).from_config(config)


def decode_peak(autoencoder: nn.Module, latents: tuple[int, ...]) -> int:
    """Peak bytes of decoding a batch of ``latents`` (B, C, H, W) to pixels."""
    with torch.no_grad(), LiveBytes() as live:
        autoencoder.decode(torch.empty(latents, device="meta"))
    return live.peak


def _parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _tensor_bytes(value, rows: int) -> int:
    """Float32 bytes of the tensors in ``value`` for one record of ``rows`` batch rows."""
    return sum(
        4 * v.numel() // v.shape[0] * rows for v in tree_leaves(value) if isinstance(v, torch.Tensor) and v.dim()
    )


@dataclass(frozen=True)
class StageCost:
    stage: str
    device: int  # peak bytes on the device (with device: cpu, in host memory)
    host: int  # peak host bytes beyond the device's, the process baseline not included
    disk: int  # scratch files the capture budget spills to, beyond the stage's outputs
    detail: str
    staged: int = 0  # host bytes while the stage loads: the weights before they move, the text encoder
    # weights the stage holds but never reads: mapped from the weights file, they take no memory until
    # read (on a GPU they are, when they are copied there)
    unread: int = 0
    # processes at that peak at once on the CPU: the quantization seeds of recon and pts in their workers
    # (forked: the process baseline stays shared); on CUDA one
    processes: int = 1

    def host_peak(self, cuda: bool) -> int:
        """Host bytes at the stage's peak, the process baseline not included."""
        if cuda:
            return self.host + self.staged
        return self.processes * (self.host + max(self.device, self.staged) - self.unread)


def seed_processes(workers: int, seeds: list[int]) -> tuple[int, str]:
    """How many processes of a stage that runs its quantization seeds side by side (recon, pts) are at
    their peak at once on the CPU, and the words that say so in a prediction's detail."""
    processes = min(workers, len(seeds))
    return processes, f", in each of {processes} seeds' processes on the CPU" if processes > 1 else ""


def _placed(sizes: list[int], budget: Budget) -> tuple[int, int, int]:
    """Device, host and scratch bytes of the largest window that ``budget`` cuts ``sizes`` into."""
    names = [str(i) for i in range(len(sizes))]
    by_name = dict(zip(names, sizes))
    total = max(sum(by_name[n] for n in window) for window in windows(names, by_name, budget.window_bytes))
    device = min(total, budget.device_bytes)
    host = min(total - device, budget.host_bytes)
    return device, host, total - device - host


def stage_costs(cfg: Config, unet: nn.Module, text_length: int = 77) -> list[StageCost]:
    """Predicted peaks of the stages that run the network, for the params ``cfg`` and the UNet (meta)."""
    weights = _parameter_bytes(unet)
    text_encoder, autoencoder = _companions(cfg.model)
    conditional = probe_kwargs(unet) != {}
    guided = conditional and cfg.calib.guidance_scale != 1
    rows = 2 if guided else 1  # UNet rows a record takes (classifier-free guidance runs both)
    layers = quantizable_layers(unet)
    args, kwargs = _inputs(unet, 1, text_length)
    numel = io_numel(partial(unet, **kwargs), layers, args)
    layer_io = [4 * (a + b) for a, b in numel.values()]  # float32 input and output of one record
    budget = Budget.from_config(cfg.capture)
    batch = cfg.capture.batch_size
    steps, samples = cfg.diffusion.steps, cfg.calib.num_samples
    costs = []

    layer_batch = max(1, min(cfg.calib.batch_size, budget.device_bytes // sum(layer_io)))
    dump = forward_peak(unet, cfg.calib.batch_size * rows, text_length)
    dump_io = forward_peak(unet, layer_batch * rows, text_length, keep_layer_io=True)
    costs.append(
        StageCost(
            "dump",
            weights + max(dump, dump_io),
            0,
            0,
            f"trajectories in batches of {cfg.calib.batch_size}, layer I/O in batches of {layer_batch}",
            weights + text_encoder,
        )
    )

    forward = forward_peak(unet, batch * rows, text_length)
    stats_records = steps * min(cfg.calib.layer_records_per_step, samples * rows)
    d, h, s = _placed([stats_records * size for size in layer_io], budget)
    costs.append(
        StageCost("stats", weights + forward + d, h, s, f"layer I/O of {stats_records} records", weights + text_encoder)
    )

    les_records = cfg.les.records or steps * samples * rows
    d, h, s = _placed([les_records * size for size in layer_io], budget)
    # a layer's LES iteration: an allowance of eight float32 copies of its batch's input and output
    # (the batch, its quantized input, the output, their gradients)
    les_train = 8 * cfg.les.batch_size * max(layer_io) // 4
    costs.append(
        StageCost(
            "les",
            2 * weights + max(forward, les_train) + d,
            h,
            s,
            f"layer I/O of {les_records} records",
            2 * weights + text_encoder,
        )
    )

    if any(METHODS[v.method].adaround for v in cfg.weights.values()):
        recon_records = cfg.recon.records
        half = budget.halved()
        calls = _unit_calls(unet, cfg.recon.batch_size * rows, text_length)
        targets = [recon_records * _tensor_bytes(out, rows) for _, _, out in calls.values()]
        unit_inputs = [recon_records * _tensor_bytes(call, rows) for _, call, _ in calls.values()]
        d, h, s = _placed(targets, half)
        di, hi, si = _placed([max(unit_inputs)], half)
        train = unit_training_peak(calls)
        # the FP and the quantized network, the rounding variables every reconstructed layer keeps (each
        # as large as its weights) and one more weight copy: their last gradients, which benchmarks/scale.json
        # measured and reconstruction now drops after each block (an over-estimate until measured again);
        # at the end the 8-bit integer weights
        held = 4 * weights
        processes, in_processes = seed_processes(cfg.recon.workers, cfg.quant.seeds)
        costs.append(
            StageCost(
                "recon",
                held + max(forward, train, weights // 4) + d + di,
                h + hi,
                s + si,
                f"block inputs and FP targets of {recon_records} records{in_processes}",
                2 * weights + text_encoder,
                processes=processes,
            )
        )

    # the quantized network's passes: an allowance of twice the FP pass (quantizer temporaries), and
    # twice the weights (the FP ones and the dequantized integer ones the layers run on; the FP ones are
    # never read, so on the CPU they stay in the file)
    unread = sum(m.weight.numel() * m.weight.element_size() for m in layers.values())
    # rows that quantize the attention matmuls hold each attention's score matrix
    attention = any(cfg.row_attention(row) is not None for row in cfg.rows)
    network = with_unfused_attention(unet) if attention else unet
    pts = 2 * weights + 2 * forward_peak(network, cfg.pts.batch_size * rows, text_length)
    pts_host, pts_disk = 0, 0
    calibrated = f"batches of {cfg.pts.batch_size}"
    if any(METHODS[cfg.row_variant(row).method].shared_acts for row in cfg.rows):
        shared = cfg.shared_acts  # one pass over the initialisation's records, then blocks learned like recon's
        pts = max(pts, 2 * weights + 2 * forward_peak(network, shared.init_records * rows, text_length))
        calibrated += f", one pass of {shared.init_records} (shared steps' initialisation)"
        if shared.learn:
            half = budget.halved()
            calls = _unit_calls(unet, shared.batch_size * rows, text_length, unfused=attention)
            d, pts_host, pts_disk = _placed(
                [shared.records * _tensor_bytes(out, rows) for *_, out in calls.values()], half
            )
            di, hi, si = _placed(
                [max(shared.records * _tensor_bytes(call, rows) for _, call, _ in calls.values())], half
            )
            train = unit_training_peak(calls)  # with rounding variables: an over-estimate of the steps' learning
            pts, pts_host, pts_disk = max(pts, 3 * weights + train + d + di), pts_host + hi, pts_disk + si
            calibrated += f", block inputs and FP targets of {shared.records} records"
    processes, in_processes = seed_processes(cfg.pts.workers, cfg.quant.seeds)
    calibrated += in_processes
    costs.append(StageCost("pts", pts, pts_host, pts_disk, calibrated, 2 * weights + text_encoder, unread, processes))
    sample_rows = 2 if conditional and cfg.sample.guidance_scale != 1 else 1
    sample = forward_peak(network, cfg.sample.batch_size * sample_rows, text_length)
    sampled = f"batches of {cfg.sample.batch_size}"
    sample, decoder = 2 * sample, 0
    if autoencoder is not None:  # it stays on the device while the samples are decoded a batch at a time
        c = unet.config
        batch = min(cfg.sample.batch_size, inspect.signature(Decoder.__call__).parameters["batch_size"].default)
        decoder = _parameter_bytes(autoencoder)
        sample = max(sample, decode_peak(autoencoder, (batch, c.out_channels, c.sample_size, c.sample_size)))
        sampled += f", decoded {batch} at a time"
    costs.append(
        StageCost("sample", 2 * weights + decoder + sample, 0, 0, sampled, 2 * weights + text_encoder + decoder, unread)
    )
    return costs


def gib(size: int) -> str:
    return f"{size / GB:.2f} GiB"
