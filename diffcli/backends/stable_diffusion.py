"""Stable Diffusion 1.x/2.x and SDXL pipelines: latent UNets behind a VAE; SDXL adds a second text encoder's
pooled embeddings and the size micro-conditioning."""
from __future__ import annotations

from typing import Any

import torch

from ..core.denoisers import ve_to_vp
from .diffusers_unet import UNetPipeline


class StableDiffusion(UNetPipeline):
    """SD 1.x/2.x (and the fallback for any UNet pipeline with a VAE): CLIP text embeddings, a VAE. `--schedule ays`
    takes the published SD1.5 table (SD 2.x shares its noise table)."""

    ays = "sd15"

    name = "sd"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return super().matches(pipe) and getattr(pipe, "vae", None) is not None

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD's VAE)."""
        return getattr(self.pipe, "vae_scale_factor", 1) if getattr(self.pipe, "vae", None) is not None else 1

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> the VAE's images (unclamped, the VAE's dtype)."""
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample

    @torch.no_grad()
    def encoded(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (the VAE posterior's mean): the x0 of those images."""
        vae = self.pipe.vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)  # SDXL's VAE overflows in fp16 (as `decode`)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        mean = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean
        return (mean - shift) * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, x: torch.Tensor, sigma_last: torch.Tensor | float) -> torch.Tensor:
        """Final sample (our form) -> images (N, 3, H, W) in [-1, 1] on the CPU."""
        latents = ve_to_vp(x, sigma_last)
        vae = self.pipe.vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)  # SDXL's VAE overflows in fp16
        return self.vae_decode(latents).float().clamp(-1, 1).cpu()

    def decoded(self, x0: torch.Tensor) -> torch.Tensor:
        """x0_hat -> its decoded image, differentiable (no clamp, no uint8): what PG's clip kernel reads."""
        return self.vae_decode(x0)


class StableDiffusionXL(StableDiffusion):
    """SDXL: two text encoders; pooled text embeddings and the six micro-conditioning ids (original size, crop
    top-left, target size). We generate at the target size with no crop, as the SDXL pipeline does by default."""

    name = "sdxl"
    ays = "sdxl"

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return UNetPipeline.matches(pipe) and (getattr(pipe, "text_encoder_2", None) is not None
                                               or type(pipe).__name__.startswith("StableDiffusionXL"))

    def conditions(self, out: tuple, prompts: list[str], height: int, width: int,
                   device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
        cond, uncond = super().conditions(out, prompts, height, width, device)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=out[2].dtype)
        time_ids = time_ids.expand(len(prompts), -1)
        cond["added_cond_kwargs"] = {"text_embeds": out[2], "time_ids": time_ids}
        uncond["added_cond_kwargs"] = {"text_embeds": out[3], "time_ids": time_ids}
        return cond, uncond
