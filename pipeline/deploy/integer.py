"""Integer inference: the quantized layers of a fake-quantized UNet swapped for layers that run int8 kernels
(oneDNN's quantized conv / linear as torch ships them, x86 CPU), with the same numbers up to float32 rounding.

Notation, for one layer at sampling step s (see QuantLayer and DESIGN.md section 10):
  γ_c      LES factor of input channel c          p = part(c)   input-channel part (split quantization)
  Δ_{s,p}  activation step, z_{s,p} its zero point k_{s,c}  PTS exponent, e_s = max_c k_{s,c}
  w_q, z_w, s_w[o, p]  stored integer weight, its zero point and scale (per output channel and part)

1. Codes, bit for bit the fake path's: ``q_c = clamp(round((x_c / γ_c) / (Δ_{s,p} 2^-k_c)) + z_{s,p}, 0, 2^a - 1)``
   (uint8).
2. Weights, PTS folded in exactly: ``W8[o, c] = (w_q - z_w)[o, c] · 2^(e_s - k_{s,c})``, int8 (refused if it
   does not fit); steps with the same exponents share one prepacked weight, so a layer without PTS holds one.
3. ``y[o] = Σ_p (Δ_{s,p} 2^-e_s) · s_w[o, p] · Σ_{c ∈ p} W8[o, c] (q_c - z_{s,p}) + b[o]``: one int32 GEMM per
   part (two for a split layer, summed), rescaled to float32 by the kernel.

The fake path computes the same sum in float32 on dequantized values, so the two differ by float rounding
only (the kernel accumulates exactly in int32). Layers the pipeline keeps in full precision stay float.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.quant.layers import QuantLayer
from pipeline.quant.model import quant_layers, replace_submodule

INT8_MIN, INT8_MAX = -128, 127
# Without VNNI (or AMX) x86 kernels sum pairs of u8 x s8 products in int16 with saturation; 7-bit codes
# times int8 weights cannot overflow it (2 * 127 * 128 < 2^15), 8-bit codes can.
A_BITS_WITHOUT_VNNI = 7


def cpu_has_vnni(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU has an int8 dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX-INT8), read from
    ``cpuinfo`` (False where that file does not exist: the safe answer)."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_kernels_available() -> bool:
    """oneDNN's quantized conv / linear with float output are registered (x86 builds of torch)."""
    return platform.machine().lower() in ("x86_64", "amd64") and hasattr(torch.ops.onednn, "qconv2d_pointwise")


class IntegerLayer(QuantLayer):
    """One QuantLayer as int8 kernels: uint8 activation codes x int8 weights, int32 accumulation, float32
    output. Holds prepacked int8 weights (one per distinct PTS exponent pattern and part) and the layer's
    own activation quantizer (its per-step parameters), no float weight.

    A QuantLayer to the rest of the library, so that ``quant_layers`` finds it and ``set_step`` selects
    the sampling step (``act_quantizer.step``) as for the fake layers; it is built by :func:`to_integer`
    only, and supports sampling, not calibration or reconstruction."""

    def __init__(self, layer: QuantLayer, name: str, vnni: bool) -> None:
        nn.Module.__init__(self)  # not QuantLayer.__init__: no float weight, no weight quantizer
        act = layer.act_quantizer
        if act is None or not layer.quantize_acts or not layer.quantize_weights or layer.frozen_weight is None:
            raise ValueError(
                f"{name}: the int8 backend needs stored integer weights and per-step activation parameters "
                "(a row's model after the pts stage); sample this one with backend fake"
            )
        if act.bits > 8 or (not vnni and act.bits > A_BITS_WITHOUT_VNNI):
            why = "uint8 codes hold at most 8 bits" if act.bits > 8 else "this CPU has no VNNI"
            raise ValueError(
                f"{name}: A{act.bits} activations do not fit the int8 kernels ({why}: without VNNI the x86 kernels "
                f"sum u8 x s8 pairs in int16 and take at most {A_BITS_WITHOUT_VNNI}-bit activations); use "
                f"backend fake, or a_bits <= {A_BITS_WITHOUT_VNNI}"
            )
        module = layer.module
        self.name = name
        self.is_conv = layer.is_conv
        if self.is_conv:
            if isinstance(module.padding, str) or module.padding_mode != "zeros":
                raise ValueError(f"{name}: the int8 conv takes numeric zero padding, not {module.padding!r}")
            self.conv_args = (list(module.stride), list(module.padding), list(module.dilation), module.groups)
        self.levels = 2**act.bits - 1
        c_in = module.weight.shape[1]
        bounds = [0, layer.split, c_in] if layer.split is not None else [0, c_in]
        self.part_slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        view = [1, -1] + [1] * (module.weight.ndim - 2) if self.is_conv else [-1]
        self.channel_view = view
        # 1. the fake path's per-channel divisor and zero point, every step at once: (S, C_in)
        parts = act.parts
        self.register_buffer("gamma", layer.gamma.detach().clone())
        self.register_buffer("divisor", act.scale[:, parts] * torch.exp2(-act.exponent.float()))
        self.register_buffer("zero_point", act.zero_point[:, parts].clone())
        self.register_buffer("bias", None if module.bias is None else module.bias.detach().clone())
        # 2. weights: signed integers recovered exactly from the frozen float weight, PTS folded per pattern
        w_scale, _ = layer.weight_quantizer.channel_params(module.weight.ndim)
        centered = torch.round(layer.frozen_weight / w_scale)  # (w_q - z_w), exact: checked below
        if not torch.equal(centered * w_scale, layer.frozen_weight):
            raise ValueError(f"{name}: the frozen weight is not (w_int - zero_point) * scale; reload the weights")
        patterns, inverse = torch.unique(act.exponent.long(), dim=0, return_inverse=True)  # (P, C_in), (S,)
        self.step_pattern = inverse.tolist()
        top = patterns.amax(1, keepdim=True)
        self.register_buffer("weight_scale", layer.weight_quantizer.scale.t().contiguous())  # (parts, C_out)
        self.packed: list[list[torch.Tensor]] = []  # [pattern][part]: oneDNN's prepacked int8 weights
        for pattern, fold in zip(patterns, torch.exp2((top - patterns).float())):
            folded = centered * fold.view(view if self.is_conv else [1, -1])
            lo, hi = int(folded.min()), int(folded.max())
            if lo < INT8_MIN or hi > INT8_MAX:
                steps = (inverse == len(self.packed)).nonzero().flatten().tolist()
                raise ValueError(
                    f"{name}: W{layer.weight_quantizer.bits} weights (w_q - z_w) * 2^(e - k) with the PTS exponents of "
                    f"step(s) {steps} span [{lo}, {hi}], outside int8 [{INT8_MIN}, {INT8_MAX}]; this layer cannot run "
                    "on int8 kernels exactly: use backend fake (or fewer weight bits)"
                )
            self.packed.append(
                [self._prepack(folded[:, part].to(torch.int8).contiguous()) for part in self.part_slices]
            )
        # 3. per step and part: the kernel's input scale Δ_{s,p} 2^-e_s and zero point, as Python numbers
        exponent_top = top.flatten()[inverse]  # (S,)
        self.input_scale = (act.scale * torch.exp2(-exponent_top.float()).view(-1, 1)).tolist()
        self.input_zero_point = act.zero_point.long().tolist()
        self.no_weight_zero_point = torch.zeros(module.weight.shape[0], dtype=torch.long)
        self.act_quantizer = act

    def _prepack(self, weight: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            stride, padding, dilation, groups = self.conv_args
            return torch.ops.onednn.qconv_prepack(
                weight, torch.ones(weight.shape[0]), 1.0, 0, stride, padding, dilation, groups, None
            )
        return torch.ops.onednn.qlinear_prepack(weight, None)

    def integer_weight_bytes(self) -> int:
        """Bytes of the prepacked int8 weights this layer holds."""
        return sum(w.nbytes for pattern in self.packed for w in pattern)

    def _kernel(self, q: torch.Tensor, part: int, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        step = self.act_quantizer.step
        x_scale, x_zp = self.input_scale[step][part], self.input_zero_point[step][part]
        w_scale, w_zp = self.weight_scale[part], self.no_weight_zero_point
        if self.is_conv:
            stride, padding, dilation, groups = self.conv_args
            return torch.ops.onednn.qconv2d_pointwise(
                q, x_scale, x_zp, packed, w_scale, w_zp, bias, stride, padding, dilation, groups,
                1.0, 0, torch.float32, "none", [], "",
            )  # fmt: skip
        return torch.ops.onednn.qlinear_pointwise(
            q, x_scale, x_zp, packed, w_scale, w_zp, bias, 1.0, 0, torch.float32, "none", [], ""
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, view = self.act_quantizer.step, self.channel_view
        # 1. the codes, computed by the very operations of QuantLayer.forward and fake_quantize
        t = x / self.gamma.view(view)
        t.div_(self.divisor[s].view(view)).round_().add_(self.zero_point[s].view(view)).clamp_(0, self.levels)
        q = t.to(torch.uint8)
        lead = q.shape[:-1]
        if not self.is_conv:
            q = q.reshape(-1, q.shape[-1])
        packed = self.packed[self.step_pattern[s]]
        out = None
        for part, channels in enumerate(self.part_slices):  # one part, or the two of a split layer
            q_part = q if len(self.part_slices) == 1 else q[:, channels].contiguous()
            y = self._kernel(q_part, part, packed[part], self.bias if part == 0 else None)
            out = y if out is None else out.add_(y)
        return out if self.is_conv else out.reshape(*lead, -1)


@torch.no_grad()
def to_integer(model: nn.Module, vnni: bool | None = None) -> dict[str, IntegerLayer]:
    """Swap every QuantLayer of ``model`` (weights and activation parameters loaded) for an
    :class:`IntegerLayer`, in place; return them by name. Every layer is checked before any is swapped,
    so a refusal (ValueError naming the layer and the reason) leaves ``model`` as it was. The float
    weights of the swapped layers are dropped with them. ``vnni`` defaults to what the CPU has."""
    if not int8_kernels_available():
        raise ValueError(
            f"the int8 backend runs oneDNN's quantized kernels of an x86 build of torch; this machine is "
            f"{platform.machine()}: use backend fake"
        )
    vnni = cpu_has_vnni() if vnni is None else vnni
    converted = {
        name: IntegerLayer(layer, name, vnni)
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
