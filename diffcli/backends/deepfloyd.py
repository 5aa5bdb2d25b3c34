"""DeepFloyd IF: pixel-space UNets conditioned on T5 embeddings. Stage I draws the small image; stage II
(super-resolution) reads the noisy image and the upsampled stage-I image side by side."""
from __future__ import annotations

from typing import Any

import torch

from ..core.denoisers import DiffusersDenoiser, ve_to_vp
from ..shared.errors import DiffcliError
from .diffusers_unet import UNetPipeline


class DeepFloydIF(UNetPipeline):
    """IF stage I: no VAE, the sample is the image."""

    name = "if"
    pixel_space = True
    stage = 1

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return super().matches(pipe) and getattr(pipe, "vae", None) is None

    @torch.no_grad()
    def decode(self, x: torch.Tensor, sigma_last: torch.Tensor | float) -> torch.Tensor:
        """Final sample (our form) -> images (N, 3, H, W) in [-1, 1] on the CPU: the sample is the image."""
        return ve_to_vp(x, sigma_last).float().clamp(-1, 1).cpu()

    def decoded(self, x0: torch.Tensor) -> torch.Tensor:
        return x0


class ConcatUNet(torch.nn.Module):
    """Stage II's UNet behind the plain UNet call: the conditioning image (keyword `image`) is concatenated to
    the scaled noisy input, as IFSuperResolutionPipeline does, so `DiffusersDenoiser` and CFG run it unchanged."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    @property
    def config(self):
        return self.unet.config

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, image: torch.Tensor, **kw: Any):
        return self.unet(torch.cat([sample, image.to(sample.dtype)], dim=1), timestep, **kw)


class DeepFloydIFSuperResolution(DeepFloydIF):
    """IF stage II: its denoiser takes the upsampled stage-I image (`condition`) as the keyword `image`."""

    stage = 2

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return super().matches(pipe) and hasattr(pipe, "image_noising_scheduler")

    def denoiser(self) -> DiffusersDenoiser:
        return DiffusersDenoiser.from_scheduler(ConcatUNet(self.pipe.unet), self.pipe.scheduler)

    def upscale(self, stage1: UNetPipeline) -> int:
        """How many times stage I's side this stage draws (a whole number, else a one-line error)."""
        mine, theirs = self.native_size(), stage1.native_size()
        if mine % theirs:
            raise DiffcliError("stage II's size is not a whole multiple of stage I's")
        return mine // theirs

    @torch.no_grad()
    def condition(self, image: torch.Tensor, height: int, width: int, noise_level: int,
                  noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(upsampled stage-I image with noise at `noise_level`, the noise-level class labels), as the pipeline
        makes them: bilinear with align_corners, then the image-noising scheduler's add_noise. `image` is
        (N, 3, h, w)."""
        noising = self.pipe.image_noising_scheduler
        steps = noising.config.num_train_timesteps
        if not 0 <= noise_level < steps:
            raise DiffcliError(f"--noise-level must be in [0, {steps}), got {noise_level}")
        up = torch.nn.functional.interpolate(image.float(), (height, width), mode="bilinear", align_corners=True)
        labels = torch.full((up.shape[0],), noise_level, device=up.device, dtype=torch.long)
        up = noising.add_noise(up, noise.to(up), labels)
        return up.to(self.dtype), labels
