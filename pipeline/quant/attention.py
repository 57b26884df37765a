"""Quantized attention matmuls (Q-Diffusion, arXiv 2302.04304): the inputs of ``q·kᵀ`` and ``softmax·v``
fake-quantized per tensor, q, k and v at the row's activation bits, the softmax output at its own
(unsigned: its range starts at 0, so its zero point is 0).

diffusers fuses the two matmuls into ``scaled_dot_product_attention``, where no input of the second one
exists; :class:`QuantAttnProcessor` computes them apart (the score matrix held whole, as in Q-Diffusion)
and is installed on every ``Attention`` of the UNet by :func:`quantize_attention`."""

from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.quant.quantizers import ActQuantizer

MATMUL_INPUTS = ("query", "key", "value", "probs")


class MatmulInput(nn.Module):
    """One activation quantizer on its own, per tensor, with per-step parameters like a layer's: it has
    the interface the activation calibration reads off a :class:`~pipeline.quant.layers.QuantLayer`
    (``act_quantizer``, ``quantize_acts``, ``scale_input``, ``channel_dim``), the tensor seen as one
    channel."""

    channel_dim = 0

    def __init__(self, bits: int, num_steps: int) -> None:
        super().__init__()
        self.act_quantizer = ActQuantizer(1, torch.zeros(1, dtype=torch.long), 1, bits, num_steps)
        self.quantize_acts = False

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the quantizer sees it: one row, one channel."""
        return x.reshape(1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize_acts:
            return x
        return self.act_quantizer(self.scale_input(x), self.channel_dim).view_as(x)


class QuantAttnProcessor(nn.Module):
    """diffusers' attention with explicit matmuls whose inputs pass :class:`MatmulInput` quantizers. The
    quantizers follow the sampling step of the attention's query projection (``set_step`` sets the
    layers'), so they need no bookkeeping of their own."""

    def __init__(self, a_bits: int, softmax_bits: int, num_steps: int) -> None:
        super().__init__()
        for name in MATMUL_INPUTS:
            self.add_module(name, MatmulInput(softmax_bits if name == "probs" else a_bits, num_steps))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        step = attn.to_q.act_quantizer.step
        for name in MATMUL_INPUTS:
            getattr(self, name).act_quantizer.step = step
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:  # (B, C, H, W) -> (B, HW, C)
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], context.shape[0])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = (
            attn.head_to_batch_dim(quantizer(projection(source)))
            for quantizer, projection, source in (
                (self.query, attn.to_q, hidden_states),
                (self.key, attn.to_k, context),
                (self.value, attn.to_v, context),
            )
        )
        probs = self.probs(attn.get_attention_scores(query, key, attention_mask))
        hidden_states = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))
        if image_shape is not None:
            hidden_states = hidden_states.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """diffusers ``Attention`` modules of ``model`` by path."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "to_q")}


def quantize_attention(model: nn.Module, a_bits: int, softmax_bits: int, num_steps: int) -> dict[str, MatmulInput]:
    """Install :class:`QuantAttnProcessor` on every attention of ``model`` (its projections already
    quantized with activations, see :func:`~pipeline.quant.model.quantize`); return the matmul inputs'
    quantizers by path, switched off like a fresh layer's."""
    for name, attn in attention_modules(model).items():
        unsupported = [f for f in ("norm_q", "norm_k", "add_k_proj") if getattr(attn, f, None) is not None]
        if unsupported or getattr(attn.to_q, "act_quantizer", None) is None:
            why = f"its {', '.join(unsupported)}" if unsupported else "its projections have no activation quantizer"
            raise ValueError(f"{name}: attention matmul quantization cannot handle {why}")
        attn.set_processor(QuantAttnProcessor(a_bits, softmax_bits, num_steps))
    return matmul_inputs(model)


def matmul_inputs(model: nn.Module) -> dict[str, MatmulInput]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MatmulInput)}
