"""Architectures for our own models: a configured diffusers UNet2DModel behind the F(x, c_noise, labels) signature.

Preconditioning lives in denoisers.EDMPrecond (and the blurring process in blurring.BlurringModel); nets only map
(scaled input, noise embedding, label) to output. `models` builds the whole model a model file describes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Named starting points; `diffcli train --net` picks one, --channels etc. override fields.
PRESETS: dict[str, dict[str, Any]] = {
    # ~2M parameters; self-attention only at the 7x7 level where it is cheap on CPU.
    "small": dict(block_out_channels=(32, 64, 96), layers_per_block=1,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                  attention_head_dim=32, norm_num_groups=8),
    # for tests: a few thousand parameters
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4),
    # closer to the 002 seed's CIFAR-10 net: attention at 16x16 and 8x8
    "base": dict(block_out_channels=(64, 128, 128, 256), layers_per_block=2,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=64, norm_num_groups=32),
}


def net_config(preset: str, image_size: int, channels: int, num_classes: int, context_frames: int = 0) -> dict[str, Any]:
    """UNet2DModel arguments; a next-frame model reads its context frames as extra input channels."""
    if preset not in PRESETS:
        raise KeyError(preset)
    cfg = dict(PRESETS[preset])
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    cfg.update(sample_size=image_size, in_channels=channels * (1 + context_frames), out_channels=channels,
               # one extra embedding row: the null label used for label dropout / CFG
               num_class_embeds=(num_classes + 1) if num_classes else None)
    return cfg


class UNetF(nn.Module):
    """UNet2DModel as F(x, c_noise, class_labels) -> tensor."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        # deferred: diffusers takes seconds to import, and the CLI imports this module for `diffcli --help`
        from diffusers import UNet2DModel
        self.config = dict(config)
        self.unet = UNet2DModel(**config)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, c_noise, class_labels=class_labels, return_dict=False)[0]


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
