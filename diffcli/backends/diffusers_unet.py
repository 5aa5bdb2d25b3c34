"""What every diffusers UNet pipeline family shares (SD 1.x/2.x, SDXL, DeepFloyd IF): the UNet as a denoiser over
the scheduler's noise table, its DDIM or Karras sigmas, sizes and memory from the UNet's config, SEG's layers in the
UNet, the scheduler's bounds on x0_hat. The pipeline's own `__call__` loop is never used: the loop is
`diffcli.core.samplers` over `DiffusersDenoiser` with these sigmas."""
from __future__ import annotations

from typing import Any

import torch

from ..core.denoisers import DiffusersDenoiser, vp_to_ve
from ..core.samplers import scheduler_levels
from ..core.schedules import NoiseLevels, refuses, schedule_sigmas
from ..shared.cache import cached
from ..shared.devices import PerSampleRandn
from ..shared.errors import DiffcliError
from ..shared.limits import check_batch_memory
from .family import Family


def initial_latents(rng: PerSampleRandn, shape: tuple[int, ...], sigma_max: torch.Tensor | float) -> torch.Tensor:
    """Unit-variance noise as the scheduler draws it, in our x = x0 + sigma n form."""
    return vp_to_ve(rng.randn(shape), sigma_max)


class UNetPipeline(Family):
    """A diffusers pipeline with a `unet` and a `scheduler`; subclasses add prompts' extras and decoding."""

    sigma_data = 1.0  # scaled latents and IF's pixels: PG's c_skip for --pg-grad skip

    def __init__(self, pipe: Any):
        self.pipe = pipe

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return hasattr(pipe, "unet")

    @property
    def kind(self) -> str:
        return type(self.pipe).__name__

    @property
    def attention(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    def device(self, device: torch.device | str | None = None) -> torch.device:
        return torch.device(device) if device is not None else self.pipe.unet.device

    def native_size(self) -> int:
        return self.pipe.unet.config.sample_size * self.scale_factor

    def check_size(self, height: int, width: int, names: tuple[str, str] = ("height", "width")) -> None:
        """Sizes the UNet can take (a multiple of its total downsampling); `names` word the error (commands: flags)."""
        f = self.scale_factor * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)
        for name, v in zip(names, (height, width)):
            if v < f or v % f:
                raise DiffcliError(f"{name} {v}: this model needs a positive multiple of {f} px")

    def check_memory(self, n: int, height: int, width: int, dtype: torch.dtype, device: torch.device | str,
                     what: str, hint: str) -> None:
        f = self.scale_factor
        check_batch_memory(n, self.pipe.unet.config.block_out_channels[0], height // f, width // f, dtype, device,
                           what, hint)

    def denoiser(self) -> DiffusersDenoiser:
        return DiffusersDenoiser.from_scheduler(self.pipe.unet, self.pipe.scheduler)

    ays: str | None = None  # the Align-Your-Steps table of core.schedules that fits the model (SD: "sd15", SDXL)

    def noise_levels(self) -> NoiseLevels:
        """The scheduler's noise table, its own DDIM sigmas and the model's AYS table (`core.schedules`)."""
        from diffusers import DDIMScheduler  # deferred like every diffusers import: `diffcli --help` stays fast

        return scheduler_levels(DDIMScheduler.from_config(self.pipe.scheduler.config), self.ays)

    def sigmas(self, steps: int, device: torch.device | str | None = None, schedule: str = "scheduler",
               rho: float = 7.0) -> torch.Tensor:
        """The pipeline's sigmas under one of `core.schedules.SCHEDULES` on its `noise_levels`: "scheduler", the
        DDIM timesteps of its noise table (ending where its DDIM ends: 0, or the table's first level); "karras",
        Karras sigmas (exponent `rho`) from the table's largest sigma to its smallest, then 0; and so on."""
        refusal = refuses(schedule, levels := self.noise_levels())
        if refusal:
            raise DiffcliError(refusal)
        return schedule_sigmas(schedule, levels, steps, rho, self.device(device))

    def encode_prompts(self, prompts: list[str], negative: str | list[str] | None, height: int, width: int,
                       device: torch.device | str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(cond, uncond) UNet keyword arguments, one row per prompt; `guidance.classifier_free` batches them.
        Within `cache.caching()` (a sweep) each set of prompts is encoded once."""
        if isinstance(negative, str):
            negative = [negative] * len(prompts)
        device = self.device(device)
        key = ("prompts", id(self.pipe), tuple(prompts), None if negative is None else tuple(negative), height, width,
               str(device))
        return cached(key, lambda: self._encode_prompts(prompts, negative, height, width, device))

    def _encode_prompts(self, prompts: list[str], negative: list[str] | None, height: int, width: int,
                        device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
        out = self.pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=True, negative_prompt=negative)
        return self.conditions(out, prompts, height, width, device)

    def conditions(self, out: tuple, prompts: list[str], height: int, width: int,
                   device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
        """`encode_prompt`'s output -> (cond, uncond) UNet keyword arguments."""
        return {"encoder_hidden_states": out[0]}, {"encoder_hidden_states": out[1]}

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.scale_factor
        return self.pipe.unet.config.in_channels, height // f, width // f

    def initial_latents(self, rng: PerSampleRandn, shape: tuple[int, ...],
                        sigma_max: torch.Tensor | float) -> torch.Tensor:
        return initial_latents(rng, shape, sigma_max)

    def limit(self, model):
        """The scheduler's own limits on x0_hat as a denoiser combinator: dynamic thresholding (IF's schedulers ask
        for it), else clipping, else `model` itself (SD). An Euler step from the limited x0_hat is DDIM with
        use_clipped_model_output=True, i.e. the 003 seed's psi(x_t, x0)."""
        c = self.pipe.scheduler.config
        if c.get("thresholding"):
            ratio, top = c.get("dynamic_thresholding_ratio", 0.995), c.get("sample_max_value", 1.0)

            def denoise(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
                x0 = model(x, sigma, **kw)
                s = torch.quantile(x0.flatten(1).abs(), ratio, dim=1).clamp(1, top).view(-1, *[1] * (x0.ndim - 1))
                return x0.clamp(-s, s) / s

            return denoise
        if c.get("clip_sample"):
            r = c.get("clip_sample_range", 1.0)
            return lambda x, sigma, **kw: model(x, sigma, **kw).clamp(-r, r)
        return model
