"""Device, dtype, seeds."""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from .errors import DiffcliError


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def pick_device(name: str | None = None) -> torch.device:
    """`auto` (or None) picks cuda, then mps, then cpu; anything else must exist on this machine."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DiffcliError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffcliError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DiffcliError(f"device {name!r} requested but MPS is not available on this machine")
    return device


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """fp32 unless asked; half precision only where the device runs it."""
    if name in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DiffcliError(f"unknown dtype {name!r} (use one of fp32, fp16, bf16)")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise DiffcliError("fp16 is not supported on cpu; use fp32 or bf16")
    return dtype


def seed_all(seed: int) -> None:
    """Seed the global generators (only for code we do not control; our own noise uses explicit generators)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


class PerSampleRandn:
    """One torch.Generator per sample, so sample i with seed s is identical whatever the batch it is drawn in.

    Call it like torch.randn_like on a batch whose leading size equals the number of seeds.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"batch of {like.shape[0]} but {len(self.generators)} generators")
        return self.randn(like.shape[1:], like.dtype).to(like.device)

    def brownian(self, like: torch.Tensor, sigma_min: torch.Tensor | float, sigma_max: torch.Tensor | float
                 ) -> "BrownianNoise":
        """The SDE samplers' noise over [sigma_min, sigma_max]: one Brownian tree per sample, seeded by its seed."""
        return BrownianNoise(like, sigma_min, sigma_max, self.seeds)

    @property
    def seeds(self) -> list[int]:
        return [g.initial_seed() for g in self.generators]


class BrownianNoise:
    """Noise of a Brownian motion W(sigma) on [sigma_min, sigma_max], one torchsde Brownian tree per sample seeded
    by that sample's seed (its entropy), so a sample's noise never depends on its batch; called with
    (sigma, sigma_next) it gives (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma|, a standard normal per
    element, and nested or repeated intervals agree with each other as one path. This is k-diffusion's
    BrownianTreeNoiseSampler with a list of seeds, so the two draw the same noise from the same seeds."""

    def __init__(self, like: torch.Tensor, sigma_min: torch.Tensor | float, sigma_max: torch.Tensor | float,
                 seeds: Sequence[int]):
        import torchsde  # deferred: only the SDE samplers need it

        if len(seeds) != like.shape[0]:
            raise ValueError(f"batch of {like.shape[0]} but {len(seeds)} seeds")
        t0, t1 = sorted((torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)))
        w0 = torch.zeros_like(like[0])
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(s)) for s in seeds]

    def __call__(self, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float) -> torch.Tensor:
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        sign = 1.0 if a < b else -1.0  # W(b) - W(a), the tree wants its times ascending
        lo, hi = (a, b) if a < b else (b, a)
        with warnings.catch_warnings():  # a level a rounding below the range's end (exp(log sigma)): harmless
            warnings.filterwarnings("ignore", "Should have t")
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return w / (b - a).abs().sqrt()
