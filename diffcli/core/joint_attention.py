"""SEG on joint attention (SD3's MMDiT blocks, Flux's double- and single-stream blocks): the perturbed chunk's
image queries blurred on their true 2-D token grid, after QK-norm and RoPE, text queries and all keys and values
untouched.

Why after RoPE: attention logits are q_i . k_j with the rotated query q_i = R_i q'_i. A linear blur B along the
query axis (q_i -> sum_m B_im q_m) gives logits sum_m B_im (q_m . k_j): the logit map blurred along the query
axis, SEG's argument, when the blurred vectors are the ones that enter the dot product. Blurring q' before the
rotation gives sum_m B_im R_i q'_m, in which each neighbour is rotated to position i instead of its own: not a
blur of the logits (docs/seg.md writes it out; tests check both statements on a small case).

The processors compute q, k, v exactly as diffusers' `JointAttnProcessor2_0` (SD3: [image, text] along the
sequence) and `FluxAttnProcessor` (double blocks: [text, image]; single blocks: the concatenated [text, image]
sequence comes in as hidden_states), then hand the full-sequence (B, heads, L, d) q, k, v and the image part's
slice to `attend`. `attend` is the one place a perturbation of joint attention goes: SEG's query blur of the "seg"
chunk, and PAG's identity attention on the image-to-image block of the "pag" chunk (as diffusers'
`PAGJointAttnProcessor2_0`: each image query sees, among the image keys, only its own; text rows and columns kept).
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F

from .query_blur import Blur
from ..shared.errors import DiffcliError


def blur_image_queries(q: torch.Tensor, image: slice, grid: tuple[int, int], blur: Blur, chunks: int) -> torch.Tensor:
    """(B, heads, L, d) queries with the image part (`image`, raster order on the h x w `grid`) of the last of
    `chunks` equal batch chunks blurred; every other row as it was. The infinite blur is the mean of the image
    queries (text queries never enter it)."""
    b = q.shape[0]
    if chunks < 1 or b % chunks:
        raise ValueError(f"a batch of {b} does not split into {chunks} equal chunks")
    c = b // chunks
    h, w = grid
    part = q[-c:, :, image]
    if part.shape[2] != h * w:
        raise ValueError(f"{part.shape[2]} image tokens do not tile a {h}x{w} grid")
    blurred = blur(part, 1, h * w) if blur.infinite else blur(part, h, w)
    out = q.clone()
    out[-c:, :, image] = blurred.to(q.dtype)
    return out


def identity_mask(length: int, image: slice, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """PAG on joint attention: an additive (L, L) mask that leaves each image query, among the image keys, only its
    own (-inf elsewhere in the image-to-image block); text rows and columns untouched."""
    mask = torch.zeros(length, length, dtype=dtype, device=device)
    block = mask[image, image]
    block.fill_(float("-inf")).fill_diagonal_(0)
    return mask


def _rows(mask: torch.Tensor | None, part: slice, batch: int) -> torch.Tensor | None:
    """The rows of an attention mask that go with batch rows `part` (a mask without a batch axis serves all)."""
    return mask[part] if mask is not None and mask.ndim == 4 and mask.shape[0] == batch else mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, image: slice, grid: tuple[int, int],
           blur: Blur | None, roles: tuple[str, ...], identity: bool = False,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Joint attention over (B, heads, L, d) whose batch is the equal chunks `roles` (uncond, cond, seg, pag order):
    the last chunk before a "pag" one with its image queries blurred (blur None: none), the "pag" chunk with
    identity attention on the image-to-image block when `identity` (this layer is a PAG layer)."""
    chunks, b = max(len(roles), 1), q.shape[0]
    if roles and roles[-1] == "pag":
        if b % chunks:
            raise ValueError(f"a batch of {b} does not split into {chunks} equal chunks")
        c = b // chunks
        parts = []
        if len(roles) > 1:
            head = slice(0, b - c)
            parts.append(attend(q[head], k[head], v[head], image, grid, blur, roles[:-1], False,
                                _rows(mask, head, b)))
        tail = _rows(mask, slice(b - c, b), b)
        if identity:
            pag = identity_mask(q.shape[2], image, q.dtype, q.device)
            tail = pag if tail is None else tail + pag
        parts.append(F.scaled_dot_product_attention(q[b - c:], k[b - c:], v[b - c:], attn_mask=tail))
        return torch.cat(parts)
    if blur is not None:
        q = blur_image_queries(q, image, grid, blur, chunks)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class JointSegProcessor:
    """An attention processor for one joint-attention module: diffusers' computation, with `attend` in the middle.

    `layout`: "image_text" (SD3 joint blocks), "text_image" (Flux double blocks), "single" (Flux single blocks,
    image last in the concatenated sequence). The image grid is the latent's (`SegState.latent_hw`, the unpacked
    grid the denoiser sees) divided by the transformer's `patch`.
    """

    def __init__(self, state, name: str, perturb: bool, layout: str, patch: int, plain=None, identity: bool = False):
        self.state, self.name, self.perturb, self.layout, self.patch = state, name, perturb, layout, patch
        self.plain = plain  # the module's own processor: what runs when this call perturbs nothing (bit for bit)
        self.identity = identity  # a PAG layer

    def grid(self) -> tuple[int, int]:
        lh, lw = self.state.latent_hw
        return lh // self.patch, lw // self.patch

    def blur(self) -> Blur | None:
        return self.state.blur if self.perturb else None

    def pag(self) -> bool:
        """Does this call's "pag" chunk take identity attention here?"""
        return self.identity and getattr(self.state, "identity", False)

    def roles(self) -> tuple[str, ...]:
        return tuple(self.state.roles)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, *args, **kwargs):
        if self.blur() is None and not self.pag() and self.plain is not None:
            if self.layout == "image_text":
                return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if self.layout == "image_text":
            return self.sd3(attn, hidden_states, encoder_hidden_states)
        return self.flux(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def sd3(self, attn, x: torch.Tensor, context: torch.Tensor | None):
        b, n = x.shape[:2]
        heads = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if context is not None:
            cq, ck, cv = split(attn.add_q_proj(context)), split(attn.add_k_proj(context)), split(attn.add_v_proj(context))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        y = attend(q, k, v, slice(0, n), self.grid(), self.blur(), self.roles(), self.pag())
        y = y.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        out, ctx = (y[:, :n], y[:, n:]) if context is not None else (y, None)
        out = attn.to_out[1](attn.to_out[0](out))
        if context is None:
            return out
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return out, ctx

    def flux(self, attn, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None, rotary: Any):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections
        q, k, v, cq, ck, cv = _get_qkv_projections(attn, x, context)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        text = 0
        if attn.added_kv_proj_dim is not None and context is not None:
            cq, ck, cv = (t.unflatten(-1, (-1, attn.head_dim)) for t in (cq, ck, cv))
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
            text = context.shape[1]
        if rotary is not None:
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
        h, w = self.grid()
        length = q.shape[1]
        image = slice(text, length) if self.layout == "text_image" else slice(length - h * w, length)
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), image, (h, w), self.blur(),
                   self.roles(), self.pag(), mask)
        y = y.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if context is not None and attn.added_kv_proj_dim is not None:
            ctx, out = y.split_with_sizes([text, y.shape[1] - text], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(ctx.contiguous())
        return y


# ---------------------------------------------------------------- which transformers, which layers

# transformer class -> (its block lists -> SEG's block kinds, the image token's side in latent cells)
TRANSFORMERS = {
    "SD3Transformer2DModel": ({"transformer_blocks": "joint"}, 2),
    "FluxTransformer2DModel": ({"transformer_blocks": "double", "single_transformer_blocks": "single"}, 2),
}


def is_joint(net: torch.nn.Module) -> bool:
    """Is `net` a joint-attention transformer whose attention these processors know?"""
    return type(net).__name__ in TRANSFORMERS


def layers_of(net: torch.nn.Module) -> dict[str, list[str]]:
    """SEG's perturbable attention modules of a joint transformer by block kind, in module order."""
    kinds, _ = TRANSFORMERS[type(net).__name__]
    return {kind: [f"{attr}.{i}.attn" for i in range(len(getattr(net, attr)))]
            for attr, kind in kinds.items() if hasattr(net, attr)}


def processor(net: torch.nn.Module, state, path: str, perturb: bool, recorder=None,
              identity: bool = False) -> JointSegProcessor:
    """The processor for the module at `path` of a joint transformer (`attention.installed`'s factory there)."""
    if recorder is not None:
        raise DiffcliError("--metrics tracks UNet attention blocks; transformer models have no such tracking yet")
    name = type(net).__name__
    if name == "SD3Transformer2DModel":
        layout = "image_text"
    else:  # Flux: double blocks attend over [text, image], single blocks get [text, image] as one sequence
        layout = "text_image" if path.startswith("transformer_blocks") else "single"
    plain = dict(net.named_modules())[path].processor
    return JointSegProcessor(state, path, perturb, layout, TRANSFORMERS[name][1], plain, identity)


# ---------------------------------------------------------------- layer names

def resolve(layers: dict[str, list[str]], names: list[str], option: str = "layers") -> list[str]:
    """Names -> module paths in a transformer's attention `layers` (kind -> paths, module order): a kind ('joint',
    'double', 'single') is all its blocks, its first letter and an index one block ('j3', 'd0', 's12'), 'all'
    every block, 'mid' the middle block of the whole stack (SEG's default). Unknown names list the valid ones."""
    stack = [p for paths in layers.values() for p in paths]
    valid = ", ".join(f"{kind} ({kind[0]}0-{kind[0]}{len(p) - 1})" for kind, p in layers.items() if p)
    out: list[str] = []
    for name in names:
        m = re.fullmatch(r"([a-z])(\d+)", name)
        kinds = {kind[0]: kind for kind in layers}
        if name == "all":
            picked = stack
        elif name == "mid" and stack:
            picked = [stack[len(stack) // 2]]
        elif name in layers and layers[name]:
            picked = layers[name]
        elif m and m[1] in kinds and int(m[2]) < len(layers[kinds[m[1]]]):
            picked = [layers[kinds[m[1]]][int(m[2])]]
        else:
            raise DiffcliError(f"{option} {name!r}: no such attention block in this transformer; valid: mid, all, "
                               f"{valid}")
        out += [p for p in picked if p not in out]
    return out
