"""The embedded default's architecture: a tiny diffusers UNet (trained by :mod:`pipeline.models.training`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.models.local import diffusers_class

if TYPE_CHECKING:
    from diffusers import UNet2DModel


def build_unet(image_size: int, block_out_channels, layers_per_block: int, norm_num_groups: int) -> UNet2DModel:
    """ResNet blocks (1x1-conv shortcuts where channels change, and in every decoder block, which sees
    ``concat(h, skip)``), one attention level, down and up blocks."""
    levels = len(block_out_channels)
    attn_level = min(1, levels - 1)
    down = tuple("AttnDownBlock2D" if i == attn_level else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if i == levels - 1 - attn_level else "UpBlock2D" for i in range(levels))
    return diffusers_class("UNet2DModel")(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=norm_num_groups,
        attention_head_dim=block_out_channels[attn_level],
    )
