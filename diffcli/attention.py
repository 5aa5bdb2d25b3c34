"""A diffusers attention processor that blurs the query of one batch chunk (SEG's perturbed pass); layer selection.

The UNet runs all passes of a step as one batch of equal chunks (uncond, cond, seg). `SegState` is the only
channel between the guidance combinator and the processors: it says which roles the chunks of the current
call have (the perturbed one is always last), which blur to apply (None: behave like the default processor),
the latent size (to put tokens back on their h x w grid) and the noise level (for metric rows).
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .query_blur import Blur
from .common import DiffcliError

BLOCKS = {"d": "down", "m": "mid", "u": "up"}


@dataclass
class SegState:
    roles: tuple[str, ...] = ("cond",)
    blur: Blur | None = None  # set only while a call carries a perturbed chunk
    latent_hw: tuple[int, int] = (0, 0)
    sigma: float = 0.0


def token_grid(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a block's token grid: the latent downsampled by the square factor that gives `tokens` cells."""
    lh, lw = latent_hw
    f2, rem = divmod(lh * lw, tokens)
    f = math.isqrt(f2)
    if rem or f * f != f2 or lh % f or lw % f:
        raise ValueError(f"{tokens} tokens do not tile a {lh}x{lw} latent")
    return lh // f, lw // f


# ---------------------------------------------------------------- layer selection

def self_attention_layers(unet: torch.nn.Module) -> dict[str, list[str]]:
    """Module paths of the self-attention (attn1) layers by block, in module order: index i of 'down' is 'd<i>'.

    This is the official SEG/PAG naming, so 'd4', 'm0', 'u1' pick the same layers as their code does.
    """
    layers: dict[str, list[str]] = {"down": [], "mid": [], "up": []}
    for path, module in unet.named_modules():
        if path.endswith("attn1") and not getattr(module, "is_cross_attention", True):
            block = path.split(".")[0].split("_")[0]  # down_blocks / mid_block / up_blocks
            if block in layers:
                layers[block].append(path)
    return layers


def valid_layer_names(layers: dict[str, list[str]]) -> str:
    parts = []
    for block, paths in layers.items():
        if paths:
            last = len(paths) - 1
            parts.append(f"{block} ({block[0]}0{'-' + block[0] + str(last) if last else ''})")
    return ", ".join(parts) or "none (this UNet has no self-attention)"


def resolve_layers(unet: torch.nn.Module, names: list[str], option: str = "--layers") -> list[str]:
    """Block names (down/mid/up) or indexed ones (d4, m0, u1) -> module paths; unknown names list the valid ones."""
    layers = self_attention_layers(unet)
    paths: list[str] = []
    for name in names:
        m = re.fullmatch(r"([dmu])(\d+)", name)
        if name in layers and layers[name]:
            picked = layers[name]
        elif m and int(m[2]) < len(layers[BLOCKS[m[1]]]):
            picked = [layers[BLOCKS[m[1]]][int(m[2])]]
        else:
            raise DiffcliError(f"{option} {name!r}: no such self-attention layer in this model; "
                               f"valid: {valid_layer_names(layers)}")
        paths += [p for p in picked if p not in paths]
    return paths


# ---------------------------------------------------------------- metrics of one block

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def attention_metrics(inp: torch.Tensor, out: torch.Tensor, h: int, w: int) -> dict[str, float]:
    """The 000 seed's block metrics on (B, h*w, C) attention input/output, means over the batch (and channels).

    l2: ||out - in|| per sample (how much the layer changes its input). On the output's h x w map, per channel:
    laplacian_var, the variance of its 3x3 Laplacian (sharpness); edge_entropy, the Shannon entropy (nats) of
    its Sobel gradient magnitude normalised to a distribution over cells (low = edges concentrated).
    """
    b, n, c = out.shape
    l2 = (out.float() - inp.float()).flatten(1).norm(dim=1).mean()
    maps = out.float().transpose(1, 2).reshape(b * c, 1, h, w)
    maps = F.pad(maps, (1, 1, 1, 1), mode="replicate")
    kernels = torch.stack([_LAPLACIAN, _SOBEL_X, _SOBEL_X.T]).unsqueeze(1).to(maps.device)
    lap, gx, gy = F.conv2d(maps, kernels).unbind(1)
    magnitude = (gx ** 2 + gy ** 2).sqrt().flatten(1)
    p = magnitude / magnitude.sum(1, keepdim=True).clamp(min=1e-12)
    entropy = -(p * p.clamp(min=1e-12).log()).sum(1)
    return {"l2": float(l2), "laplacian_var": float(lap.flatten(1).var(1, unbiased=False).mean()),
            "edge_entropy": float(entropy.mean())}


# ---------------------------------------------------------------- the processor

class SegAttnProcessor:
    """Self-attention as diffusers' AttnProcessor2_0 (SDPA), with the last chunk's query blurred when asked.

    Keys and values are never touched. The infinite blur needs one attention row per head for the
    perturbed chunk: softmax(mean(q) K^T / sqrt(d)) V, repeated at every position.
    """

    def __init__(self, state: SegState, name: str, perturb: bool, recorder: list[dict[str, Any]] | None = None):
        self.state, self.name, self.perturb, self.recorder = state, name, perturb, recorder

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        blur = self.state.blur if self.perturb else None
        out = self.attend(attn, hidden_states, attention_mask, blur)
        if self.recorder is not None:
            self.record(hidden_states, out)
        return out

    def attend(self, attn, x: torch.Tensor, mask: torch.Tensor | None, blur: Blur | None) -> torch.Tensor:
        residual = x
        b, n, _ = x.shape
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        heads = attn.heads
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if mask is not None:
            mask = attn.prepare_attention_mask(mask, n, b)
            mask = mask.view(b, heads, -1, mask.shape[-1])
        if blur is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            c = b // len(self.state.roles)  # rows per chunk; the perturbed chunk is the last
            if blur.infinite and mask is None:  # one query row, attention cost linear in the tokens
                y_seg = F.scaled_dot_product_attention(q[-c:].mean(2, keepdim=True), k[-c:], v[-c:])
                y = torch.cat([F.scaled_dot_product_attention(q[:-c], k[:-c], v[:-c]), y_seg.expand_as(q[-c:])])
            else:
                h, w = token_grid(n, self.state.latent_hw)
                q = torch.cat([q[:-c], blur(q[-c:], h, w)])
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(b, n, -1).to(q.dtype)
        y = attn.to_out[1](attn.to_out[0](y))
        if attn.residual_connection:
            y = y + residual
        return y / attn.rescale_output_factor

    def record(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        h, w = token_grid(inp.shape[1], self.state.latent_hw)
        blurred = self.state.blur is not None and self.perturb
        for role, i, o in zip(self.state.roles, inp.chunk(len(self.state.roles)), out.chunk(len(self.state.roles))):
            row = {"sigma": self.state.sigma, "layer": self.name, "role": role, "blurred": blurred and role == "seg"}
            self.recorder.append({**row, **attention_metrics(i, o, h, w)})


@contextlib.contextmanager
def installed(unet: torch.nn.Module, state: SegState, perturbed: list[str], tracked: list[str] = (),
              recorder: list[dict[str, Any]] | None = None) -> Iterator[None]:
    """Put SEG processors on the perturbed (and, with a recorder, the tracked) layers; restore the old ones after.

    Layers neither perturbed nor tracked keep their own processor, so unselected layers cost nothing extra.
    """
    modules = dict(unet.named_modules())
    paths = list(dict.fromkeys([*perturbed, *(tracked if recorder is not None else ())]))
    old = {p: modules[p].processor for p in paths}
    try:
        for p in paths:
            modules[p].set_processor(SegAttnProcessor(state, p, p in perturbed,
                                                      recorder if p in tracked else None))
        yield
    finally:
        for p, proc in old.items():
            modules[p].set_processor(proc)
