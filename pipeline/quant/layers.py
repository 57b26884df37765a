"""The quantized-layer wrapper: ``y = Qw(W · diag(γ)) ⊛ Qa(x / γ) + b`` for Conv2d and Linear."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.quant.quantizers import ActQuantizer, WeightQuantizer


class QuantLayer(nn.Module):
    """Wraps one Conv2d / Linear. γ (LES) divides the input channels and multiplies the matching weight
    columns, which leaves the full-precision result unchanged; the quantizers see the scaled tensors.

    ``split`` is the channel index where a decoder's ``concat(h, skip)`` input changes from ``h`` to
    ``skip``; the two parts get their own activation and weight quantization parameters."""

    def __init__(
        self, module: nn.Conv2d | nn.Linear, w_bits: int, a_bits: int | None, num_steps: int, split: int | None
    ):
        super().__init__()
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"QuantLayer wraps Conv2d or Linear, got {type(module).__name__}")
        self.module = module
        self.is_conv = isinstance(module, nn.Conv2d)
        c_in = module.weight.shape[1]
        self.split = split
        parts = torch.zeros(c_in, dtype=torch.long)
        if split is not None:
            parts[split:] = 1
        num_parts = 2 if split is not None else 1
        self.register_buffer("gamma", torch.ones(c_in))
        self.weight_quantizer = WeightQuantizer(module.weight.shape, parts, num_parts, w_bits)
        self.act_quantizer = ActQuantizer(c_in, parts, num_parts, a_bits, num_steps) if a_bits else None
        self.quantize_weights = False
        self.quantize_acts = False
        # a buffer, so that .to(device) moves it with the layer; never saved: the stored integers are
        self.register_buffer("frozen_weight", None, persistent=False)

    @property
    def channel_dim(self) -> int:
        return 1 if self.is_conv else -1

    def scaled_weight(self, gamma: torch.Tensor | None = None) -> torch.Tensor:
        gamma = self.gamma if gamma is None else gamma
        weight = self.module.weight
        return weight * gamma.view(1, -1, *([1] * (weight.ndim - 2)))

    def scale_input(self, x: torch.Tensor, gamma: torch.Tensor | None = None) -> torch.Tensor:
        gamma = self.gamma if gamma is None else gamma
        shape = [1] * x.ndim
        shape[self.channel_dim] = -1
        return x / gamma.view(shape)

    def module_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The wrapped Conv2d / Linear op on ``x`` with ``weight`` in place of its own."""
        m = self.module
        if self.is_conv:
            return F.conv2d(x, weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, weight, m.bias)

    @torch.no_grad()
    def integer_weight(self) -> torch.Tensor:
        """The weight's integer codes: the stored ones once loaded (:meth:`load_integer_weight`; the float
        weight alone would round them to nearest, losing AdaRound's choices), else those of ``W · diag(γ)``."""
        if self.frozen_weight is not None:
            _, zp = self.weight_quantizer.channel_params(self.frozen_weight.ndim)
            return self.centered_frozen_weight() + zp
        return self.weight_quantizer.to_integer(self.scaled_weight())

    @torch.no_grad()
    def centered_frozen_weight(self) -> torch.Tensor:
        """``w_q - z_w`` of the loaded integers: exact, (w_q - z_w) · s divided by s."""
        scale, _ = self.weight_quantizer.channel_params(self.frozen_weight.ndim)
        return torch.round(self.frozen_weight / scale)

    @torch.no_grad()
    def load_integer_weight(self, weight_int: torch.Tensor) -> None:
        """Use stored integers from now on; sampling then pays no weight quantization per call."""
        scale, zp = self.weight_quantizer.channel_params(weight_int.ndim)
        self.frozen_weight = (weight_int.to(scale.dtype) - zp) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scale_input(x)
        if self.quantize_acts:
            # x / γ above is this layer's own tensor: quantize it in place unless autograd needs it
            x = self.act_quantizer(x, self.channel_dim, inplace=not x.requires_grad)
        if self.quantize_weights and self.frozen_weight is not None:
            weight = self.frozen_weight
        else:
            weight = self.scaled_weight()
            if self.quantize_weights:
                weight = self.weight_quantizer(weight)
        return self.module_forward(x, weight)
