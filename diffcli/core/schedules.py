"""Noise schedules: which noise levels a sampler visits, as a function of a model's noise levels.

A schedule never knows which model family it serves. A family hands its `NoiseLevels` (continuous sigma_min and
sigma_max, a discrete ascending sigma table where it has one, its own sigmas where it has them, and which published
Align-Your-Steps table fits it) and every entry of SCHEDULES turns them into `steps` descending sigmas followed by
the final level (0, or where the scheduler's own schedule stops). Sigmas are in the VE form x = x0 + sigma n of
the denoiser interface; a table may come from a DDPM noise table (sigma = sqrt((1 - a) / a)), a flow model's
shifted t grid (sigma = t / (1 - t)) or, for a continuous model, log-uniform levels between its ends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..shared import registries

TABLE_SIZE = 1000  # levels of the log-uniform table a continuous model is given (as ComfyUI gives EDM models)


@dataclass(frozen=True)
class NoiseLevels:
    """A model's noise levels. `table`: ascending sigmas indexed by discrete time (None: continuous model, then
    `TABLE_SIZE` log-uniform levels between sigma_min and sigma_max stand in); `own`: steps -> the scheduler's own
    sigmas (pipelines); `ays`: the key of the Align-Your-Steps table that fits the model (None: none does);
    `shift`: a flow model's time shift (informational: the shift is already in its table and its own sigmas)."""
    sigma_min: float
    sigma_max: float
    table: torch.Tensor | None = None
    own: Callable[[int], torch.Tensor] | None = field(default=None, compare=False)
    ays: str | None = None
    shift: float | None = None

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor, **kw) -> "NoiseLevels":
        """A DDPM-style noise table: sigma_t = sqrt((1 - a_t) / a_t), ascending in t (computed in float64)."""
        a = alphas_cumprod.double()
        table = ((1 - a) / a).sqrt()
        return cls(float(table.min()), float(table.max()), table, **kw)

    @classmethod
    def from_flow_times(cls, t: torch.Tensor, **kw) -> "NoiseLevels":
        """A flow-matching model's (shifted) time grid t in (0, 1): sigma = t / (1 - t), ascending."""
        t = t.double().sort().values
        table = t / (1 - t)
        return cls(float(table.min()), float(table.max()), table, **kw)

    @classmethod
    def flow(cls, shift: float = 1.0, size: int = TABLE_SIZE, **kw) -> "NoiseLevels":
        """A flow-matching model's levels under a time shift (SD3: 3): t in (0, 1] on `size` even steps, shifted
        t' = shift t / (1 + (shift - 1) t) as FlowMatchEulerDiscreteScheduler does, sigma = t' / (1 - t'); t' = 1
        (pure noise, sigma infinite) is left out, so the top level is the grid's next one."""
        t = torch.arange(1, size, dtype=torch.float64) / size
        shifted = shift * t / (1 + (shift - 1) * t)
        return cls.from_flow_times(shifted, shift=shift, **kw)

    def sigmas_table(self) -> torch.Tensor:
        """The ascending discrete table (float64); a continuous model's is log-uniform between its ends."""
        if self.table is not None:
            return self.table.double().cpu()
        return torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), TABLE_SIZE, dtype=torch.float64).exp()

    def t_of(self, sigma: float) -> int:
        """The table index nearest to sigma in log sigma."""
        return int((self.sigmas_table().log() - math.log(sigma)).abs().argmin())

    def sigma_of(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at fractional table positions t, log-linearly interpolated between neighbours."""
        log_table = self.sigmas_table().log()
        t = t.double().clamp(0, len(log_table) - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        return ((1 - w) * log_table[low] + w * log_table[high]).exp()


def _end(sigmas: list[float] | torch.Tensor) -> torch.Tensor:
    """Descending levels, then 0, as float64."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    return torch.cat([s, s.new_zeros(1)])


# ---------------------------------------------------------------- the schedules (k-diffusion, ComfyUI, papers)

def get_sigmas_karras(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """EDM eq. 5: n noise levels from sigma_max to sigma_min, evenly spaced in sigma^(1/rho), then 0."""
    if n < 1:
        raise ValueError("need at least one step")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=torch.float32)


def exponential(levels: NoiseLevels, n: int, rho: float) -> torch.Tensor:
    """Evenly spaced in log sigma from sigma_max to sigma_min."""
    return _end(torch.linspace(math.log(levels.sigma_max), math.log(levels.sigma_min), n, dtype=torch.float64).exp())


def polyexponential(levels: NoiseLevels, n: int, rho: float) -> torch.Tensor:
    """log sigma = log sigma_min + ramp^rho (log sigma_max - log sigma_min), ramp from 1 to 0 (rho 1: exponential)."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    lo, hi = math.log(levels.sigma_min), math.log(levels.sigma_max)
    return _end((ramp * (hi - lo) + lo).exp())


def vp(levels: NoiseLevels, n: int, rho: float, beta_d: float = 19.9, beta_min: float = 0.1,
       eps_s: float = 1e-3) -> torch.Tensor:
    """Song et al.'s continuous VP SDE, t from 1 to eps_s: sigma = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
    (its own range, about 0.032 to 152: the model's ends do not enter)."""
    t = torch.linspace(1, eps_s, n, dtype=torch.float64)
    return _end((torch.exp(beta_d * t ** 2 / 2 + beta_min * t) - 1).sqrt())


def simple(levels: NoiseLevels, n: int, rho: float) -> torch.Tensor:
    """ComfyUI's simple: every (T/n)-th level of the table, from the top."""
    table = levels.sigmas_table()
    stride = len(table) / n
    return _end([float(table[-(1 + int(i * stride))]) for i in range(n)])


def normal(levels: NoiseLevels, n: int, rho: float, sgm: bool = False) -> torch.Tensor:
    """ComfyUI's normal: n times evenly spaced from t(sigma_max) to t(sigma_min) (table positions), their sigmas
    interpolated log-linearly; when the last is ~0 it stands for the final 0 and n + 1 times are taken."""
    start, end = levels.t_of(levels.sigma_max), levels.t_of(levels.sigma_min)
    if sgm:
        ts = torch.linspace(start, end, n + 1, dtype=torch.float64)[:-1]
        return _end(levels.sigma_of(ts))
    if abs(float(levels.sigma_of(torch.tensor(float(end))))) <= 1e-5:
        return levels.sigma_of(torch.linspace(start, end, n + 1, dtype=torch.float64))
    return _end(levels.sigma_of(torch.linspace(start, end, n, dtype=torch.float64)))


def sgm_uniform(levels: NoiseLevels, n: int, rho: float) -> torch.Tensor:
    """SGM's uniform: n + 1 times evenly spaced from t(sigma_max) to t(sigma_min), the last dropped."""
    return normal(levels, n, rho, sgm=True)


def ddim_uniform(levels: NoiseLevels, n: int, rho: float) -> torch.Tensor:
    """DDIM's uniform timesteps: table levels 1, 1 + c, 1 + 2c, ... (c = T // n), from the top."""
    table = levels.sigmas_table()
    stride = max(len(table) // n, 1)
    return _end([float(table[i]) for i in range(1, len(table), stride)][::-1])


def beta(levels: NoiseLevels, n: int, rho: float, alpha: float = 0.6, b: float = 0.6) -> torch.Tensor:
    """Lee et al. 2024: table positions at the Beta(alpha, beta) quantiles of 1 - i/n, rounded; repeats dropped."""
    from scipy.stats import beta as beta_dist  # deferred: scipy.stats is slow to import

    table = levels.sigmas_table()
    last = len(table) - 1
    ts = np.rint(beta_dist.ppf(1 - np.linspace(0, 1, n, endpoint=False), alpha, b) * last)
    kept = [int(t) for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]
    return _end([float(table[t]) for t in kept])


def linear_quadratic(levels: NoiseLevels, n: int, rho: float, threshold: float = 0.025) -> torch.Tensor:
    """Movie Gen's linear-quadratic t schedule, scaled to sigma_max: the first n // 2 steps linear in t up to
    `threshold`, the rest quadratic to 1 (t = 1 - sigma / sigma_max), ending in 0."""
    if n == 1:
        t = [0.0, 1.0]
    else:
        lin = n // 2
        t = [i * threshold / lin for i in range(lin)]
        diff = lin - threshold * n
        quad = n - lin
        a = diff / (lin * quad ** 2)
        b = threshold / lin - 2 * diff / quad ** 2
        c = a * lin ** 2
        t += [a * i ** 2 + b * i + c for i in range(lin, n)] + [1.0]
    return torch.tensor([1.0 - v for v in t], dtype=torch.float64) * levels.sigma_max


def kl_optimal(levels: NoiseLevels, n: int, rho: float) -> torch.Tensor:
    """Sabour et al. 2024 ("Align your steps" KL-optimal): evenly spaced in arctan(sigma)."""
    w = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    return _end((w * math.atan(levels.sigma_min) + (1 - w) * math.atan(levels.sigma_max)).tan())


# Align Your Steps (Sabour et al. 2024): NVIDIA's published 10-step noise levels (11 values, the last is the
# model's smallest sigma and becomes 0 in use), for Stable Diffusion 1.5 and SDXL.
AYS_TABLES = {
    "sd15": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
             0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
}


def loglinear_interp(levels: torch.Tensor | list[float], n: int) -> torch.Tensor:
    """Descending levels resampled to n values, linearly in log sigma over evenly spaced positions."""
    ys = np.log(np.asarray(levels, dtype=np.float64)[::-1])
    out = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(ys)), ys)
    return torch.from_numpy(np.exp(out)[::-1].copy())


def align_your_steps(levels: NoiseLevels, n: int, rho: float) -> torch.Tensor:
    """The published AYS table of the model (levels.ays), log-linearly interpolated to n + 1 levels, the last 0."""
    table = torch.tensor(AYS_TABLES[levels.ays], dtype=torch.float64)
    sigmas = table.clone() if n + 1 == len(table) else loglinear_interp(table, n + 1)
    sigmas[-1] = 0.0
    return sigmas


def karras(levels: NoiseLevels, n: int, rho: float) -> torch.Tensor:
    """EDM eq. 5 between the model's ends (exponent rho)."""
    return get_sigmas_karras(n, levels.sigma_min, levels.sigma_max, rho)


def scheduler(levels: NoiseLevels, n: int, rho: float) -> torch.Tensor:
    """The pipeline's own sigmas."""
    return levels.own(n)


@dataclass(frozen=True)
class Schedule:
    """One entry of SCHEDULES: (levels, steps, rho) -> descending sigmas then the final level; its help line;
    `needs`: what of NoiseLevels it reads beyond the ends ("own": a scheduler's sigmas, "ays": a published table)."""
    sigmas: Callable[[NoiseLevels, int, float], torch.Tensor]
    description: str
    needs: str | None = None

    @property
    def pipeline_only(self) -> bool:
        return self.needs is not None


SCHEDULES: dict[str, Schedule] = {
    "scheduler": Schedule(scheduler, "the pipeline's own timesteps (DDIM's; flow: its shifted grid), its default",
                          needs="own"),
    "karras": Schedule(karras, "Karras et al. (EDM), exponent --rho, the digit models' default"),
    "exponential": Schedule(exponential, "evenly spaced in log sigma"),
    "polyexponential": Schedule(polyexponential, "log sigma on a ramp to the power --rho (1: exponential)"),
    "vp": Schedule(vp, "the continuous VP SDE's levels (beta_d 19.9, beta_min 0.1)"),
    "simple": Schedule(simple, "ComfyUI's simple: every T/n-th level of the noise table"),
    "normal": Schedule(normal, "ComfyUI's normal: evenly spaced in timestep"),
    "sgm_uniform": Schedule(sgm_uniform, "evenly spaced in timestep, last dropped (SGM; flow models' choice)"),
    "ddim_uniform": Schedule(ddim_uniform, "DDIM's uniform timestep stride"),
    "beta": Schedule(beta, "Beta(0.6, 0.6) quantiles in timestep (Lee et al. 2024)"),
    "linear_quadratic": Schedule(linear_quadratic, "linear then quadratic in t (Movie Gen)"),
    "kl_optimal": Schedule(kl_optimal, "evenly spaced in arctan sigma (Sabour et al. 2024)"),
    "ays": Schedule(align_your_steps, "Align Your Steps, NVIDIA's SD1.5/SDXL tables, log-linear to --steps",
                    needs="ays"),
}


def schedule_sigmas(name: str, levels: NoiseLevels, steps: int, rho: float = 7.0,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """`steps` sigmas of one of SCHEDULES on a model's noise levels, then its final level, float32 on `device`."""
    entry = SCHEDULES.get(name)
    if entry is None:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if steps < 1:
        raise ValueError("need at least one step")
    refusal = refuses(name, levels)
    if refusal:
        raise ValueError(refusal)
    return entry.sigmas(levels, steps, rho).to(device=device, dtype=torch.float32)


def refuses(name: str, levels: NoiseLevels) -> str | None:
    """Why a schedule cannot apply to these levels (one line), or None (an unknown name: `schedule_sigmas` says)."""
    needs = SCHEDULES[name].needs if name in SCHEDULES else None
    if needs == "own" and levels.own is None:
        return f"--schedule {name} needs a pipeline's scheduler; this model has none (try karras)"
    if needs == "ays" and levels.ays not in AYS_TABLES:
        return (f"--schedule {name}: Align Your Steps is published for SD1.5 and SDXL ({', '.join(AYS_TABLES)}); "
                "this model has no table (try karras or kl_optimal)")
    return None


def describe() -> str:
    """SCHEDULES with their help lines, for the --schedule help."""
    return registries.describe(SCHEDULES)
