"""diffcli's own models (`models.py`): EDM denoisers and blurring-diffusion eps-predictors on a `nets.UNetF`, as a
family. They draw pixels at their trained size, take class labels (and next-frame contexts), not prompts, and
sample on Karras sigmas in the range their record gives (blurring models: on their times t from 1 to 0)."""
from __future__ import annotations

from typing import Any

import torch

from ..core.blurring import BlurringModel, get_ts
from ..core.denoisers import EDMPrecond
from ..core.schedules import NoiseLevels, refuses, schedule_sigmas
from ..shared.devices import PerSampleRandn
from ..shared.errors import DiffcliError
from ..shared.limits import check_batch_memory
from .family import Family


class DiffcliModel(Family):
    """A loaded diffcli model and its `model` record (`models.load_model`)."""

    def __init__(self, model: EDMPrecond | BlurringModel, meta: dict[str, Any]):
        self.model, self.meta = model, meta

    @classmethod
    def matches(cls, loaded: Any) -> bool:
        return isinstance(loaded, (EDMPrecond, BlurringModel))

    @property
    def name(self) -> str:  # 'edm' or 'blurring'
        return self.meta["kind"]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def sigma_data(self) -> float:
        return self.meta.get("sigma_data", 0.5)

    @property
    def attention(self) -> torch.nn.Module:
        return self.model.net.unet

    def denoiser(self):
        """EDM: D(x, sigma, class_labels=, context=); blurring: its eps-predictor at time t (`blurring.sample_blurring`)."""
        return self.model

    def sigmas(self, steps: int, device: torch.device | str | None = None, schedule: str = "karras",
               rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None) -> torch.Tensor:
        """EDM: Karras sigmas between the record's sigma_min and sigma_max (or the given ones), then 0;
        blurring: its times t from 1 to 0."""
        device = device if device is not None else next(self.model.parameters()).device
        if self.name == "blurring":
            if schedule != "karras":
                raise DiffcliError("--schedule sets an EDM schedule; a blurring model runs t from 1 to 0 in --steps")
            return get_ts(steps, device)
        levels = NoiseLevels(sigma_min or self.meta["sigma_min"], sigma_max or self.meta["sigma_max"])
        refusal = refuses(schedule, levels)
        if refusal:
            raise DiffcliError(refusal)
        return schedule_sigmas(schedule, levels, steps, rho, device)

    def native_size(self) -> int:
        return self.meta["image_size"]

    def check_size(self, height: int, width: int, names: tuple[str, str] = ("height", "width")) -> None:
        for name, v in zip(names, (height, width)):
            if v != self.native_size():
                raise DiffcliError(f"{name} {v}: this model draws {self.native_size()} px images")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.meta["channels"], height, width

    def initial_latents(self, rng: PerSampleRandn, shape: tuple[int, ...],
                        sigma_max: torch.Tensor | float) -> torch.Tensor:
        return rng.randn(shape) * sigma_max

    def decode(self, x: torch.Tensor, sigma_last: torch.Tensor | float = 0.0) -> torch.Tensor:
        return x.clamp(-1, 1).cpu()

    def decoded(self, x0: torch.Tensor) -> torch.Tensor:
        return x0

    def check_memory(self, n: int, height: int, width: int, dtype: torch.dtype, device: torch.device | str,
                     what: str, hint: str) -> None:
        check_batch_memory(n, self.meta["net"]["block_out_channels"][0], height, width, dtype, device, what, hint)
