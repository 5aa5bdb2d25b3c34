"""The one interface a model family implements, so that no command reaches into a network.

A family object wraps one loaded model (a diffusers pipeline, a diffcli model file) and answers every question a
command asks of it: its denoiser D(x, sigma, **cond), its sigmas, prompt encodings, the latent shape of an image
size and which sizes it takes, the initial noise, decoding to images, where SEG's attention processors go and the
names of its layers, whether a batch fits in memory, and its native size. `pipelines.load_family` loads a model
and picks its family (`pipelines.FAMILIES`, first match wins); `pipelines.pipeline_family` wraps a loaded pipeline.

A new family is one new module in `diffcli/backends/` holding a `Family` subclass, plus its tests, plus its class
in `pipelines.FAMILIES` (one line; before a family it must win over). The subclass implements:

- `matches(loaded)` (classmethod): True for the loaded pipeline/model this family runs (a type or config check);
- `name` (a short id: 'sd', 'sdxl', 'if', 'edm', ...), `kind` (what run.json records: the pipeline's class),
  `sigma_data` (the data's std in the space it samples: PG's c_skip), `scale_factor` (pixels per latent cell),
  `pixel_space` (True where the sample is the image, as for DeepFloyd IF);
- `denoiser()`: D(x, sigma, **cond) -> x0_hat, x = x0 + sigma * noise;
- `sigmas(steps, device, schedule, rho)`: the sampler's sigmas, descending, ending in 0 (or the table's last level);
- `encode_prompts(prompts, negative, height, width, device)`: (cond, uncond) keyword arguments, a row per prompt;
- `native_size()`: the image side it was trained at (px); `check_size(height, width, names)`: the sizes it takes,
  a one-line `DiffcliError` naming the option (`names`) otherwise; `latent_shape(height, width)`: (C, h, w);
- `initial_latents(rng, shape, sigma_max)`: the start of sampling, per-sample seeded (`PerSampleRandn`);
- `decode(x, sigma_last)`: the final sample -> images (N, 3, H, W) in [-1, 1] on the CPU;
- `decoded(x0)`: x0_hat -> its image, differentiable (no clamp): what PG's clip kernel reads;
- `attention` (the module SEG's processors are installed in) and `layers(names, option)` (`--layers` -> module
  paths; the default resolves the self-attention layers of `attention`);
- `check_memory(n, height, width, dtype, device, what, hint)`: refuse a batch the device cannot hold, before
  allocating;
- optionally `limit(model)` (the scheduler's bounds on x0_hat as a denoiser combinator; default none).
"""
from __future__ import annotations

import abc
import math
from typing import Any

import torch

from ..core import attention as seg_attention
from ..core.denoisers import Denoiser
from ..shared.devices import PerSampleRandn
from ..shared.errors import DiffcliError


class Family(abc.ABC):
    """One model family behind the questions commands ask (module docstring)."""

    name: str = ""
    sigma_data: float = 1.0
    scale_factor: int = 1
    pixel_space: bool = False
    tracks_metrics: bool = True  # SEG's --metrics can record its attention blocks

    @classmethod
    @abc.abstractmethod
    def matches(cls, loaded: Any) -> bool:
        """Whether this family runs `loaded` (a pipeline or a model)."""

    @property
    @abc.abstractmethod
    def kind(self) -> str:
        """What run.json records as the model's kind."""

    @abc.abstractmethod
    def denoiser(self) -> Denoiser: ...

    @abc.abstractmethod
    def sigmas(self, steps: int, device: torch.device | str | None = None, schedule: str = "scheduler",
               rho: float = 7.0) -> torch.Tensor: ...

    def encode_prompts(self, prompts: list[str], negative: str | list[str] | None, height: int, width: int,
                       device: torch.device | str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        raise DiffcliError(f"a {self.kind} model takes no prompts")

    @abc.abstractmethod
    def native_size(self) -> int: ...

    @abc.abstractmethod
    def check_size(self, height: int, width: int, names: tuple[str, str] = ("height", "width")) -> None: ...

    @abc.abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]: ...

    @abc.abstractmethod
    def initial_latents(self, rng: PerSampleRandn, shape: tuple[int, ...],
                        sigma_max: torch.Tensor | float) -> torch.Tensor: ...

    @abc.abstractmethod
    def decode(self, x: torch.Tensor, sigma_last: torch.Tensor | float) -> torch.Tensor: ...

    @abc.abstractmethod
    def decoded(self, x0: torch.Tensor) -> torch.Tensor: ...

    def encoded(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> the x0 they are in the space the model samples (region prompts'
        bootstrapping encodes flat colours with it). Pixel models sample the image itself; a latent family that
        cannot encode says so in one line."""
        if self.pixel_space:
            return images
        raise DiffcliError(f"a {self.kind} model cannot encode images (needed by --bootstrap); use --bootstrap 0")

    @property
    @abc.abstractmethod
    def attention(self) -> torch.nn.Module:
        """The network whose self-attention layers SEG perturbs (its processors are installed here)."""

    def layers(self, names: list[str], option: str = "layers") -> list[str]:
        """Layer names (down/mid/up, d4, m0, u1) -> module paths in `attention`; unknown names list the valid ones."""
        return seg_attention.resolve_layers(self.attention, names, option)

    def start_scale(self, sigma_max: torch.Tensor | float) -> float:
        """What unit noise is multiplied by to start sampling at sigma_max (`initial_latents` does the same):
        sqrt(1 + sigma^2), a VP latent's spread in VE form; flow models: 1 + sigma."""
        return math.sqrt(1 + float(sigma_max) ** 2)

    def state_dtype(self, device: torch.device | str) -> torch.dtype:
        """The dtype of the sampler's state (float32; flow models float64, see flow_common)."""
        return torch.float32

    def seg_processor(self, state: seg_attention.SegState, name: str, perturb: bool, recorder=None,
                      identity: bool = False):
        """The attention processor SEG (`perturb`) and PAG (`identity`) install on the module `name`
        (`attention.installed`'s factory)."""
        return seg_attention.SegAttnProcessor(state, name, perturb, recorder, identity=identity)

    @abc.abstractmethod
    def check_memory(self, n: int, height: int, width: int, dtype: torch.dtype, device: torch.device | str,
                     what: str, hint: str) -> None: ...

    def limit(self, model: Denoiser) -> Denoiser:
        """The family's bounds on x0_hat around `model` (none by default)."""
        return model
