"""Sigma schedules and samplers: pure functions over a denoiser D(x, sigma, **extra_args) -> x0_hat.

Every sampler has the signature (model, x, sigmas, extra_args, callback, ...knobs) and integrates
the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma from sigmas[0] down to sigmas[-1]
(the ancestral ones its SDE). A sampler never knows which model or guidance it runs. `callback` receives a
dict (x, i, sigma, sigma_hat, denoised) after each step; progress bars and strips hang off it. Its "x" is the
very tensor the next step continues from, so a callback that changes it in place (x_t synchronization,
`diffcli.core.sync`) steers the rest of the run; whatever a sampler keeps inside a step or from earlier steps
(Heun's corrector evaluation, DPM-Solver++(2M)'s previous x0 estimate) is its own and is not handed out.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..shared import registries
from .denoisers import UNCOND_SINK
from ..shared.registries import having

Callback = Callable[[dict[str, Any]], None] | None
Noise = Callable[[torch.Tensor], torch.Tensor]

@dataclass
class SamplerKnobs:
    """The knobs of the stochastic samplers, at the commands' defaults (EDM's ImageNet S_* settings); a command's
    config inherits them and hands `knobs()` to `run_sampler`, which gives each sampler only its own."""
    s_churn: float = 40.0
    s_tmin: float = 0.05
    s_tmax: float = 50.0
    s_noise: float = 1.003
    eta: float | None = None  # None: each sampler's own default (its record's knobs: ddim 0, euler_ancestral 1)

    def knobs(self) -> dict[str, float | None]:
        return {"s_churn": self.s_churn, "s_tmin": self.s_tmin, "s_tmax": self.s_tmax, "s_noise": self.s_noise,
                "eta": self.eta}


# ---------------------------------------------------------------- schedules (each ends in 0)

def get_sigmas_karras(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """EDM eq. 5: n noise levels from sigma_max to sigma_min, evenly spaced in sigma^(1/rho), then 0."""
    if n < 1:
        raise ValueError("need at least one step")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=torch.float32)


def get_sigmas_scheduler(scheduler: Any, steps: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The discrete sigmas a diffusers scheduler (DDIM/DDPM-style, alphas_cumprod table) visits.

    The last entry is the scheduler's final level: 0 when `set_alpha_to_one`, else the sigma of
    alphas_cumprod[0] (SD's DDIM stops there), so DDIM through our Euler step matches it exactly.
    """
    scheduler.set_timesteps(steps)
    a = scheduler.alphas_cumprod.double()
    sig = ((1 - a) / a).sqrt()
    timesteps = scheduler.timesteps.long().cpu()
    final_a = float(getattr(scheduler, "final_alpha_cumprod", torch.tensor(1.0)))
    final = math.sqrt((1 - final_a) / final_a)
    return torch.cat([sig[timesteps], torch.tensor([final], dtype=torch.float64)]).to(device=device, dtype=torch.float32)


def get_sigmas_table_karras(alphas_cumprod: torch.Tensor, steps: int, rho: float = 7.0,
                            device: str | torch.device = "cpu") -> torch.Tensor:
    """Karras sigmas (EDM eq. 5) spanning a diffusers noise table: from its largest sigma to its smallest, then 0."""
    a = alphas_cumprod.double()
    table = ((1 - a) / a).sqrt()
    return get_sigmas_karras(steps, float(table.min()), float(table.max()), rho, device)


@dataclass(frozen=True)
class Schedule:
    """One entry of SCHEDULES: how a diffusers scheduler's noise table becomes sigmas, and its help line."""
    sigmas: Callable[..., torch.Tensor]  # (scheduler, steps, rho, device) -> sigmas ending at its final level
    description: str
    pipeline_only: bool = False  # needs a scheduler's own timesteps (diffcli models have none)


# sigmas for a diffusers pipeline: its DDIM timesteps, or Karras over its table
SCHEDULES: dict[str, Schedule] = {
    "scheduler": Schedule(lambda scheduler, steps, rho, device: get_sigmas_scheduler(scheduler, steps, device),
                          "its own timesteps (DDIM's), the default", pipeline_only=True),
    "karras": Schedule(lambda scheduler, steps, rho, device:
                       get_sigmas_table_karras(scheduler.alphas_cumprod, steps, rho, device),
                       "Karras sigmas (exponent --rho) in its sigma range, ending in 0"),
}


def get_sigmas_pipeline(scheduler: Any, steps: int, schedule: str = "scheduler",
                        device: str | torch.device = "cpu", rho: float = 7.0) -> torch.Tensor:
    """A diffusers scheduler's sigmas under one of SCHEDULES: "scheduler" = its own (DDIM) timesteps
    (`get_sigmas_scheduler`), "karras" = Karras over its table, ending in 0 (`get_sigmas_table_karras`)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[schedule].sigmas(scheduler, steps, rho, device)


# ---------------------------------------------------------------- helpers

def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """Split a step to sigma_to into a deterministic part (sigma_down) and fresh noise (sigma_up).

    With eta it is exactly DDIM's eta written in sigma (VE) form.
    """
    if not eta or sigma_to == 0:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2).sqrt())
    sigma_down = (sigma_to ** 2 - sigma_up ** 2).sqrt()
    return sigma_down, sigma_up


def _call(model, x, sigma, extra_args):
    return model(x, sigma * x.new_ones([x.shape[0]]), **extra_args)


# ---------------------------------------------------------------- samplers

@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback: Callback = None):
    """Euler on the ODE; with a diffusers schedule this is deterministic DDIM."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = _call(model, x, sigmas[i], extra_args)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback: Callback = None):
    """EDM Algorithm 1: Heun's 2nd order method, Euler on the step to sigma = 0 (NFE = 2N - 1)."""
    return sample_stochastic_heun(model, x, sigmas, extra_args, callback, s_churn=0.0)


@torch.no_grad()
def sample_stochastic_heun(model, x, sigmas, extra_args=None, callback: Callback = None,
                           s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                           s_noise: float = 1.0, noise: Noise = torch.randn_like):
    """EDM Algorithm 2: raise sigma by gamma (adding fresh noise), then a Heun step back down."""
    extra_args = extra_args or {}
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + noise(x) * s_noise * (sigma_hat ** 2 - sigma ** 2).sqrt()
        denoised = _call(model, x, sigma_hat, extra_args)
        d = to_d(x, sigma_hat, denoised)
        x_next = x + d * (sigma_next - sigma_hat)
        if sigma_next != 0:
            d_next = to_d(x_next, sigma_next, _call(model, x_next, sigma_next, extra_args))
            x_next = x + (d + d_next) / 2 * (sigma_next - sigma_hat)
        x = x_next
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback: Callback = None, eta: float = 0.0,
                noise: Noise = torch.randn_like):
    """DDIM with eta in sigma form: eta = 0 is Euler (deterministic), eta = 1 is ancestral (DDPM-like)."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = _call(model, x, sigmas[i], extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = denoised + sigma_down * to_d(x, sigmas[i], denoised)
        if sigma_up > 0:
            x = x + noise(x) * sigma_up
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback: Callback = None, eta: float = 1.0,
                           s_noise: float = 1.0, noise: Noise = torch.randn_like):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of std s_noise * sigma_up
    (`get_ancestral_step`); none on a step to 0. With s_noise = 1 it is `sample_ddim` at the same eta
    (the same step, written as Euler); eta = 0 is plain Euler."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = _call(model, x, sigma, extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigmas[i + 1], eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + noise(x) * (s_noise * sigma_up)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback: Callback = None):
    """DPM-Solver++(2M) (Lu et al. 2022, data prediction, multistep), one evaluation a step.

    With t = -log(sigma) and h = t_next - t, a step is x_next = (sigma_next / sigma) x - expm1(-h) D, the exact
    solution of the ODE when x0_hat stays D over the step. D is this step's x0_hat on the first step and on a step
    to sigma = 0 (where x_next = x0_hat); otherwise it is extrapolated linearly in t from this step's and the
    previous step's x0_hat: with r = h_prev / h, D = (1 + 1/(2r)) D_i - 1/(2r) D_(i-1).
    """
    extra_args = extra_args or {}
    prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _call(model, x, sigma, extra_args)
        if sigma_next == 0:
            x, h = denoised.clone(), None  # the callback may project x in place: keep `denoised` as evaluated
        else:
            h = sigma.log() - sigma_next.log()
            d = denoised
            if prev is not None and h_prev > 0:  # (a repeated sigma, h_prev = 0, has no slope to extrapolate)
                k = h / (2 * h_prev)  # 1 / (2r)
                d = (1 + k) * denoised - k * prev
            x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        prev, h_prev = denoised, h
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
    return x


# ---------------------------------------------------------------- CFG++ (Chung et al. 2024)

def _takes_keyword(fn, name: str) -> bool:
    """Does `fn` take the keyword `name` (by name or through **kwargs)? Every combinator does; a bare function of
    (x, sigma) does not, and is then its own unconditional model."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or p.name == name for p in params)


def _guided_and_uncond(model, x, sigma, extra_args, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One evaluation: the guided x0_hat and the unconditional one the CFG combinator hands back through
    `denoisers.UNCOND_SINK` (a list it appends D_u to). A denoiser with no CFG combinator appends nothing: it is its
    own unconditional model (D_u = D, and the CFG++ step is the plain one); several D_u (views) are refused."""
    sink: list[torch.Tensor] = []
    reports = _takes_keyword(model, UNCOND_SINK)
    denoised = model(x, sigma * x.new_ones([x.shape[0]]), **extra_args, **({UNCOND_SINK: sink} if reports else {}))
    if len(sink) > 1:
        raise ValueError(f"{name} needs one unconditional x0_hat per evaluation (got {len(sink)})")
    return denoised, sink[0] if sink else denoised


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback: Callback = None):
    """CFG++ Euler (Chung et al. 2024): denoise with the guided x0_hat, renoise along the unconditional direction,
    x_next = D_cfg + sigma_next (x - D_u) / sigma; the guidance scale lives in [0, 1] (the paper's lambda). With
    D_cfg = D_u (scale 0) it is Euler on the unconditional model."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised, uncond = _guided_and_uncond(model, x, sigmas[i], extra_args, "euler_cfg_pp")
        x = denoised + sigmas[i + 1] * to_d(x, sigmas[i], uncond)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback: Callback = None):
    """CFG++ DPM-Solver++(2M): with t = -log(sigma), h = t_next - t, r = h_prev / h, a step is
    x_next = D_cfg + e^(-h) (x - D_u) + (1 - e^(-h)) / (2r) (D_cfg - D_u,prev): the denoised part and the second-
    order correction from the guided x0_hat, the renoising from the unconditional one (the previous step's D_u in
    the correction). First step and the step to sigma = 0: first order (Euler CFG++). With D_cfg = D_u it is
    `sample_dpmpp_2m` on the unconditional model."""
    extra_args = extra_args or {}
    prev_u, h_prev = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = _guided_and_uncond(model, x, sigma, extra_args, "dpmpp_2m_cfg_pp")
        if sigma_next == 0:
            x, h = denoised.clone(), None
        else:
            h = sigma.log() - sigma_next.log()
            x_next = denoised + (sigma_next / sigma) * (x - uncond)
            if prev_u is not None and h_prev > 0:
                x_next = x_next - torch.expm1(-h) * (h / (2 * h_prev)) * (denoised - prev_u)
            x = x_next
        prev_u, h_prev = uncond, h
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
    return x


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Sampler:
    """One entry of SAMPLERS: the function, what a run of it costs, the knobs it reads and its help line.

    `knobs` maps each knob `run_sampler` hands it (by keyword) to the sampler's own default, which is what the knob
    given as None means (eta: ddim 0, euler_ancestral 1). `noise`: it draws fresh noise (takes `noise=`).
    A step costs `evals_per_step` network evaluations, the step to sigma = 0 `evals_last_step` (Heun's is Euler).
    """
    fn: Callable[..., torch.Tensor]
    description: str
    knobs: dict[str, float] = field(default_factory=dict)
    noise: bool = False
    evals_per_step: int = 1
    evals_last_step: int = 1

    def nfe(self, steps: int) -> int:
        """Network evaluations on `steps` steps ending at sigma = 0."""
        return self.evals_per_step * (steps - 1) + self.evals_last_step


_EDM_S = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler(sample_euler, "Euler on the ODE (on a pipeline's own sigmas: DDIM)"),
    "heun": Sampler(sample_heun, "EDM's Heun (2nd order), Euler on the last step", evals_per_step=2),
    "stochastic_heun": Sampler(sample_stochastic_heun, "EDM's stochastic Heun (S_churn, S_tmin, S_tmax, S_noise)",
                               knobs=_EDM_S, noise=True, evals_per_step=2),
    "ddim": Sampler(sample_ddim, "DDIM, eta 0 deterministic (default), 1 ancestral", knobs={"eta": 0.0}, noise=True),
    "euler_ancestral": Sampler(sample_euler_ancestral, "Euler ancestral, eta 1 (default), 0 = Euler",
                               knobs={"eta": 1.0}, noise=True),
    "dpmpp_2m": Sampler(sample_dpmpp_2m, "DPM-Solver++(2M), multistep 2nd order"),
}
# CFG++: the guided x0_hat denoises, the unconditional one renoises (they read D_u from the CFG combinator)
SAMPLERS.update({
    "euler_cfg_pp": Sampler(sample_euler_cfg_pp, "CFG++ Euler (Chung 2024): renoise with the unconditional x0_hat; "
                                                 "CFG scale in [0, 1]"),
    "dpmpp_2m_cfg_pp": Sampler(sample_dpmpp_2m_cfg_pp, "CFG++ DPM-Solver++(2M); CFG scale in [0, 1]"),
})
CFG_PP = ("euler_cfg_pp", "dpmpp_2m_cfg_pp")  # the samplers that need the unconditional x0_hat
# the samplers that take eta, at their own default (what `eta=None` means): DDIM is deterministic unless asked,
# Euler ancestral is ancestral unless asked (eta = 0 makes it plain Euler)
ETA_DEFAULTS = {name: s.knobs["eta"] for name, s in SAMPLERS.items() if "eta" in s.knobs}


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations a sampler spends on `steps` steps ending at sigma = 0 (Heun's last step is Euler;
    every other sampler here, and any outside SAMPLERS such as blurring's ancestral, evaluates once a step)."""
    entry = SAMPLERS.get(sampler)
    return steps if entry is None else entry.nfe(steps)


def run_sampler(name: str, model, x, sigmas, extra_args=None, callback: Callback = None,
                noise: Noise = torch.randn_like, eta: float | None = None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """Dispatch by name, passing each sampler only the knobs it has (its record's `knobs`).

    eta=None gives each eta sampler its own default (ddim 0, euler_ancestral 1); a number is used as given.
    s_noise goes to stochastic_heun only: it is EDM's S_noise (1.003 at the commands' defaults), and
    euler_ancestral runs at s_noise 1 as the method is usually stated (call `sample_euler_ancestral` for others).
    """
    entry = SAMPLERS.get(name)
    if entry is None:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    given = {"eta": eta, "s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    kwargs = {k: default if given[k] is None else given[k] for k, default in entry.knobs.items()}
    if entry.noise:
        kwargs["noise"] = noise
    return entry.fn(model, x, sigmas, extra_args, callback, **kwargs)


def takes(knob: str) -> tuple[str, ...]:
    """The samplers that read a knob, in SAMPLERS' order (help texts: "--eta: ddim, euler_ancestral")."""
    return having(SAMPLERS, lambda s: knob in s.knobs)


def describe() -> str:
    """SAMPLERS with their help lines, for the --sampler help."""
    return registries.describe(SAMPLERS)


def describe_schedules() -> str:
    """SCHEDULES with their help lines, for the --schedule help."""
    return registries.describe(SCHEDULES)
