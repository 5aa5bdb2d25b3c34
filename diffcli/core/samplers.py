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

import numpy as np
import torch

from ..shared import registries
from .denoisers import UNCOND_SINK
from ..shared.registries import having
from .schedules import SCHEDULES, NoiseLevels, Schedule, get_sigmas_karras, schedule_sigmas  # noqa: F401
from .schedules import describe as describe_schedules  # noqa: F401

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


# ---------------------------------------------------------------- schedules (core.schedules; each ends in 0)

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
    levels = NoiseLevels.from_alphas_cumprod(alphas_cumprod)
    return get_sigmas_karras(steps, levels.sigma_min, levels.sigma_max, rho, device)


def scheduler_levels(scheduler: Any, ays: str | None = None) -> NoiseLevels:
    """A DDIM/DDPM-style diffusers scheduler's noise levels: its alphas_cumprod table, its own (DDIM) sigmas
    (`get_sigmas_scheduler`) and the Align-Your-Steps table that fits its model (`ays`, None: none)."""
    return NoiseLevels.from_alphas_cumprod(scheduler.alphas_cumprod,
                                           own=lambda n: get_sigmas_scheduler(scheduler, n), ays=ays)


def get_sigmas_pipeline(scheduler: Any, steps: int, schedule: str = "scheduler",
                        device: str | torch.device = "cpu", rho: float = 7.0, ays: str | None = None) -> torch.Tensor:
    """A diffusers scheduler's sigmas under one of SCHEDULES: "scheduler" = its own (DDIM) timesteps
    (`get_sigmas_scheduler`), any other on its noise table (`scheduler_levels`), ending in 0."""
    return schedule_sigmas(schedule, scheduler_levels(scheduler, ays), steps, rho, device)


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


NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def noise_sampler(noise: Noise, x: torch.Tensor, sigmas: torch.Tensor) -> NoiseSampler:
    """The SDE samplers' noise between two levels, from the one `noise=` seam: a source with per-sample seeds
    (`PerSampleRandn`) gives a Brownian tree per sample over the run's sigma range (k-diffusion's with the same
    seeds), so nested steps see one Brownian path; any other source fresh Gaussian noise each call."""
    brownian = getattr(noise, "brownian", None)
    if brownian is not None:
        positive = sigmas[sigmas > 0]
        return brownian(x, positive.min(), sigmas.max())
    return lambda sigma, sigma_next: noise(x)


def _t(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR time of the VE form, t = -log sigma (DPM-Solver's lambda)."""
    return -sigma.log()


def _step_done(callback: Callback, x, i, sigma, denoised, sigma_hat=None) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma if sigma_hat is None else sigma_hat,
                  "denoised": denoised})


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback: Callback = None):
    """DPM-Solver-2 in Karras et al.'s form: an Euler half step to the geometric midpoint of sigma and sigma_next,
    the full step with the midpoint's slope; Euler on the step to 0 (NFE = 2N - 1)."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = _call(model, x, sigma, extra_args)
        x = _dpm_2_step(model, x, sigma, sigmas[i + 1], to_d(x, sigma, denoised), extra_args)
        _step_done(callback, x, i, sigma, denoised)
    return x


def _dpm_2_step(model, x, sigma, sigma_to, d, extra_args):
    """DPM-Solver-2's step from sigma to sigma_to with slope d at x: the midpoint's slope (one more evaluation),
    Euler when sigma_to = 0."""
    if sigma_to == 0:
        return x + d * (sigma_to - sigma)
    sigma_mid = (sigma.log() + sigma_to.log()).div(2).exp()
    x_mid = x + d * (sigma_mid - sigma)
    return x + to_d(x_mid, sigma_mid, _call(model, x_mid, sigma_mid, extra_args)) * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback: Callback = None, eta: float = 1.0,
                           noise: Noise = torch.randn_like):
    """`sample_dpm_2` down to sigma_down, then fresh noise of std sigma_up (`get_ancestral_step`)."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = _call(model, x, sigma, extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigmas[i + 1], eta)
        x = _dpm_2_step(model, x, sigma, sigma_down, to_d(x, sigma, denoised), extra_args)
        if sigma_down != 0:
            x = x + noise(x) * sigma_up
        _step_done(callback, x, i, sigma, denoised)
    return x


def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """Adams-Bashforth weights in sigma over [sigma_i, sigma_(i+1)]: the integrals of the Lagrange basis
    polynomials through sigma_i, sigma_(i-1), ... (order of them), computed exactly as polynomials."""
    nodes = [sigmas[i - k] for k in range(order)]
    weights = []
    for j in range(order):
        poly = np.polynomial.Polynomial([1.0])
        for k in range(order):
            if k != j:
                poly = poly * np.polynomial.Polynomial([-nodes[k], 1.0]) / (nodes[j] - nodes[k])
        integral = poly.integ()
        weights.append(float(integral(sigmas[i + 1]) - integral(sigmas[i])))
    return weights


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback: Callback = None, order: int = 4):
    """Linear multistep (Adams-Bashforth in sigma, variable steps) on the slopes of the last `order` steps."""
    extra_args = extra_args or {}
    levels = sigmas.double().cpu().tolist()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = _call(model, x, sigmas[i], extra_args)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        weights = lms_coefficients(levels, i, min(i + 1, order))
        x = x + sum(w * d for w, d in zip(weights, reversed(ds)))
        _step_done(callback, x, i, sigmas[i], denoised)
    return x


class _DPMSolver:
    """DPM-Solver (Lu et al. 2022, noise prediction) singlestep updates of order 1-3 in t = -log sigma, shared by
    `sample_dpm_fast` and `sample_dpm_adaptive`; counts its network evaluations."""

    def __init__(self, model, extra_args):
        self.model, self.extra_args, self.evals = model, extra_args, 0

    @staticmethod
    def sigma(t):
        return t.neg().exp()

    def eps(self, cache: dict, key: str, x, t):
        if key not in cache:
            sigma = self.sigma(t)
            cache[key] = (x - _call(self.model, x, sigma, self.extra_args)) / sigma
            self.evals += 1
        return cache[key]

    def step(self, order: int, x, t, t_next, cache: dict, r1: float | None = None):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        first = x - self.sigma(t_next) * h.expm1() * eps
        if order == 1:
            return first
        r1 = (1 / 2 if order == 2 else 1 / 3) if r1 is None else r1
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_1 = self.eps(cache, "eps_r1", u1, s1)
        if order == 2:
            return first - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_1 - eps)
        r2 = 2 / 3
        s2 = t + r2 * h
        u2 = (x - self.sigma(s2) * (r2 * h).expm1() * eps
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_1 - eps))
        eps_2 = self.eps(cache, "eps_r2", u2, s2)
        return first - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_2 - eps)


def _ends(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    positive = sigmas[sigmas > 0]
    return positive.min().float(), sigmas.max().float()  # float32 times, as k-diffusion (its error estimate cancels)


@torch.no_grad()
def sample_dpm_fast(model, x, sigmas, extra_args=None, callback: Callback = None):
    """DPM-Solver-fast: spends exactly N = len(sigmas) - 1 evaluations on third-order steps (a last second- or
    first-order one) evenly spaced in t = -log sigma from the schedule's largest sigma to its smallest positive one;
    only the schedule's ends and length enter, and it stops at that smallest sigma (like k-diffusion's)."""
    extra_args = extra_args or {}
    n = len(sigmas) - 1
    sigma_min, sigma_max = _ends(sigmas)
    solver = _DPMSolver(model, extra_args)
    m = n // 3 + 1
    ts = torch.linspace(float(_t(sigma_max)), float(_t(sigma_min)), m + 1)  # float32, as k-diffusion's
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        cache: dict = {}
        t, t_next = ts[i], ts[i + 1]
        eps = solver.eps(cache, "eps", x, t)
        denoised = x - solver.sigma(t).to(x.dtype) * eps
        x = solver.step(order, x, t, t_next, cache)
        _step_done(callback, x, i, solver.sigma(t), denoised)
    return x


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigmas, extra_args=None, callback: Callback = None, order: int = 3,
                        rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, accept_safety: float = 0.81,
                        stats: dict | None = None):
    """DPM-Solver-23 with adaptive steps (Lu et al. 2022): a 2nd- and a 3rd-order step from the same point, their
    difference against atol + rtol |x| sets the next step (an integral controller, k-diffusion's defaults), from
    the schedule's largest sigma to its smallest positive one. The number of evaluations depends on the model and
    the batch: `stats` (a dict) receives it ("nfe", accepted and rejected steps)."""
    extra_args = extra_args or {}
    sigma_min, sigma_max = _ends(sigmas)
    solver = _DPMSolver(model, extra_args)
    t, t_end = _t(sigma_max), _t(sigma_min)
    h = h_init
    x_prev = x
    accepted = rejected = 0
    while t < t_end - 1e-5:
        cache: dict = {}
        t_next = torch.minimum(t_end, t + h)
        eps = solver.eps(cache, "eps", x, t)
        denoised = x - solver.sigma(t).to(x.dtype) * eps
        if order == 2:
            x_low = solver.step(1, x, t, t_next, cache)
            x_high = solver.step(2, x, t, t_next, cache)
        else:
            x_low = solver.step(2, x, t, t_next, cache, r1=1 / 3)
            x_high = solver.step(3, x, t, t_next, cache)
        delta = torch.maximum(torch.tensor(atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        factor = 1 + math.atan((1 / (float(error) + 1e-8)) ** (1 / order) - 1)
        h *= factor
        if factor >= accept_safety:
            x_prev, x, t = x_low, x_high, t_next
            accepted += 1
            _step_done(callback, x, accepted - 1, solver.sigma(t), denoised)
        else:
            rejected += 1
    if stats is not None:
        stats.update(nfe=solver.evals, accepted=accepted, rejected=rejected)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback: Callback = None, eta: float = 1.0,
                              noise: Noise = torch.randn_like):
    """DPM-Solver++(2S) singlestep second-order steps down to sigma_down (midpoint in t), then fresh noise of std
    sigma_up; Euler on the step to 0 (NFE = 2N - 1)."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = _call(model, x, sigma, extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            h = _t(sigma_down) - _t(sigma)
            sigma_s = (_t(sigma) + h / 2).neg().exp()
            x_s = (sigma_s / sigma) * x - torch.expm1(-h / 2) * denoised
            denoised_s = _call(model, x_s, sigma_s, extra_args)
            x = (sigma_down / sigma) * x - torch.expm1(-h) * denoised_s
        if sigmas[i + 1] > 0:
            x = x + noise(x) * sigma_up
        _step_done(callback, x, i, sigma, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback: Callback = None, eta: float = 1.0,
                     noise: Noise = torch.randn_like, r: float = 1 / 2):
    """DPM-Solver++ (stochastic, k-diffusion's): two ancestral DPM-Solver++ half steps (to t + r h, then with the
    two x0 estimates mixed to t + h) on a Brownian path; Euler on the step to 0 (NFE = 2N - 1)."""
    extra_args = extra_args or {}
    brownian = noise_sampler(noise, x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _call(model, x, sigma, extra_args)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
        else:
            t, t_next = _t(sigma), _t(sigma_next)
            h = t_next - t
            sigma_s = (t + h * r).neg().exp()
            sd, su = get_ancestral_step(sigma, sigma_s, eta)
            x_s = (sd / sigma) * x - (t - _t(sd)).expm1() * denoised
            x_s = x_s + brownian(sigma, sigma_s) * su
            denoised_s = _call(model, x_s, sigma_s, extra_args)
            sd, su = get_ancestral_step(sigma, sigma_next, eta)
            fac = 1 / (2 * r)
            mixed = (1 - fac) * denoised + fac * denoised_s
            x = (sd / sigma) * x - (t - _t(sd)).expm1() * mixed
            x = x + brownian(sigma, sigma_next) * su
        _step_done(callback, x, i, sigma, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback: Callback = None, eta: float = 1.0,
                        noise: Noise = torch.randn_like, solver_type: str = "midpoint"):
    """DPM-Solver++(2M) SDE (data prediction, multistep, midpoint correction) on a Brownian path: with h = t_next
    - t the step keeps exp(-eta h) of the path, adds sigma_next sqrt(1 - exp(-2 eta h)) noise; to 0 it is x0_hat."""
    extra_args = extra_args or {}
    brownian = noise_sampler(noise, x, sigmas)
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _call(model, x, sigma, extra_args)
        h = None
        if sigma_next == 0:
            x = denoised.clone()
        else:
            h = _t(sigma_next) - _t(sigma)
            eta_h = eta * h
            x = sigma_next / sigma * (-eta_h).exp() * x - (-h - eta_h).expm1() * denoised
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old)
                else:
                    x = x - 0.5 * (-h - eta_h).expm1() * (1 / r) * (denoised - old)
            if eta:
                x = x + brownian(sigma, sigma_next) * sigma_next * (-2 * eta_h).expm1().neg().sqrt()
        old, h_last = denoised, h
        _step_done(callback, x, i, sigma, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback: Callback = None, eta: float = 1.0,
                        noise: Noise = torch.randn_like):
    """DPM-Solver++(3M) SDE: the exponential integrator's step with x0_hat extrapolated to second order from the
    last three estimates (phi_2, phi_3 in h (1 + eta)), on a Brownian path; to 0 it is x0_hat."""
    extra_args = extra_args or {}
    brownian = noise_sampler(noise, x, sigmas)
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _call(model, x, sigma, extra_args)
        h = None
        if sigma_next == 0:
            x = denoised.clone()
        else:
            h = _t(sigma_next) - _t(sigma)
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x - (-h_eta).expm1() * denoised
            phi_2 = (-h_eta).expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - d_1) / r0
                d1_1 = (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - d_1) / (h_1 / h)
            if eta:
                x = x + brownian(sigma, sigma_next) * sigma_next * (-2 * h * eta).expm1().neg().sqrt()
        d_1, d_2, h_1, h_2 = denoised, d_1, h, h_1
        _step_done(callback, x, i, sigma, denoised)
    return x


def _unipc_coefficients(rks: list[float], h: float, order: int, variant: str):
    """UniPC's (Zhao et al. 2023, data prediction) weights: `rks` the history's (lambda_k - lambda_0) / h with 1
    last; returns (h phi_1, B(h), predictor weights, corrector weights) for the exponential integrator in -h."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rk = torch.tensor(rks, dtype=torch.float64)
    rows, b = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        rows.append(rk ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    big_r, b = torch.stack(rows), torch.tensor(b, dtype=torch.float64)
    if order == 1:
        rhos_p, rhos_c = [], [0.5]
    else:
        rhos_p = [0.5] if order == 2 else torch.linalg.solve(big_r[:-1, :-1], b[:-1]).tolist()
        rhos_c = torch.linalg.solve(big_r, b).tolist()
    return h_phi_1, b_h, rhos_p, rhos_c


@torch.no_grad()
def sample_uni_pc(model, x, sigmas, extra_args=None, callback: Callback = None, order: int = 3,
                  variant: str = "bh1"):
    """UniPC (Zhao et al. 2023): a multistep predictor (UniP) of up to `order` and a corrector (UniC) that reuses
    the next step's evaluation, in t = -log sigma with data prediction (bh1 or bh2 B(h)); lower orders at the start
    and the end; the step to 0 is x0_hat. One evaluation a step."""
    extra_args = extra_args or {}
    n = len(sigmas) - 1
    order = max(1, min(order, n - 1))  # warm-up steps i < order run order i + 1, later ones min(order, n - i)
    lams = _t(sigmas[:-1].double()).tolist() + [math.inf]
    denoised = _call(model, x, sigmas[0], extra_args)
    hist: list[tuple[float, torch.Tensor]] = [(lams[0], denoised)]
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == 0:
            x = denoised.clone()
            _step_done(callback, x, i, sigma, denoised)
            break
        p = i + 1 if i < order else min(order, n - i)
        lam_0, m0 = hist[-1]
        lam_next = float(_t(sigma_next.double()))
        h = lam_next - lam_0
        past = hist[-p:-1][::-1]  # D_(i-1), D_(i-2), ...
        rks = [(lam_k - lam_0) / h for lam_k, _ in past] + [1.0]
        d1s = [(m_k - m0) / r for (_, m_k), r in zip(past, rks)]
        h_phi_1, b_h, rhos_p, rhos_c = _unipc_coefficients(rks, h, p, variant)
        base = (sigma_next / sigma) * x - h_phi_1 * m0
        x_next = base - b_h * sum(rho * d for rho, d in zip(rhos_p, d1s)) if d1s else base
        step_denoised = denoised
        if i + 1 < n:  # the next evaluation, then UniC corrects x_next with it (none after the last step)
            denoised = _call(model, x_next, sigma_next, extra_args)
            corr = sum(rho * d for rho, d in zip(rhos_c[:-1], d1s)) if d1s else 0
            x_next = base - b_h * (corr + rhos_c[-1] * (denoised - m0))
            hist = (hist + [(lam_next, denoised)])[-order:]
        x = x_next
        _step_done(callback, x, i, sigma, step_denoised)
    return x


@torch.no_grad()
def sample_uni_pc_bh2(model, x, sigmas, extra_args=None, callback: Callback = None, order: int = 3):
    """UniPC with B(h) = e^h - 1 (bh2), the variant its authors suggest for guided sampling and few steps."""
    return sample_uni_pc(model, x, sigmas, extra_args, callback, order, "bh2")


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, extra_args=None, callback: Callback = None, eta: float = 0.0,
                         noise: Noise = torch.randn_like):
    """RES multistep (Zhang et al. 2023, ComfyUI's res_multistep): a second-order exponential multistep step in
    t = -log sigma whose x0 estimates are weighted by phi_1 and phi_2 of the step over the previous one; Euler on
    the first step and the step to 0; eta > 0 makes it ancestral (res_multistep_ancestral)."""
    extra_args = extra_args or {}
    old, old_sigma_down = None, None
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = _call(model, x, sigma, extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigmas[i + 1], eta)
        if sigma_down == 0 or old is None:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            h = _t(sigma_down) - _t(sigma)
            c2 = (_t(sigmas[i - 1]) - _t(old_sigma_down)) / h
            phi_1 = torch.expm1(-h) / -h
            phi_2 = (phi_1 - 1) / -h
            b2 = torch.nan_to_num(phi_2 / c2, nan=0.0)
            b1 = torch.nan_to_num(phi_1 - phi_2 / c2, nan=0.0)
            x = torch.exp(-h) * x + h * (b1 * denoised + b2 * old)
        if sigmas[i + 1] > 0 and sigma_up > 0:
            x = x + noise(x) * sigma_up
        old, old_sigma_down = denoised, sigma_down
        _step_done(callback, x, i, sigma, denoised)
    return x


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback: Callback = None, max_order: int = 4):
    """Improved PNDM (Zhang & Chen 2023): Adams-Bashforth on the slopes with fixed (equal-step) weights of order up
    to 4, lower at the start; the step to 0 is x0_hat."""
    extra_args = extra_args or {}
    weights = {1: (1,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _call(model, x, sigma, extra_args)
        ds = ([to_d(x, sigma, denoised)] + ds)[:max_order]
        if sigma_next == 0:
            x = denoised.clone()
        else:
            x = x + (sigma_next - sigma) * sum(w * d for w, d in zip(weights[len(ds)], ds))
        _step_done(callback, x, i, sigma, denoised)
    return x


def _vp_time(sigma: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, eps_s: float = 1e-3):
    """DEIS's time: the VP SDE t whose sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) passes through
    (eps_s, sigma_min) and (1, sigma_max) (EDM's ends, as the reference fixes them)."""
    beta_d = 2 * (math.log(sigma_min ** 2 + 1) / eps_s - math.log(sigma_max ** 2 + 1)) / (eps_s - 1)
    beta_min = math.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    t = ((beta_min ** 2 + 2 * beta_d * (sigma.double() ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    return t, (beta_d, beta_min)


def deis_coefficients(sigmas: torch.Tensor, max_order: int, points: int = 32) -> list[list[float]]:
    """DEIS tAB (Zhang & Chen 2023) weights: for each step, the integrals over [sigma_i, sigma_(i+1)] of the
    Lagrange basis polynomials (in VP time t) through the last `order` steps' times, int L_j(t(sigma)) dsigma, by
    Gauss-Legendre quadrature in sigma (float64)."""
    ts, _ = _vp_time(sigmas)
    ts = ts.tolist()
    nodes, gl_w = np.polynomial.legendre.leggauss(points)
    levels = sigmas.double().cpu().tolist()
    out = []
    for i in range(len(sigmas) - 1):
        order = min(i + 1, max_order)
        if order == 1 or levels[i + 1] <= 0:
            out.append([])
            continue
        a, b = levels[i], levels[i + 1]
        sig = (b - a) / 2 * nodes + (a + b) / 2
        tau = _vp_time(torch.from_numpy(sig))[0].numpy()
        prev = [ts[i - k] for k in range(order)]
        row = []
        for j in range(order):
            basis = np.ones_like(tau)
            for k in range(order):
                if k != j:
                    basis = basis * (tau - prev[k]) / (prev[j] - prev[k])
            row.append(float(np.sum(gl_w * basis) * (b - a) / 2))
        out.append(row)
    return out


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback: Callback = None, max_order: int = 3):
    """DEIS tAB (Zhang & Chen 2023): multistep on the slopes, whose weights integrate their Lagrange polynomial in
    VP time exactly (`deis_coefficients`); Euler on the first step and on the step to 0."""
    extra_args = extra_args or {}
    coeffs = deis_coefficients(sigmas, max_order)
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _call(model, x, sigma, extra_args)
        ds = ([to_d(x, sigma, denoised)] + ds)[:max_order]
        if not coeffs[i]:
            x = x + (sigma_next - sigma) * ds[0]
        else:
            x = x + sum(w * d for w, d in zip(coeffs[i], ds))
        _step_done(callback, x, i, sigma, denoised)
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback: Callback = None, noise: Noise = torch.randn_like):
    """Latent consistency models' multistep sampling: jump to x0_hat, renoise to the next level with fresh noise."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        denoised = _call(model, x, sigmas[i], extra_args)
        x = denoised.clone()
        if sigmas[i + 1] > 0:
            x = x + noise(x) * sigmas[i + 1]
        _step_done(callback, x, i, sigmas[i], denoised)
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
    evals_per_step: int | None = 1  # None: it varies (dpm_adaptive chooses its steps; counted per run)
    evals_last_step: int = 1

    def nfe(self, steps: int) -> int | None:
        """Network evaluations on `steps` steps ending at sigma = 0 (None where the sampler chooses its steps)."""
        if self.evals_per_step is None:
            return None
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
    "dpm_2": Sampler(sample_dpm_2, "DPM-Solver-2 (midpoint in log sigma), Euler on the last step", evals_per_step=2),
    "dpm_2_ancestral": Sampler(sample_dpm_2_ancestral, "DPM-Solver-2 ancestral, eta 1", knobs={"eta": 1.0},
                               noise=True, evals_per_step=2),
    "lms": Sampler(sample_lms, "linear multistep (4th-order Adams-Bashforth in sigma)"),
    "dpm_fast": Sampler(sample_dpm_fast, "DPM-Solver-fast: steps evaluations on 3rd-order steps even in log sigma "
                        "between the schedule's ends, stops at its smallest sigma"),
    "dpm_adaptive": Sampler(sample_dpm_adaptive, "DPM-Solver-23 with adaptive steps between the schedule's ends "
                            "(evaluations vary: counted per run)", evals_per_step=None),
    "dpmpp_2s_ancestral": Sampler(sample_dpmpp_2s_ancestral, "DPM-Solver++(2S) ancestral, eta 1", knobs={"eta": 1.0},
                                  noise=True, evals_per_step=2),
    "dpmpp_sde": Sampler(sample_dpmpp_sde, "DPM-Solver++ SDE (2 evaluations a step), Brownian noise, eta 1",
                         knobs={"eta": 1.0}, noise=True, evals_per_step=2),
    "dpmpp_2m_sde": Sampler(sample_dpmpp_2m_sde, "DPM-Solver++(2M) SDE, Brownian noise, eta 1", knobs={"eta": 1.0},
                            noise=True),
    "dpmpp_3m_sde": Sampler(sample_dpmpp_3m_sde, "DPM-Solver++(3M) SDE, Brownian noise, eta 1", knobs={"eta": 1.0},
                            noise=True),
    "uni_pc": Sampler(sample_uni_pc, "UniPC bh1, 3rd-order predictor-corrector"),
    "uni_pc_bh2": Sampler(sample_uni_pc_bh2, "UniPC bh2 (for few steps and guidance)"),
    "res_multistep": Sampler(sample_res_multistep, "RES 2nd-order exponential multistep; eta > 0 ancestral",
                             knobs={"eta": 0.0}, noise=True),
    "ipndm": Sampler(sample_ipndm, "improved PNDM, 4th-order Adams-Bashforth (equal-step weights)"),
    "deis": Sampler(sample_deis, "DEIS tAB, 3rd-order multistep in VP time"),
    "lcm": Sampler(sample_lcm, "LCM: jump to x0_hat, renoise to the next level", noise=True),
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


def nfe(sampler: str, steps: int) -> int | None:
    """Network evaluations a sampler spends on `steps` steps ending at sigma = 0: its record's evals_per_step a
    step, evals_last_step on the step to 0 (the two-evaluation samplers take an Euler step there); None for
    dpm_adaptive, which picks its own steps (run it with `stats=` to count); a sampler outside SAMPLERS (blurring's
    ancestral) evaluates once a step."""
    entry = SAMPLERS.get(sampler)
    return steps if entry is None else entry.nfe(steps)


def nfe_record(sampler: str, steps: int, passes: int = 1) -> dict[str, Any]:
    """What a run record says of a sampler's cost: network evaluations a sample (`passes` network passes an
    evaluation, e.g. 2 with CFG), null for dpm_adaptive, whose count varies with the model and the batch. (The
    evaluations a step are the sampler's record, SAMPLERS[name].evals_per_step: the config's sampler names it.)"""
    count = nfe(sampler, steps)
    return {"nfe_per_sample": None if count is None else count * passes}


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
