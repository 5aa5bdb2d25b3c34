"""Architectures for our own models: a configured diffusers UNet2DModel behind the F(x, c_noise, labels) signature.

Preconditioning lives in denoisers.EDMPrecond (and the blurring process in blurring.BlurringModel); nets only map
(scaled input, noise embedding, label) to output. `models` builds the whole model a model file describes.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..shared.errors import DiffcliError
from ..shared.memory import check_memory
from ..shared.limits import CHANNELS_MAX, CLASSES_MAX, LAYERS_MAX, LEVELS_MAX, SIDE_MAX, count

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


# the integer arguments of UNet2DModel that size its tensors, and their ranges (options.py holds the limits)
def _size_args() -> dict[str, tuple[int, int, bool]]:
    """name -> (low, high, None allowed)."""
    return {"sample_size": (1, SIDE_MAX, True), "in_channels": (1, CHANNELS_MAX, False),
            "out_channels": (1, CHANNELS_MAX, False), "time_embedding_dim": (1, 4 * CHANNELS_MAX, True),
            "attention_head_dim": (1, CHANNELS_MAX, True), "norm_num_groups": (1, CHANNELS_MAX, True),
            "attn_norm_num_groups": (1, CHANNELS_MAX, True), "num_class_embeds": (1, CLASSES_MAX + 1, True),
            "num_train_timesteps": (1, 100_000, True)}


def check_net_config(config: Any, where: str = "the model record's net") -> None:
    """A UNet2DModel config (a checkpoint's record, or train's preset with its overrides), checked before anything is
    allocated: known arguments, the types and ranges of those that size tensors, and weights that fit in memory.
    Anything else UNet2DModel refuses is caught where the net is built (`models.build_model`)."""
    if not isinstance(config, dict):
        raise DiffcliError(f"{where} must be a JSON object of UNet2DModel arguments, got {type(config).__name__}")
    from diffusers import UNet2DModel
    known = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise DiffcliError(f"{where} has unknown UNet2DModel argument(s) {', '.join(map(repr, unknown[:4]))}")
    widths = config.get("block_out_channels")
    if not isinstance(widths, (list, tuple)) or not 1 <= len(widths) <= LEVELS_MAX:
        raise DiffcliError(f"{where}: block_out_channels must be a list of 1 to {LEVELS_MAX} block widths, got "
                           f"{widths!r}"[:300])
    for w in widths:
        count(f"{where}: a block width", w, 1, CHANNELS_MAX)
    for key in ("down_block_types", "up_block_types"):
        types = config.get(key)
        if not (isinstance(types, (list, tuple)) and len(types) == len(widths) and all(isinstance(t, str) for t in types)):
            raise DiffcliError(f"{where}: {key} must be a list of {len(widths)} block names (one per width), got "
                               f"{types!r}"[:300])
    layers = config.get("layers_per_block", 2)
    for n in layers if isinstance(layers, (list, tuple)) else [layers]:
        count(f"{where}: layers_per_block", n, 1, LAYERS_MAX)
    for key, (low, high, optional) in _size_args().items():
        if key in config and not (optional and config[key] is None):
            count(f"{where}: {key}", config[key], low, high)
    groups = config.get("norm_num_groups", 32)
    if groups is not None and any(w % groups for w in widths):
        raise DiffcliError(f"{where}: every block width must be a multiple of norm_num_groups {groups}, got "
                           f"{', '.join(map(str, widths))}")
    per_level = max(layers) if isinstance(layers, (list, tuple)) else layers
    weights = sum(2 * per_level * 9 * w * w for w in widths) * 4  # the 3x3 convs of the down path alone, fp32
    check_memory(weights, "cpu", f"{where}: its weights", "this is no net one could train or sample")


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
