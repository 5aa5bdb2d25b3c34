"""Attention processors that perturb batch chunks (SEG's blurred query, PAG's identity attention); layer selection.

The UNet runs all passes of a step as one batch of equal chunks, in the order (uncond, cond, seg, pag), those a
step needs. `SegState` is the only channel between the guidance combinator and the processors: it says which
roles the chunks of the current call have, which blur to apply to the "seg" chunk (None: behave like the default
processor), whether the "pag" chunk (always last) takes identity attention, the latent size (to put the tokens
of 3-D hidden states back on their h x w grid) and the noise level (for metric rows). A processor applies each
perturbation only on the layers chosen for it, so SEG and PAG may perturb different layers in one batch.

Three UNet families carry self-attention, each with its own attention flavour; one processor serves them all:
  - SD 1.x/2.x and SDXL (UNet2DConditionModel with transformer blocks): the `attn1` layers, (B, N, C) tokens
    whose grid is recovered from the latent size;
  - diffcli's own nets (UNet2DModel with Attn*Block2D / UNetMidBlock2D): the blocks' `attentions.<i>`, fed
    (B, C, H, W) maps (group norm, residual and output rescale inside the layer), the grid is the map's own;
  - DeepFloyd IF (UNet2DConditionModel with SimpleCrossAttn blocks): the blocks' `attentions.<i>` with added
    key/value projections, joint self+cross attention over [text, image] keys; the query is the image's.
Whatever the flavour, `seg_attention` is the one place that blurs a chunk's query and `identity_attention` the one
place that replaces a chunk's attention by its own values (output = V, PAG); `perturbed_attention` routes the
chunks to them. Joint-attention processors (SD3/Flux) can call `identity_attention` on their image rows.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from . import joint_attention
from .query_blur import Blur
from ..shared.errors import DiffcliError

BLOCKS = {"d": "down", "m": "mid", "u": "up"}


@dataclass
class SegState:
    roles: tuple[str, ...] = ("cond",)
    blur: Blur | None = None  # set only while a call carries a perturbed chunk
    identity: bool = False  # set only while a call carries a PAG chunk (the last one): identity attention there
    latent_hw: tuple[int, int] = (0, 0)  # the grid of 3-D (B, N, C) tokens; 4-D maps carry their own
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

def is_self_attention(path: str, module: torch.nn.Module) -> bool:
    """Does this module attend from the image tokens to (at least) the image tokens, so SEG can blur its query?

    A transformer block's `attn1` that is not cross-attention (SD/SDXL), or a block's own `attentions.<i>`
    layer: plain self-attention (diffcli's nets), or added-KV joint attention whose keys include the image's
    own tokens (IF; `only_cross_attention` layers attend to the text alone and are left out).
    """
    if path.endswith("attn1"):
        return not getattr(module, "is_cross_attention", True)
    parts = path.split(".")
    if len(parts) < 2 or parts[-2] != "attentions" or not hasattr(module, "to_q"):
        return False
    if getattr(module, "added_kv_proj_dim", None) is not None:
        return not module.only_cross_attention
    return not getattr(module, "is_cross_attention", True)


def self_attention_layers(unet: torch.nn.Module) -> dict[str, list[str]]:
    """Module paths of the self-attention layers by block, in module order: index i of 'down' is 'd<i>'.

    For SD/SDXL these are the `attn1` layers, the official SEG/PAG naming, so 'd4', 'm0', 'u1' pick the same
    layers as their code does; diffcli's nets and IF UNets contribute their blocks' attention layers.
    """
    layers: dict[str, list[str]] = {"down": [], "mid": [], "up": []}
    for path, module in unet.named_modules():
        if is_self_attention(path, module):
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


def resolve_layers(unet: torch.nn.Module, names: list[str], option: str = "layers") -> list[str]:
    """Block names (down/mid/up) or indexed ones (d4, m0, u1) -> module paths; unknown names list the valid ones.

    `option` names what is being resolved in the error (a caller may pass its own word, e.g. a flag).
    """
    if joint_attention.is_joint(unet):  # SD3 / Flux: joint / double / single blocks (joint_attention.resolve)
        return joint_attention.resolve(joint_attention.layers_of(unet), names, option)
    layers = self_attention_layers(unet)
    if names and not any(layers.values()):
        raise DiffcliError(f"{option} {','.join(names)!r}: this model has no self-attention layers, "
                           "so there is no query to blur")
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

def seg_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blur: Blur | None, chunks: int,
                  hw: tuple[int, int] | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention of (B, heads, N, d) q/k/v with the query of the last of `chunks` equal batch
    chunks blurred over its h x w token grid `hw`; blur None is plain attention. Keys and values are never touched.

    The infinite blur (the query's spatial mean) needs one attention row per head for the perturbed chunk:
    softmax(mean(q) K^T / sqrt(d)) V, repeated at every position; `hw` is only needed for finite blurs.
    """
    if blur is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, n = q.shape[0], q.shape[2]
    if chunks < 1 or b % chunks:
        raise ValueError(f"a batch of {b} does not split into {chunks} equal chunks")
    c = b // chunks  # rows per chunk; the perturbed chunk is the last
    if blur.infinite and mask is None:  # one query row, attention cost linear in the tokens
        y_seg = F.scaled_dot_product_attention(q[-c:].mean(2, keepdim=True), k[-c:], v[-c:])
        y_rest = F.scaled_dot_product_attention(q[:-c], k[:-c], v[:-c])
        return torch.cat([y_rest, y_seg.expand(-1, -1, n, -1)])
    if blur.infinite:
        q_seg = blur(q[-c:], 1, n)  # the mean query; the grid does not matter
    else:
        if hw is None:
            raise ValueError("a finite blur needs the token grid (h, w)")
        q_seg = blur(q[-c:], *hw)
    return F.scaled_dot_product_attention(torch.cat([q[:-c], q_seg]), k, v, attn_mask=mask)


def identity_attention(v_self: torch.Tensor) -> torch.Tensor:
    """PAG's perturbed self-attention (Ahn et al. 2024): the attention map replaced by the identity, so each token's
    output is its own value, softmax(Q K^T) V -> V. `v_self` (B, heads, N, d): the values of the tokens that are
    also the queries (for joint attention, the image rows only; text rows are not the identity's)."""
    return v_self


def perturbed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, roles: tuple[str, ...],
                        blur: Blur | None, identity: bool, hw: tuple[int, int] | None = None,
                        mask: torch.Tensor | None = None, v_self: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of (B, heads, N, d) q/k/v whose batch is the equal chunks `roles` (uncond, cond, seg, pag order).

    Without a "pag" chunk this is exactly `seg_attention` (the "seg" chunk, last, blurred by `blur`). With one (the
    last chunk): the chunks before it as `seg_attention` (the "seg" chunk, then last of them, blurred), and the
    "pag" chunk with identity attention when `identity` (this layer is a PAG layer), else plain attention.
    `v_self`: the values of the query tokens (default `v`; joint attention passes its image rows).
    """
    if not roles or roles[-1] != "pag":
        return seg_attention(q, k, v, blur, max(len(roles), 1), hw, mask)
    b = q.shape[0]
    if b % len(roles):
        raise ValueError(f"a batch of {b} does not split into {len(roles)} equal chunks")
    c = b // len(roles)
    rest = roles[:-1]
    parts = []
    if rest:
        seg_blur = blur if rest[-1] == "seg" else None
        parts.append(seg_attention(q[:-c], k[:-c], v[:-c], seg_blur, len(rest), hw,
                                   None if mask is None else mask[:-c]))
    if identity:
        parts.append(identity_attention((v if v_self is None else v_self)[-c:]))
    else:
        parts.append(F.scaled_dot_product_attention(q[-c:], k[-c:], v[-c:],
                                                    attn_mask=None if mask is None else mask[-c:]))
    return torch.cat(parts)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) maps -> (B, H*W, C) tokens (raster order); (B, N, C) tokens stay as they are."""
    return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x


def _split_heads(t: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    return t.view(t.shape[0], -1, heads, head_dim).transpose(1, 2)  # (B, N, heads * d) -> (B, heads, N, d)


class SegAttnProcessor:
    """diffusers' default attention with the "seg" chunk's query blurred and/or the "pag" chunk's attention made the
    identity when asked (`perturb`: this layer is a SEG layer, `identity`: a PAG layer); neither reproduces it.

    One processor for every self-attention layer `self_attention_layers` returns: plain attention as
    AttnProcessor2_0 (SD/SDXL `attn1` on (B, N, C) tokens, diffcli's nets on (B, C, H, W) maps), added-KV joint
    attention as AttnAddedKVProcessor2_0 (IF). The token grid of a finite blur is the map's own (H, W) for 4-D
    hidden states, and the latent's (`SegState.latent_hw`) downsampled to the token count for 3-D ones.
    """

    def __init__(self, state: SegState, name: str, perturb: bool, recorder: list[dict[str, Any]] | None = None,
                 identity: bool = False):
        self.state, self.name, self.perturb, self.recorder = state, name, perturb, recorder
        self.identity = identity

    @property
    def pag(self) -> bool:
        """Does this call take identity attention on its last ("pag") chunk here?"""
        return self.identity and self.state.identity

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        blur = self.state.blur if self.perturb else None
        if getattr(attn, "added_kv_proj_dim", None) is not None:
            out = self.attend_added_kv(attn, hidden_states, encoder_hidden_states, attention_mask, blur)
        else:
            out = self.attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb, blur)
        if self.recorder is not None:
            self.record(hidden_states, out)
        return out

    def grid(self, tokens: int, spatial: tuple[int, int] | None, blur: Blur | None) -> tuple[int, int] | None:
        """The (h, w) token grid a finite blur needs: a 4-D map's own `spatial` size, else the latent's
        (`SegState.latent_hw`) downsampled to `tokens` cells; None when no finite blur is asked for."""
        if blur is None or blur.infinite:
            return None
        return spatial if spatial is not None else token_grid(tokens, self.state.latent_hw)

    def attend(self, attn, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None,
               temb: torch.Tensor | None, blur: Blur | None) -> torch.Tensor:
        """Plain attention (queries from x; keys and values from x, or from `context` if given)."""
        residual = x
        if getattr(attn, "spatial_norm", None) is not None:
            x = attn.spatial_norm(x, temb)
        tokens = _tokens(x)
        b, n, _ = tokens.shape
        hw = self.grid(n, tuple(x.shape[-2:]) if x.ndim == 4 else None, blur)
        heads = attn.heads
        if mask is not None:
            mask = attn.prepare_attention_mask(mask, n if context is None else context.shape[1], b)
            mask = mask.view(b, heads, -1, mask.shape[-1])
        if attn.group_norm is not None:
            tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        if context is None:
            context = tokens
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(tokens), attn.to_k(context), attn.to_v(context)
        head_dim = k.shape[-1] // heads
        q, k, v = (_split_heads(t, heads, head_dim) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        y = perturbed_attention(q, k, v, self.state.roles, blur, self.pag, hw, mask,
                                v_self=v if context is tokens else None)
        y = y.transpose(1, 2).reshape(b, -1, heads * head_dim).to(q.dtype)
        y = attn.to_out[1](attn.to_out[0](y))
        if x.ndim == 4:
            y = y.transpose(1, 2).reshape(x.shape)
        if attn.residual_connection:
            y = y + residual
        return y / attn.rescale_output_factor

    def attend_added_kv(self, attn, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None,
                        blur: Blur | None) -> torch.Tensor:
        """Added-KV joint attention: queries from the (B, C, ...) map's tokens; keys and values are the projected
        `context` (the text) followed, unless only_cross_attention, by the tokens' own; residual always added."""
        tokens = x.flatten(2).transpose(1, 2)  # channel-first, as the layer is fed
        b, n, _ = tokens.shape
        hw = self.grid(n, tuple(x.shape[-2:]) if x.ndim == 4 else None, blur)
        heads = attn.heads
        mask = attn.prepare_attention_mask(mask, n, b, out_dim=4)
        if context is None:
            context = tokens
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if attn.group_norm is not None:
            tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        q = attn.to_q(tokens)
        head_dim = q.shape[-1] // heads
        k, v = attn.add_k_proj(context), attn.add_v_proj(context)
        if not attn.only_cross_attention:
            k, v = torch.cat([k, attn.to_k(tokens)], 1), torch.cat([v, attn.to_v(tokens)], 1)
        q, k, v = (_split_heads(t, heads, head_dim) for t in (q, k, v))
        # the identity map is over the image's own tokens: their values are the last n rows of v
        y = perturbed_attention(q, k, v, self.state.roles, blur, self.pag, hw, mask, v_self=v[:, :, -n:])
        y = y.transpose(1, 2).reshape(b, n, -1)
        y = attn.to_out[1](attn.to_out[0](y))
        return y.transpose(1, 2).reshape(x.shape) + x

    def record(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        if inp.ndim == 4:
            h, w = inp.shape[-2:]
        else:
            h, w = token_grid(inp.shape[1], self.state.latent_hw)
        inp, out = _tokens(inp), _tokens(out)
        blurred = self.state.blur is not None and self.perturb
        for role, i, o in zip(self.state.roles, inp.chunk(len(self.state.roles)), out.chunk(len(self.state.roles))):
            row = {"sigma": self.state.sigma, "layer": self.name, "role": role, "blurred": blurred and role == "seg"}
            self.recorder.append({**row, **attention_metrics(i, o, h, w)})


@contextlib.contextmanager
def installed(unet: torch.nn.Module, state: SegState, perturbed: list[str], tracked: list[str] = (),
              recorder: list[dict[str, Any]] | None = None, identity: list[str] = (), factory=None) -> Iterator[None]:
    """Put processors on the perturbed (SEG), `identity` (PAG) and, with a recorder, the tracked layers; restore the
    old ones after. A layer in both lists gets one processor doing both (on different chunks).

    Layers neither perturbed nor tracked keep their own processor, so unselected layers cost nothing extra.
    `factory(state, path, perturb, recorder, identity=)` makes a processor (default `SegAttnProcessor`; transformer families
    give their joint-attention one, `joint_attention.JointSegProcessor`).
    """
    make = factory or SegAttnProcessor
    if factory is None and joint_attention.is_joint(unet):
        make = lambda state_, path, perturb, rec, identity=False: joint_attention.processor(  # noqa: E731
            unet, state_, path, perturb, rec, identity=identity)
    modules = dict(unet.named_modules())
    paths = list(dict.fromkeys([*perturbed, *identity, *(tracked if recorder is not None else ())]))
    old = {p: modules[p].processor for p in paths}
    try:
        for p in paths:
            modules[p].set_processor(make(state, p, p in perturbed, recorder if p in tracked else None,
                                          identity=p in identity))
        yield
    finally:
        for p, proc in old.items():
            modules[p].set_processor(proc)
