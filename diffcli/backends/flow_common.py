"""What the flow-matching transformer families share (SD3/SD3.5, Flux.1): a rectified-flow network as a denoiser,
the pipeline's own shifted schedule, sizes by patch, memory, SEG's joint-attention layers.

Rectified flow: x_t = (1 - t) x0 + t n and the network predicts v = n - x0. Dividing by (1 - t) puts it in the
variance-exploding form every sampler here integrates, x = x_t / (1 - t) = x0 + sigma n with sigma = t / (1 - t)
(t = sigma / (1 + sigma)): the denoiser scales its input by 1 / (1 + sigma) to get x_t back and returns
x0_hat = x_t - t v. An Euler step in sigma on this denoiser is exactly the scheduler's Euler step in t
(x_t' = x_t + (t' - t) v), so `--sampler euler` on the scheduler's own sigmas is the diffusers pipeline.

t = 1 (pure noise, where every flow schedule starts) is sigma = infinity: the schedules start at `SIGMA_T1`
instead, a finite sigma the denoiser reads as t = 1 exactly, so the first step is the pipeline's to float rounding
and the state x = n (1 + SIGMA_T1) keeps n to float precision because these families run the sampler in float64:
their initial latents and sigmas are float64, so x - x0_hat at sigma 1e7 does not cancel away x0_hat (in float32
the state's rounding, sigma x 6e-8, would be larger than the data). The network still runs in its own dtype; the
float64 state costs nothing next to it. (MPS has no float64: there the state is float32 and the first steps lose
precision.)

A family module (flow_sd3.py, flow_flux.py) says how its network is called on the unpacked latent grid (`velocity`), how
prompts become its conditioning, how it decodes, and which of its attention modules SEG may perturb.
"""
from __future__ import annotations

from typing import Any

import torch

from ..core import joint_attention
from ..core.schedules import NoiseLevels, refuses, schedule_sigmas
from ..shared.cache import cached
from ..shared.devices import PerSampleRandn
from ..shared.errors import DiffcliError
from ..shared.memory import check_memory
from .family import Family

SIGMA_T1 = 1e7  # the finite sigma that stands for t = 1; the denoiser reads sigma >= SIGMA_T1 as t = 1 exactly


def state_dtype(device: torch.device | str) -> torch.dtype:
    """The sampler state's dtype: float64 (module docstring), float32 on MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """t = sigma / (1 + sigma) in float64, and exactly 1 from `SIGMA_T1` up."""
    s = sigma.double()
    return torch.where(s >= SIGMA_T1, torch.ones_like(s), s / (1 + s))


def t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """sigma = t / (1 - t) in float64, `SIGMA_T1` at t = 1."""
    t = t.double()
    return torch.where(t >= 1, torch.full_like(t, SIGMA_T1), t / (1 - t).clamp(min=1e-300))


class FlowDenoiser(torch.nn.Module):
    """D(x, sigma, **cond) = x_t - t v(x_t, t) with x_t = x / (1 + sigma): a velocity network as a denoiser.

    `velocity(x_t, t, **cond)` runs the family's network on the (N, C, h, w) latent grid (float32 t per row) and
    returns v on that grid; it casts to the network's dtype, the ODE stays float32.
    """

    def __init__(self, velocity, network: torch.nn.Module):
        super().__init__()
        self.velocity, self.network = velocity, network

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        shape = (-1,) + (1,) * (x.ndim - 1)
        t32 = sigma_to_t(sigma.flatten()).float()
        x_t = x / (1 + sigma.to(x.dtype).view(shape))
        v = self.velocity(x_t, t32, **cond).float()
        return x_t - t32.view(shape) * v


class FlowPipeline(Family):
    """A diffusers flow-matching transformer pipeline (`transformer`, `vae`, a FlowMatchEulerDiscreteScheduler)."""

    sigma_data = 1.0
    pixel_space = False
    tracks_metrics = False
    patch = 2

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.size_hw: tuple[int, int] | None = None  # the last size checked: Flux's schedule depends on it
        self.guidance_embed: float | None = None
        self.offload = False
        self.encoded: dict = {}  # prompt encodings kept by `encode_all` (the text encoders freed after it)
        self.released = False

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return type(pipe).__name__ in cls.pipelines

    pipelines: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return type(self.pipe).__name__

    @property
    def attention(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    def device(self, device: torch.device | str | None = None) -> torch.device:
        if device is not None:
            return torch.device(device)
        return getattr(self.pipe, "_execution_device", None) or self.pipe.transformer.device

    @property
    def scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    # ------------------------------------------------------------ sizes

    def cell(self) -> int:
        """Pixels per transformer token side: the VAE's factor times the patch."""
        return self.scale_factor * self.patch

    def check_size(self, height: int, width: int, names: tuple[str, str] = ("height", "width")) -> None:
        f = self.cell()
        for name, v in zip(names, (height, width)):
            if v < f or v % f:
                raise DiffcliError(f"{name} {v}: this transformer patches {self.patch}x{self.patch} latent cells of "
                                   f"{self.scale_factor} px, so it needs a positive multiple of {f} px")
        self.size_hw = (height, width)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.scale_factor
        return self.pipe.transformer.config.in_channels // self.packing, height // f, width // f

    packing = 1  # channels per latent cell in a token, divided by the VAE's channels (Flux: 4)

    def image_tokens(self, height: int, width: int) -> int:
        return (height // self.cell()) * (width // self.cell())

    def check_memory(self, n: int, height: int, width: int, dtype: torch.dtype, device: torch.device | str,
                     what: str, hint: str) -> None:
        """The transformer's weights (unless offloaded, when diffusers moves one model at a time) plus the first
        activation of the batch (tokens x inner dimension), against the device's memory."""
        cfg = self.pipe.transformer.config
        inner = cfg.num_attention_heads * cfg.attention_head_dim
        tokens = self.image_tokens(height, width) + self.text_tokens
        size = torch.empty((), dtype=dtype).element_size()
        weights = 0 if self.offload else sum(p.numel() for p in self.pipe.transformer.parameters()) * size
        need = weights + n * tokens * inner * size * 4  # q, k, v and the output of one attention layer
        check_memory(need, device, f"{what} ({n} x {tokens} tokens x {inner}, with the transformer's weights)", hint)

    text_tokens = 77

    # ------------------------------------------------------------ noise

    def initial_latents(self, rng: PerSampleRandn, shape: tuple[int, ...],
                        sigma_max: torch.Tensor | float) -> torch.Tensor:
        """Unit noise n as the pipeline draws it (on the unpacked grid), in our form: x = n (1 + sigma_max)."""
        return rng.randn(shape).to(state_dtype(rng.device)) * (1 + float(sigma_max))

    def start_scale(self, sigma_max: torch.Tensor | float) -> float:
        return 1 + float(sigma_max)

    def state_dtype(self, device: torch.device | str) -> torch.dtype:
        return state_dtype(device)

    def scheduler_ts(self, steps: int, height: int, width: int) -> torch.Tensor:
        """The t values the pipeline's own loop visits (its scheduler after `set_timesteps`), ending in 0."""
        raise NotImplementedError

    def noise_levels(self) -> NoiseLevels:
        """The scheduler's training levels (its shifted t grid; Flux at the current size's shift) in sigma, for the
        shared schedules (`core.schedules`): the finite ones (t = 1 is sigma = infinity, `SIGMA_T1` stands in)."""
        sched = self.pipe.scheduler
        h, w = self.size_hw or (self.native_size(),) * 2
        ts = self.scheduler_ts(sched.config.num_train_timesteps, h, w)
        table = t_to_sigma(ts[ts > 0].double()).flip(0)
        finite = table[table < SIGMA_T1]
        if not len(finite):
            finite = table
        return NoiseLevels(float(finite[0]), float(finite[-1]), finite,
                           own=lambda steps: t_to_sigma(self.scheduler_ts(steps, h, w)),
                           shift=getattr(sched.config, "shift", None))

    def sigmas(self, steps: int, device: torch.device | str | None = None, schedule: str = "scheduler",
               rho: float = 7.0) -> torch.Tensor:
        """"scheduler": the pipeline's own t grid (SD3's shift; Flux's shift from the image token count of the
        last checked size) as sigmas, starting at `SIGMA_T1` (t = 1) and ending in 0, in float64; any other of
        `core.schedules.SCHEDULES` (karras, simple, sgm_uniform, beta, ...) over the scheduler's finite levels
        (`noise_levels`, the model's shift in them), then 0."""
        device = self.device(device)
        if schedule == "scheduler":
            h, w = self.size_hw or (self.native_size(),) * 2
            return t_to_sigma(self.scheduler_ts(steps, h, w)).to(device=device, dtype=state_dtype(device))
        refusal = refuses(schedule, levels := self.noise_levels())
        if refusal:
            raise DiffcliError(refusal)
        try:
            return schedule_sigmas(schedule, levels, steps, rho, device).to(state_dtype(device))
        except ValueError as err:
            raise DiffcliError(str(err)) from None

    # ------------------------------------------------------------ prompts

    def set_guidance_embed(self, value: float | None) -> None:
        """Flux's distilled guidance value (an input of the network, not CFG); refused on models without one."""
        if value is not None and not self.distilled:
            raise DiffcliError(f"--guidance-embed {value}: this {self.kind} has no distilled guidance embedding "
                               "(use --cfg for classifier-free guidance)")
        self.guidance_embed = value

    distilled = False

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative: str | list[str] | None, height: int, width: int,
                       device: torch.device | str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(cond, uncond) keyword arguments of the denoiser, one row per prompt. Within `cache.caching()` (a
        sweep) or after `encode_all` each set of prompts is encoded once."""
        if isinstance(negative, str) or negative is None:
            negative = [negative or ""] * len(prompts)
        device = self.device(device)
        key = ("prompts", id(self.pipe), tuple(prompts), tuple(negative), self.guidance_embed, str(device))
        if key in self.encoded:
            return self.encoded[key]
        if self.released:
            raise DiffcliError("the text encoders were freed after encoding; encode every prompt first")
        return cached(key, lambda: self._encode_prompts(prompts, negative, device))

    def encode_all(self, batches: list[list[str]], negative: str | list[str] | None, height: int, width: int,
                   device: torch.device | str | None = None) -> None:
        """Encode every batch of prompts a run needs, then free the text encoders (T5-XXL alone is 4.7B
        parameters): later `encode_prompts` calls for these batches read the kept encodings."""
        from ..shared import cache
        self.encoded = {}
        dev = self.device(device)
        for prompts in batches:
            neg = [negative or ""] * len(prompts) if isinstance(negative, str) or negative is None else negative
            key = ("prompts", id(self.pipe), tuple(prompts), tuple(neg), self.guidance_embed, str(dev))
            self.encoded[key] = self._encode_prompts(prompts, neg, dev)
        if cache._cache is None and not self.offload:  # a sweep reuses the pipeline; offload moves them off anyway
            self.release_text_encoders()

    def release_text_encoders(self) -> None:
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)
        self.released = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _encode_prompts(self, prompts: list[str], negative: list[str], device: torch.device):
        raise NotImplementedError

    # ------------------------------------------------------------ the network

    def denoiser(self) -> FlowDenoiser:
        return FlowDenoiser(self.velocity, self.pipe.transformer)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        raise NotImplementedError

    def native_size(self) -> int:
        return self.pipe.default_sample_size * self.scale_factor

    # ------------------------------------------------------------ decoding

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample

    @torch.no_grad()
    def decode(self, x: torch.Tensor, sigma_last: torch.Tensor | float) -> torch.Tensor:
        """Final sample (our form, ending at sigma 0 where x = x0) -> images (N, 3, H, W) in [-1, 1] on the CPU."""
        latents = x / (1 + float(sigma_last))
        return self.vae_decode(latents).float().clamp(-1, 1).cpu()

    def decoded(self, x0: torch.Tensor) -> torch.Tensor:
        return self.vae_decode(x0)

    # ------------------------------------------------------------ SEG on joint attention

    def layers(self, names: list[str], option: str = "layers") -> list[str]:
        """Block kinds ('joint'; 'double', 'single'), indexed layers ('j3'; 'd0', 's12'), 'all', or 'mid' (the
        middle block of the whole stack, the default) -> module paths; unknown names list the valid ones."""
        return joint_attention.resolve(joint_attention.layers_of(self.attention), names, option)

    def seg_processor(self, state, name: str, perturb: bool, recorder=None, identity: bool = False):
        return joint_attention.processor(self.attention, state, name, perturb, recorder, identity=identity)


def dynamic_mu(config: Any, image_seq_len: int, max_shift_default: float = 1.15) -> float:
    """The scheduler's resolution-dependent shift: linear in the image token count, base_shift at
    base_image_seq_len to max_shift at max_image_seq_len (the pipelines' `calculate_shift`)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", max_shift_default)
    m = (top - base) / (max_len - base_len)
    return image_seq_len * m + base - m * base_len


def flow_scheduler(pipe: Any):
    """A fresh copy of the pipeline's scheduler (set_timesteps mutates it)."""
    return type(pipe.scheduler).from_config(pipe.scheduler.config)


