"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): an MMDiT of joint-attention blocks over [image, text]
tokens, two CLIP encoders and an optional T5, a 16-channel VAE with a shift; the scheduler's fixed shift (SD3: 3),
or its dynamic one where the config asks for it. Everything else is `flow_common.FlowPipeline`."""
from __future__ import annotations

from typing import Any

import torch

from .flow_common import FlowPipeline, dynamic_mu, flow_scheduler


class StableDiffusion3(FlowPipeline):
    name = "sd3"
    pipelines = ("StableDiffusion3Pipeline",)

    @property
    def text_tokens(self) -> int:
        return 77 + (256 if getattr(self.pipe, "text_encoder_3", None) is not None else 77)

    def scheduler_ts(self, steps: int, height: int, width: int) -> torch.Tensor:
        sched = flow_scheduler(self.pipe)
        kwargs = {}
        if sched.config.get("use_dynamic_shifting"):
            kwargs["mu"] = dynamic_mu(sched.config, self.image_tokens(height, width), 1.16)
        sched.set_timesteps(steps, device="cpu", **kwargs)
        return sched.sigmas.double()

    def _encode_prompts(self, prompts: list[str], negative: list[str], device: torch.device):
        pe, npe, pooled, npooled = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                           device=device, do_classifier_free_guidance=True,
                                                           negative_prompt=negative)
        return ({"encoder_hidden_states": pe, "pooled_projections": pooled},
                {"encoder_hidden_states": npe, "pooled_projections": npooled})

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        net = self.pipe.transformer
        timestep = (t * self.pipe.scheduler.config.num_train_timesteps).to(net.dtype)
        return net(hidden_states=x_t.to(net.dtype), timestep=timestep, return_dict=False,
                   **{k: v.to(net.dtype) for k, v in cond.items()})[0]
