"""Flux.1 dev/schnell (`FluxPipeline`): double-stream blocks (joint attention over [text, image]) then
single-stream blocks over the concatenated sequence, RoPE from (0, row, col) image ids, the 16-channel latent packed
2x2 into 64-channel tokens, CLIP pooled + T5 sequence embeddings, a guidance-distilled embedding (dev) that is an
input of the network, not CFG. The schedule's shift mu is linear in the image token count.

The family works on the unpacked latent grid (N, 16, h, w): packing happens inside `velocity`, so panorama windows
and anagram views act on the grid the VAE decodes; the image ids are the grid's own (relative to what the network
sees)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .flow_common import FlowPipeline, dynamic_mu, flow_scheduler


def pack(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4C): 2x2 cells into one token, as the pipeline's `_pack_latents`."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n, _, d = tokens.shape
    return tokens.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """RoPE positions (0, row, col) of an h x w token grid, rows and columns starting at `offset`."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None] + offset[0]
    ids[..., 2] += torch.arange(w)[None, :] + offset[1]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class Flux(FlowPipeline):
    name = "flux"
    pipelines = ("FluxPipeline",)
    packing = 4
    position_offset: tuple[int, int] = (0, 0)  # RoPE row/col offset of the grid the network sees (panoramas)

    @property
    def distilled(self) -> bool:
        return bool(self.pipe.transformer.config.guidance_embeds)

    @property
    def text_tokens(self) -> int:
        return 512

    def default_guidance_embed(self) -> float:
        """The pipeline's default guidance_scale (3.5), the distilled models' embedded value."""
        import inspect
        return float(inspect.signature(type(self.pipe).__call__).parameters["guidance_scale"].default)

    def scheduler_ts(self, steps: int, height: int, width: int) -> torch.Tensor:
        sched = flow_scheduler(self.pipe)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if sched.config.get("use_flow_sigmas"):
            sigmas = None
        mu = dynamic_mu(sched.config, self.image_tokens(height, width))
        sched.set_timesteps(steps, device="cpu", sigmas=sigmas, mu=mu)
        return sched.sigmas.double()

    def _encode_prompts(self, prompts: list[str], negative: list[str], device: torch.device):
        out = []
        for texts in (prompts, negative):
            pe, pooled, _ = self.pipe.encode_prompt(prompt=texts, prompt_2=None, device=device)
            row = {"encoder_hidden_states": pe, "pooled_projections": pooled}
            if self.distilled:
                g = self.default_guidance_embed() if self.guidance_embed is None else self.guidance_embed
                row["guidance"] = torch.full((len(texts),), g, device=device, dtype=torch.float32)
            out.append(row)
        return out[0], out[1]

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        net = self.pipe.transformer
        n, _, h, w = x_t.shape
        text = cond["encoder_hidden_states"]
        timestep = (t * self.pipe.scheduler.config.num_train_timesteps).to(net.dtype) / 1000
        v = net(hidden_states=pack(x_t).to(net.dtype), timestep=timestep, guidance=cond.get("guidance"),
                pooled_projections=cond["pooled_projections"].to(net.dtype),
                encoder_hidden_states=text.to(net.dtype),
                txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=net.dtype),
                img_ids=image_ids(h // 2, w // 2, x_t.device, net.dtype, self.position_offset),
                return_dict=False)[0]
        return unpack(v, h, w)
