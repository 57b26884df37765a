"""Integer inference: the quantized layers of a fake-quantized UNet swapped for layers that run int8 kernels
(oneDNN's quantized conv / linear as torch ships them, x86 CPU), with the same numbers up to float32 rounding.

Notation, for one layer at sampling step s (see QuantLayer and docs/method.md §7):
  γ_c      LES factor of input channel c          p = part(c)   input-channel part (split quantization)
  Δ_{s,p}  activation step, z_{s,p} its zero point k_{s,c}  PTS exponent, e_s = max_c k_{s,c}
  w_q, z_w, s_w[o, p]  stored integer weight, its zero point and scale (per output channel and part)

1. Codes, bit for bit the fake path's: ``q_c = clamp(round((x_c / γ_c) / (Δ_{s,p} 2^-k_c)) + z_{s,p}, 0, 2^a - 1)``
   (uint8).
2. Weights, PTS folded in exactly: ``W8[o, c] = (w_q - z_w)[o, c] · 2^(e_s - k_{s,c})``; steps with the same
   exponents share one prepacked weight, so a layer without PTS holds one.
3. ``y[o] = Σ_p (Δ_{s,p} 2^-e_s) · s_w[o, p] · Σ_{c ∈ p} W8[o, c] (q_c - z_{s,p}) + b[o]``: one int32 GEMM per
   part (two for a split layer, summed), rescaled to float32 by the kernel.

Exactness. x86 kernels without VNNI / AMX multiply u8 × s8 and add adjacent pairs of products into int16 with
saturation (``vpmaddubsw``) before widening to int32, so a GEMM is exact only if ``2 (2^a - 1) max|W8| ≤ 32 767``.
A W4 weight has ``|w_q - z_w| ≤ 15``: ``2 · 255 · 15 = 7 650`` at A8, every layer without PTS is exact. The PTS
fold multiplies weights by up to 8 (``2 · 255 · 120 = 61 200``); where the fold of a part could saturate on
these kernels, the part runs as one GEMM per exponent group instead: channels with the same k_c, their
unfolded weights (``|w| ≤ 15`` again) and the input scale ``Δ_{s,p} 2^-k_c``, the groups' outputs summed like a
split layer's parts. Whether the kernels saturate is found by running them (:func:`kernels_add_pairs_in_int16`),
not read from the CPU's name; a layer that cannot be made exact either way is refused, naming the bound.

The fake path computes the same sum in float32 on dequantized values, so the two differ by float rounding
only. Layers the pipeline keeps in full precision stay float, and so do quantized attention matmuls
(``q·kᵀ``, ``softmax·v``): torch ships no int8 batched matmul for them, so they multiply their
fake-quantized inputs in float32 (``notices`` says so).
"""

from __future__ import annotations

import functools
import platform
from typing import NamedTuple

import torch
import torch.nn as nn

from pipeline.quant.layers import QuantLayer
from pipeline.quant.model import quant_layers, replace_submodule

INT8_MIN, INT8_MAX = -128, 127
INT16_MAX = 2**15 - 1
ConvArgs = tuple[list[int], list[int], list[int], int]  # stride, padding, dilation, groups; None for a linear


def int8_kernels_available() -> bool:
    """oneDNN's quantized conv / linear with float output are registered (x86 builds of torch)."""
    return platform.machine().lower() in ("x86_64", "amd64") and hasattr(torch.ops.onednn, "qconv2d_pointwise")


def _prepack(weight: torch.Tensor, conv_args: ConvArgs | None) -> torch.Tensor:
    if conv_args is None:
        return torch.ops.onednn.qlinear_prepack(weight, None)
    return torch.ops.onednn.qconv_prepack(weight, torch.ones(weight.shape[0]), 1.0, 0, *conv_args, None)


def _int8_gemm(
    q: torch.Tensor, x_scale: float, x_zero_point: int, packed: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, conv_args: ConvArgs | None,
) -> torch.Tensor:  # fmt: skip
    """``x_scale · w_scale[o] · Σ_c W[o, c] (q_c - x_zero_point) + bias[o]`` in float32, from uint8 codes ``q``
    and a prepacked int8 weight without zero point."""
    w_zero_point = torch.zeros(w_scale.shape[0], dtype=torch.long)
    if conv_args is None:
        return torch.ops.onednn.qlinear_pointwise(
            q, x_scale, x_zero_point, packed, w_scale, w_zero_point, bias, 1.0, 0, torch.float32, "none", [], ""
        )
    return torch.ops.onednn.qconv2d_pointwise(
        q, x_scale, x_zero_point, packed, w_scale, w_zero_point, bias, *conv_args,
        1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


@functools.cache
def kernels_add_pairs_in_int16() -> bool:
    """Whether this machine's int8 conv or linear kernel adds pairs of u8 × s8 products in int16 with saturation,
    found by running both on codes 255 × weights 127 (each pair 64 770, past int16): kernels that accumulate in
    int32 (VNNI, AMX) return the exact sum, the others a saturated one."""
    channels = 64
    exact = channels * 255 * INT8_MAX
    weight = torch.full((8, channels), INT8_MAX, dtype=torch.int8)
    codes = torch.full((4, channels), 255, dtype=torch.uint8)
    for conv_args in (None, ([1, 1], [0, 0], [1, 1], 1)):
        w, q = (weight, codes) if conv_args is None else (weight[:, :, None, None], codes[:, :, None, None])
        out = _int8_gemm(q, 1.0, 0, _prepack(w.contiguous(), conv_args), torch.ones(8), None, conv_args)
        if not torch.equal(out, torch.full_like(out, float(exact))):
            return True
    return False


class _Gemm(NamedTuple):
    """One int8 GEMM of a layer: the input channels it reads (None: all; a slice: a split part; an index
    tensor: an exponent group), their part, the power of two its input scale ``Δ_{s,p} 2^-e_s`` is multiplied
    by (1, or ``2^(e_s - k)`` for the unfolded weights of exponent group k) and its prepacked weight."""

    channels: slice | torch.Tensor | None
    part: int
    fold: float
    packed: torch.Tensor


def _select(q: torch.Tensor, channels: slice | torch.Tensor | None) -> torch.Tensor:
    if channels is None:
        return q
    if isinstance(channels, slice):
        return q[:, channels].contiguous()
    return q.index_select(1, channels)


class IntegerLayer(QuantLayer):
    """One QuantLayer as int8 kernels: uint8 activation codes x int8 weights, int32 accumulation, float32
    output. Holds prepacked int8 weights (per distinct PTS exponent pattern: one GEMM per part, or per exponent
    group where the fold could saturate) and the layer's own activation quantizer (its per-step parameters),
    no float weight.

    A QuantLayer to the rest of the library, so that ``quant_layers`` finds it and ``set_step`` selects
    the sampling step (``act_quantizer.step``) as for the fake layers; it is built by :func:`to_integer`
    only, and supports sampling, not calibration or reconstruction. ``int16_pairs``: the kernels add pairs of
    products in int16 (:func:`kernels_add_pairs_in_int16`), so the layer keeps every GEMM within that bound."""

    def __init__(self, layer: QuantLayer, name: str, int16_pairs: bool) -> None:
        nn.Module.__init__(self)  # not QuantLayer.__init__: no float weight, no weight quantizer
        act = layer.act_quantizer
        if act is None or not layer.quantize_acts or not layer.quantize_weights or layer.frozen_weight is None:
            raise ValueError(
                f"{name}: the int8 backend needs stored integer weights and per-step activation parameters "
                "(a row's model after the pts stage); sample this one with backend fake"
            )
        if act.bits > 8:
            raise ValueError(f"{name}: A{act.bits} activations do not fit uint8 codes; use backend fake")
        module = layer.module
        self.name = name
        self.is_conv = layer.is_conv
        self.conv_args: ConvArgs | None = None
        if self.is_conv:
            if isinstance(module.padding, str) or module.padding_mode != "zeros":
                raise ValueError(f"{name}: the int8 conv takes numeric zero padding, not {module.padding!r}")
            self.conv_args = (list(module.stride), list(module.padding), list(module.dilation), module.groups)
        self.levels = 2**act.bits - 1
        self.int16_pairs = int16_pairs
        c_in = module.weight.shape[1]
        bounds = [0, layer.split, c_in] if layer.split is not None else [0, c_in]
        part_slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        per_input_channel = [1, -1] + [1] * (module.weight.ndim - 2)  # of a weight, and of a conv's input
        self.channel_view = per_input_channel if self.is_conv else [-1]
        # 1. the fake path's per-channel divisor and zero point, every step at once: (S, C_in)
        parts = act.parts
        self.register_buffer("gamma", layer.gamma.detach().clone())
        self.register_buffer("divisor", act.scale[:, parts] * torch.exp2(-act.exponent.float()))
        self.register_buffer("zero_point", act.zero_point[:, parts].clone())
        self.register_buffer("bias", None if module.bias is None else module.bias.detach().clone())
        # 2. weights: signed integers recovered exactly from the frozen float weight, PTS folded per pattern
        w_scale, _ = layer.weight_quantizer.channel_params(module.weight.ndim)
        centered = layer.centered_frozen_weight()  # exact: checked below
        if not torch.equal(centered * w_scale, layer.frozen_weight):
            raise ValueError(f"{name}: the frozen weight is not (w_int - zero_point) * scale; reload the weights")
        patterns, inverse = torch.unique(act.exponent.long(), dim=0, return_inverse=True)  # (P, C_in), (S,)
        self.step_pattern = inverse.tolist()
        top = patterns.amax(1)  # (P,)
        self.register_buffer("weight_scale", layer.weight_quantizer.scale.t().contiguous())  # (parts, C_out)
        whole = len(part_slices) == 1
        self.gemms: list[list[_Gemm]] = []  # per pattern
        for index, (pattern, e) in enumerate(zip(patterns, top.tolist())):
            steps = (inverse == index).nonzero().flatten().tolist()
            gemms = []
            for part, channels in enumerate(part_slices):
                exponents = pattern[channels]  # (C_part,)
                folded = centered[:, channels] * torch.exp2((e - exponents).float()).view(per_input_channel)
                if self._why_inexact(folded) is None:
                    gemms.append(_Gemm(None if whole else channels, part, 1.0, self._pack(folded)))
                    continue
                for k in exponents.unique().tolist():  # one GEMM per exponent group, weights unfolded
                    group = (exponents == k).nonzero().flatten() + channels.start
                    unfolded = centered[:, group]
                    if why := self._why_inexact(unfolded):
                        raise ValueError(
                            f"{name}: W{layer.weight_quantizer.bits} weights (w_q - z_w) of the steps {steps}, even "
                            f"without the PTS fold, {why}: this layer cannot run on int8 kernels exactly; use backend "
                            "fake, or fewer weight or activation bits"
                        )
                    gemms.append(_Gemm(group, part, 2.0 ** (e - k), self._pack(unfolded)))
            self.gemms.append(gemms)
        # 3. per step and part: the kernel's input scale Δ_{s,p} 2^-e_s and zero point, as Python numbers
        exponent_top = top[inverse]  # (S,)
        self.input_scale = (act.scale * torch.exp2(-exponent_top.float()).view(-1, 1)).tolist()
        self.input_zero_point = act.zero_point.long().tolist()
        self.act_quantizer = act

    def _apply(self, fn, recurse=True):
        # the prepacked weights are oneDNN / fbgemm objects that only the CPU runs and that no .to() moves: refuse
        # a move instead of leaving them behind
        target = fn(torch.empty(0)).device
        if target.type != "cpu":
            raise ValueError(
                f"int8 layers run on the CPU's int8 kernels and cannot move to {target.type}: sample.backend int8 "
                "needs device: cpu (or use backend: fake on the GPU)"
            )
        return super()._apply(fn, recurse)

    def _why_inexact(self, weight: torch.Tensor) -> str | None:
        """Why one GEMM with this weight (integers, not yet int8) would not be exact on the kernels at hand."""
        lo, hi = int(weight.min()), int(weight.max())
        if lo < INT8_MIN or hi > INT8_MAX:
            return f"span [{lo}, {hi}], outside int8 [{INT8_MIN}, {INT8_MAX}]"
        bound = 2 * self.levels * max(-lo, hi)
        if self.int16_pairs and bound > INT16_MAX:
            return (
                f"2 · {self.levels} · {max(-lo, hi)} = {bound} > {INT16_MAX}, and this machine's int8 kernels add "
                "pairs of u8 × s8 products in int16, where the sum would saturate"
            )
        return None

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        return _prepack(weight.to(torch.int8).contiguous(), self.conv_args)

    def integer_weight_bytes(self) -> int:
        """Bytes of the prepacked int8 weights this layer holds."""
        return sum(gemm.packed.nbytes for pattern in self.gemms for gemm in pattern)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, view = self.act_quantizer.step, self.channel_view
        # 1. the codes, computed by the very operations of QuantLayer.forward and fake_quantize
        t = x / self.gamma.view(view)
        t.div_(self.divisor[s].view(view)).round_().add_(self.zero_point[s].view(view)).clamp_(0, self.levels)
        q = t.to(torch.uint8)
        lead = q.shape[:-1]
        if not self.is_conv:
            q = q.reshape(-1, q.shape[-1])
        out = None
        for gemm in self.gemms[self.step_pattern[s]]:  # parts and exponent groups, summed
            x_scale = self.input_scale[s][gemm.part] * gemm.fold
            bias = self.bias if out is None else None
            y = _int8_gemm(
                _select(q, gemm.channels), x_scale, self.input_zero_point[s][gemm.part], gemm.packed,
                self.weight_scale[gemm.part], bias, self.conv_args,
            )  # fmt: skip
            out = y if out is None else out.add_(y)
        return out if self.is_conv else out.reshape(*lead, -1)


@torch.no_grad()
def to_integer(model: nn.Module, int16_pairs: bool | None = None) -> dict[str, IntegerLayer]:
    """Swap every QuantLayer of ``model`` (weights and activation parameters loaded) for an
    :class:`IntegerLayer`, in place; return them by name. Every layer is checked before any is swapped,
    so a refusal (ValueError naming the layer and the reason) leaves ``model`` as it was. The float
    weights of the swapped layers are dropped with them. ``int16_pairs`` defaults to what this machine's
    kernels do (:func:`kernels_add_pairs_in_int16`)."""
    if not int8_kernels_available():
        raise ValueError(
            f"the int8 backend runs oneDNN's quantized kernels of an x86 build of torch; this machine is "
            f"{platform.machine()}: use backend fake"
        )
    int16_pairs = kernels_add_pairs_in_int16() if int16_pairs is None else int16_pairs
    converted = {
        name: IntegerLayer(layer, name, int16_pairs)
        for name, layer in quant_layers(model).items()
        if not isinstance(layer, IntegerLayer)
    }
    for name, layer in converted.items():
        replace_submodule(model, name, layer)
    return converted


def integer_layers(model: nn.Module) -> dict[str, IntegerLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, IntegerLayer)}


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of ``model``'s weights by kind: ``float`` (float parameters and buffers, and the frozen float
    weights of fake-quantized layers), ``integer`` (the prepacked int8 weights of its IntegerLayers)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    tensors.update(
        {id(w): w for m in quant_layers(model).values() if (w := getattr(m, "frozen_weight", None)) is not None}
    )
    return {
        "float": sum(t.nbytes for t in tensors.values() if t.is_floating_point()),
        "integer": sum(layer.integer_weight_bytes() for layer in integer_layers(model).values()),
    }
