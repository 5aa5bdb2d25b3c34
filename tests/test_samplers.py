"""Euler ancestral and DPM-Solver++(2M) against independent write-ups of their papers' updates, convergence on an
exact Gaussian denoiser, dispatch / NFE / callback contracts of every sampler, the pipeline schedules, and what x_t
synchronization means for samplers with several evaluations (or a memory) per step."""
from __future__ import annotations

import math

import pytest
import torch

from diffcli.backends import pipelines
from diffcli.shared.devices import PerSampleRandn
from diffcli.core.guidance import classifier_free
from diffcli.core import samplers as S
from diffcli.core.samplers import (ETA_DEFAULTS, SAMPLERS, SCHEDULES, SamplerKnobs, get_sigmas_karras,
                                   get_sigmas_scheduler, nfe, run_sampler, sample_ddim, sample_dpmpp_2m,
                                   sample_euler, sample_euler_ancestral, sample_heun, sample_stochastic_heun)
from diffcli.core.sync import initial_instances, synchronized
from diffcli.core.views import ViewSet, windows

CPU = torch.device("cpu")
F64 = torch.float64


# ---------------------------------------------------------------- exact denoisers

def mixture_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x0 + sigma n = x] for data 0.5 N(+m, s^2 I) + 0.5 N(-m, s^2 I), m = (1, -0.5), s = 0.2 (Tweedie)."""
    m = torch.tensor([1.0, -0.5], dtype=x.dtype)
    s2, var = 0.04, 0.04 + sigma.reshape(-1, 1).to(x.dtype) ** 2
    logit = 2 * (x * m).sum(-1, keepdim=True) / var  # log p(+m | x) - log p(-m | x)
    w_plus = torch.sigmoid(logit)
    mean = lambda mu: mu + s2 / var * (x - mu)
    return w_plus * mean(m) + (1 - w_plus) * mean(-m)


def gaussian_denoiser(mu: float, std: float):
    """Exact D for data ~ N(mu, std^2) per dimension."""
    def D(x, sigma):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return mu + std ** 2 / (std ** 2 + s ** 2) * (x - mu)
    return D


def gaussian_ode_solution(x_start: torch.Tensor, sigma_start: float, mu: float, std: float) -> torch.Tensor:
    """The probability-flow ODE's exact map to sigma = 0 for N(mu, std^2) data: x(sigma) - mu scales with
    sqrt(std^2 + sigma^2)."""
    return mu + std / math.sqrt(std ** 2 + sigma_start ** 2) * (x_start - mu)


# ---------------------------------------------------------------- independent references

def dpmpp_2m_reference(D, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Lu et al. 2022 (DPM-Solver++, Algorithm 2, "2M") in their VP notation: alpha_t = 1/sqrt(1 + s^2),
    sigma_t = s alpha_t, lambda_t = log(alpha_t / sigma_t), data prediction x_theta(x_t, t) = D(x_t / alpha_t, s);
        x_i = sigma_i / sigma_(i-1) x_(i-1) - alpha_i (e^(-h_i) - 1) D_i,   h_i = lambda_i - lambda_(i-1),
        D_i = (1 + 1/(2 r_i)) x_theta,(i-1) - 1/(2 r_i) x_theta,(i-2),   r_i = h_(i-1) / h_i,
    first order (D_i = x_theta) on the first step and on a step to s = 0 (lambda = inf, e^-h = 0)."""
    s = [float(v) for v in sigmas]
    alpha = [1 / math.sqrt(1 + v * v) for v in s]
    sig = [v * a for v, a in zip(s, alpha)]
    lam = [math.log(a / b) if b > 0 else math.inf for a, b in zip(alpha, sig)]
    xt = x * alpha[0]
    prev = None
    for i in range(len(s) - 1):
        x_theta = D(xt / alpha[i], torch.full((x.shape[0],), s[i], dtype=x.dtype))
        h = lam[i + 1] - lam[i]
        if prev is None or s[i + 1] == 0:
            d = x_theta
        else:
            r = (lam[i] - lam[i - 1]) / h
            d = (1 + 1 / (2 * r)) * x_theta - 1 / (2 * r) * prev
        xt = sig[i + 1] / sig[i] * xt - alpha[i + 1] * (math.exp(-h) - 1) * d
        prev = x_theta
    return xt / alpha[-1]


def ddim_eta_reference(D, x: torch.Tensor, sigmas: torch.Tensor, eta: float, s_noise: float, rng) -> torch.Tensor:
    """Song et al. 2021 (DDIM, eq. 12) with alphas_cumprod a = 1/(1 + s^2), in VP form:
        x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_eta^2) eps + s_noise sigma_eta z,
        sigma_eta = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev)
    (the ancestral sampler; fresh noise from `rng` on every step that does not end at 0)."""
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        a_t, a_p = 1 / (1 + s[i] ** 2), 1 / (1 + s[i + 1] ** 2)
        x_vp = x * math.sqrt(a_t)
        x0 = D(x, torch.full((x.shape[0],), s[i], dtype=x.dtype))
        eps = (x_vp - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        sigma_eta = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
        x_vp = math.sqrt(a_p) * x0 + math.sqrt(max(1 - a_p - sigma_eta ** 2, 0.0)) * eps
        if s[i + 1] > 0 and sigma_eta > 0:
            x_vp = x_vp + s_noise * sigma_eta * rng(x)
        x = x_vp / math.sqrt(a_p)
    return x


def start(n: int = 64, sigma_max: float = 20.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64) * sigma_max


# ---------------------------------------------------------------- DPM-Solver++(2M)

@pytest.mark.parametrize("to_zero", [True, False])
@pytest.mark.parametrize("steps", [4, 10])
def test_dpmpp_2m_matches_the_papers_update(steps, to_zero):
    sig = get_sigmas_karras(steps, 0.01, 20.0).double()
    sig = sig if to_zero else sig[:-1]  # SD's DDIM-style schedules end above 0: there the last step is 2nd order
    x = start()
    ours = sample_dpmpp_2m(mixture_denoiser, x, sig)
    ref = dpmpp_2m_reference(mixture_denoiser, x, sig)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # the second-order term matters here: the first-order method (DPM-Solver++(1) = DDIM = Euler) lands elsewhere
    assert (sample_euler(mixture_denoiser, x, sig) - ref).abs().max() > 1e-2


def test_dpmpp_2m_ends_on_the_denoiser_output():
    """A step to sigma = 0 is x_next = D(x_i): the last evaluation's x0_hat, not an extrapolation."""
    seen = []
    sig = get_sigmas_karras(5, 0.01, 20.0).double()
    out = sample_dpmpp_2m(mixture_denoiser, start(), sig, callback=seen.append)
    assert torch.equal(out, seen[-1]["denoised"])


def test_dpmpp_2m_one_step_is_the_denoiser():
    x = start(8)
    sig = torch.tensor([20.0, 0.0], dtype=F64)
    torch.testing.assert_close(sample_dpmpp_2m(mixture_denoiser, x, sig), mixture_denoiser(x, sig[:1].expand(8)))


def test_matches_k_diffusion(k_sampling):
    """Cross-check with k-diffusion's implementation (every other sampler: tests/test_sampler_references.py)."""
    ks = k_sampling
    sig = get_sigmas_karras(10, 0.01, 20.0).double()
    x = start()
    torch.testing.assert_close(sample_dpmpp_2m(mixture_denoiser, x, sig),
                               ks.sample_dpmpp_2m(mixture_denoiser, x.clone(), sig, disable=True), atol=1e-5, rtol=0)
    ours = sample_euler_ancestral(mixture_denoiser, x, sig, eta=0.7, s_noise=1.1, noise=PerSampleRandn(range(64)))
    rng = PerSampleRandn(range(64))
    theirs = ks.sample_euler_ancestral(mixture_denoiser, x.clone(), sig, disable=True, eta=0.7, s_noise=1.1,
                                       noise_sampler=lambda s, s_next: rng(x))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- Euler ancestral

@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 1.0), (1.0, 1.3)])
def test_euler_ancestral_matches_ddim_eta_in_vp_form(eta, s_noise):
    sig = get_sigmas_karras(8, 0.01, 20.0).double()
    x = start()
    ours = sample_euler_ancestral(mixture_denoiser, x, sig, eta=eta, s_noise=s_noise, noise=PerSampleRandn(range(64)))
    ref = ddim_eta_reference(mixture_denoiser, x, sig, eta, s_noise, PerSampleRandn(range(64)))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_euler_ancestral_eta_zero_is_euler_and_noise_is_per_sample():
    sig = get_sigmas_karras(8, 0.01, 20.0).double()
    x = start(6)
    torch.testing.assert_close(sample_euler_ancestral(mixture_denoiser, x, sig, eta=0.0), sample_euler(mixture_denoiser, x, sig))
    # sample i depends on its own seed only, not on the batch it is drawn in
    both = sample_euler_ancestral(mixture_denoiser, x, sig, noise=PerSampleRandn([10, 11, 12, 13, 14, 15]))
    part = sample_euler_ancestral(mixture_denoiser, x[2:4], sig, noise=PerSampleRandn([12, 13]))
    torch.testing.assert_close(both[2:4], part)


def test_euler_ancestral_samples_the_gaussian_target():
    torch.manual_seed(0)
    mu, std = 0.7, 0.4
    out = sample_euler_ancestral(gaussian_denoiser(mu, std), torch.randn(20000, 1) * 80, get_sigmas_karras(200))
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    assert out.std().item() == pytest.approx(std, rel=0.05)


# ---------------------------------------------------------------- convergence

def test_dpmpp_2m_converges_at_second_order_and_beats_euler():
    """Against the exact ODE map of N(mu, std^2) data, Karras schedules (rho 7), equal NFE. The map is linear, so
    every sample's error is the same fraction of its distance from mu; with std = 0.5 the ODE turns between
    sigma ~2 and ~0.2 in 3 steps at NFE 10, which keeps DPM++(2M) there at ~0.6x Euler's error (measured: 0.59x
    at 10 steps, 0.50x at 15, 0.15x at 40); halving the steps divides its error by ~4, Euler's by ~2."""
    mu, std, sigma_max = 0.3, 0.5, 80.0
    D = gaussian_denoiser(mu, std)
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(1), dtype=F64) * sigma_max
    exact = gaussian_ode_solution(x, sigma_max, mu, std)

    def err(name: str, steps: int) -> float:
        return (run_sampler(name, D, x, get_sigmas_karras(steps, 0.002, sigma_max).double()) - exact).abs().max().item()

    for steps in (10, 12, 15):
        assert nfe("euler", steps) == nfe("dpmpp_2m", steps) == steps
        assert err("dpmpp_2m", steps) < 0.65 * err("euler", steps)
    assert err("dpmpp_2m", 15) / err("dpmpp_2m", 30) > 3.5
    assert 1.8 < err("euler", 15) / err("euler", 30) < 2.2
    assert err("dpmpp_2m", 40) < err("euler", 40) / 5


# ---------------------------------------------------------------- every sampler: dispatch, NFE, callback contract

class Recorder:
    """Counts calls and keeps each call's input."""

    def __init__(self, fn):
        self.fn, self.inputs = fn, []

    def __call__(self, x, sigma):  # a plain denoiser of (x, sigma): to a CFG++ sampler, its own unconditional model
        self.inputs.append(x.clone())
        return self.fn(x, sigma)


STOCH = {"s_churn": 30.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
DIRECT = {  # what run_sampler(name, ..., eta=None, **STOCH) must run
    "euler": lambda m, x, sig, rng: sample_euler(m, x, sig),
    "heun": lambda m, x, sig, rng: sample_heun(m, x, sig),
    "stochastic_heun": lambda m, x, sig, rng: sample_stochastic_heun(m, x, sig, None, None, **STOCH, noise=rng),
    "ddim": lambda m, x, sig, rng: sample_ddim(m, x, sig, eta=0.0, noise=rng),
    "euler_ancestral": lambda m, x, sig, rng: sample_euler_ancestral(m, x, sig, eta=1.0, s_noise=1.0, noise=rng),
    "dpmpp_2m": lambda m, x, sig, rng: sample_dpmpp_2m(m, x, sig),
    "dpm_2": lambda m, x, sig, rng: S.sample_dpm_2(m, x, sig),
    "dpm_2_ancestral": lambda m, x, sig, rng: S.sample_dpm_2_ancestral(m, x, sig, eta=1.0, noise=rng),
    "lms": lambda m, x, sig, rng: S.sample_lms(m, x, sig, order=4),
    "dpm_fast": lambda m, x, sig, rng: S.sample_dpm_fast(m, x, sig),
    "dpm_adaptive": lambda m, x, sig, rng: S.sample_dpm_adaptive(m, x, sig),
    "dpmpp_2s_ancestral": lambda m, x, sig, rng: S.sample_dpmpp_2s_ancestral(m, x, sig, eta=1.0, noise=rng),
    "dpmpp_sde": lambda m, x, sig, rng: S.sample_dpmpp_sde(m, x, sig, eta=1.0, noise=rng),
    "dpmpp_2m_sde": lambda m, x, sig, rng: S.sample_dpmpp_2m_sde(m, x, sig, eta=1.0, noise=rng),
    "dpmpp_3m_sde": lambda m, x, sig, rng: S.sample_dpmpp_3m_sde(m, x, sig, eta=1.0, noise=rng),
    "uni_pc": lambda m, x, sig, rng: S.sample_uni_pc(m, x, sig, variant="bh1"),
    "uni_pc_bh2": lambda m, x, sig, rng: S.sample_uni_pc(m, x, sig, variant="bh2"),
    "res_multistep": lambda m, x, sig, rng: S.sample_res_multistep(m, x, sig, eta=0.0),
    "ipndm": lambda m, x, sig, rng: S.sample_ipndm(m, x, sig),
    "deis": lambda m, x, sig, rng: S.sample_deis(m, x, sig),
    "lcm": lambda m, x, sig, rng: S.sample_lcm(m, x, sig, noise=rng),
    # CFG++ on a denoiser without a CFG step: its own unconditional model (tests/test_guidance_rules.py: with CFG)
    "euler_cfg_pp": lambda m, x, sig, rng: S.sample_euler_cfg_pp(m, x, sig),
    "dpmpp_2m_cfg_pp": lambda m, x, sig, rng: S.sample_dpmpp_2m_cfg_pp(m, x, sig),
}


def test_every_sampler_is_covered():
    assert set(DIRECT) == set(SAMPLERS)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_dispatch_and_network_evaluations(name, steps):
    sig = get_sigmas_karras(steps, 0.01, 20.0).double()
    model = Recorder(mixture_denoiser)
    x = start(8)
    out = run_sampler(name, model, x, sig, noise=PerSampleRandn(range(8)), eta=None, **STOCH)
    if nfe(name, steps) is None:  # dpm_adaptive picks its steps: it counts them itself
        stats: dict = {}
        S.sample_dpm_adaptive(mixture_denoiser, x, sig, stats=stats)
        assert len(model.inputs) == stats["nfe"]
    else:
        assert len(model.inputs) == nfe(name, steps)
    torch.testing.assert_close(out, DIRECT[name](mixture_denoiser, x, sig, PerSampleRandn(range(8))), atol=0, rtol=0)


def test_eta_none_is_each_samplers_default():
    """The commands hand SamplerKnobs().knobs() (eta None) to run_sampler: ddim stays deterministic (as before),
    euler_ancestral is ancestral; an explicit eta is used as given; S_noise is stochastic_heun's alone."""
    assert SamplerKnobs().eta is None and ETA_DEFAULTS == {
        "ddim": 0.0, "euler_ancestral": 1.0, "dpm_2_ancestral": 1.0, "dpmpp_2s_ancestral": 1.0, "dpmpp_sde": 1.0,
        "dpmpp_2m_sde": 1.0, "dpmpp_3m_sde": 1.0, "res_multistep": 0.0}
    sig = get_sigmas_karras(6, 0.01, 20.0).double()
    x = start(8)
    knobs = SamplerKnobs().knobs()
    euler = sample_euler(mixture_denoiser, x, sig)
    torch.testing.assert_close(run_sampler("ddim", mixture_denoiser, x, sig, **knobs), euler)
    torch.testing.assert_close(run_sampler("ddim", mixture_denoiser, x, sig, eta=0.0), euler)
    torch.testing.assert_close(run_sampler("euler_ancestral", mixture_denoiser, x, sig, eta=0.0), euler)
    ancestral = run_sampler("euler_ancestral", mixture_denoiser, x, sig, noise=PerSampleRandn(range(8)), **knobs)
    torch.testing.assert_close(ancestral, sample_euler_ancestral(mixture_denoiser, x, sig, eta=1.0, s_noise=1.0,
                                                                 noise=PerSampleRandn(range(8))), atol=0, rtol=0)
    half = run_sampler("ddim", mixture_denoiser, x, sig, noise=PerSampleRandn(range(8)), eta=0.5)
    torch.testing.assert_close(half, sample_ddim(mixture_denoiser, x, sig, eta=0.5, noise=PerSampleRandn(range(8))))


def test_unknown_sampler_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown sampler 'dpm2'; choose one of .*dpmpp_2m"):
        run_sampler("dpm2", mixture_denoiser, start(2), get_sigmas_karras(3))


@pytest.mark.parametrize("name", SAMPLERS)
def test_callback_x_is_the_state_the_sampler_continues_from(name):
    """Zeroing info["x"] in place after step 0 makes step 1 start from zeros; after the last step, the result is 0.
    UniPC is the exception of the first part: its next evaluation (at the predictor) comes before its corrector and
    the callback, so zeroing x steers the state it continues from but not that evaluation."""
    sig = get_sigmas_karras(5, 0.01, 20.0).double()
    x = start(8)
    calls: list[int] = []
    plain = run_sampler(name, mixture_denoiser, x, sig, noise=PerSampleRandn(range(8)),
                        callback=lambda info: calls.append(info["i"]))
    model = Recorder(mixture_denoiser)
    zeroed = run_sampler(name, model, x, sig, noise=PerSampleRandn(range(8)),
                         callback=lambda info: info["x"].zero_() if info["i"] == 0 else None)
    # evaluations in step 0 (s_churn 0: no noise added before step 1's first)
    first_of_step_1 = {"heun": 2, "stochastic_heun": 2, "dpm_2": 2, "dpm_2_ancestral": 2, "dpmpp_2s_ancestral": 2,
                       "dpmpp_sde": 2, "dpm_fast": 3, "dpm_adaptive": 3}.get(name, 1)
    if not name.startswith("uni_pc"):
        assert torch.equal(model.inputs[first_of_step_1], torch.zeros_like(x))
    assert (zeroed - plain).abs().max() > 1e-3
    last = run_sampler(name, mixture_denoiser, x, sig, noise=PerSampleRandn(range(8)),
                       callback=lambda info: info["x"].zero_() if info["i"] == calls[-1] else None)
    assert torch.equal(last, torch.zeros_like(x))


# ---------------------------------------------------------------- pipeline schedules

def test_pipeline_schedules(tiny_sd):
    from diffusers import DDIMScheduler
    pipe = pipelines.load_pipeline(str(tiny_sd), CPU, torch.float32)
    a = pipe.scheduler.alphas_cumprod.double()
    table = ((1 - a) / a).sqrt()
    assert tuple(SCHEDULES)[:2] == ("scheduler", "karras")
    k = pipelines.sigmas(pipe, 7, CPU, schedule="karras")
    assert len(k) == 8 and k[-1].item() == 0.0 and bool((k[1:] < k[:-1]).all())
    assert k[0].item() == pytest.approx(table.max().item(), rel=1e-6)
    assert k[-2].item() == pytest.approx(table.min().item(), rel=1e-5)
    mid = ((table.max() ** (1 / 7) + table.min() ** (1 / 7)) / 2) ** 7  # rho 7: the middle of 7 levels
    assert k[3].item() == pytest.approx(mid.item(), rel=1e-5)
    # "scheduler" (the default) is the DDIM timesteps exactly as before
    old = get_sigmas_scheduler(DDIMScheduler.from_config(pipe.scheduler.config), 6, CPU)
    assert torch.equal(pipelines.sigmas(pipe, 6, CPU), old)
    assert torch.equal(pipelines.sigmas(pipe, 6, CPU, schedule="scheduler"), old)
    with pytest.raises(ValueError, match="unknown schedule 'linear'; choose one of scheduler, karras, exponential"):
        pipelines.sigmas(pipe, 6, CPU, schedule="linear")
    # a run on the Karras schedule through the pipeline's denoiser: off-table sigmas, ending at sigma = 0
    cond, uncond = pipelines.encode_prompts(pipe, ["a cat"], None, 16, 16, CPU)
    model = classifier_free(pipelines.denoiser(pipe), 3.0, cond, uncond)
    x = pipelines.initial_latents(PerSampleRandn([3]), pipelines.latent_shape(pipe, 16, 16), k[0])
    z = run_sampler("dpmpp_2m", model, x, k)
    assert torch.isfinite(z).all()
    assert pipelines.decode(pipe, z, k[-1]).shape == (1, 3, 16, 16)


# ---------------------------------------------------------------- x_t synchronization and multi-evaluation steps

S_PIX, TAU = 0.5, 1.0


def window_mean_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact D for instances x0 = c 1 + e (c ~ N(0, TAU^2) per instance, e ~ N(0, S_PIX^2 I)): the instance mean
    and the rest shrink differently, so overlapping windows disagree on what they share."""
    s2 = sigma.reshape(-1, 1, 1, 1).to(x.dtype) ** 2
    n = x[0].numel()
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return S_PIX ** 2 / (S_PIX ** 2 + s2) * (x - m) + (S_PIX ** 2 + n * TAU ** 2) / (S_PIX ** 2 + n * TAU ** 2 + s2) * m


def pixel_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-pixel (local) exact D: agreeing instances stay agreeing, also inside a step."""
    return gaussian_denoiser(0.2, S_PIX)(x, sigma)


VIEWS = ViewSet(windows(4, 10, (4, 4), 3), (1, 4, 10))  # three 4x4 windows of a 4x10 canvas, overlapping by 1


def run_synced(name: str, D, case: str, noise: str) -> torch.Tensor:
    sig = get_sigmas_karras(8, 0.01, 20.0).double()
    g = torch.Generator().manual_seed(0)
    w = initial_instances(VIEWS, lambda shape: torch.randn(shape, generator=g, dtype=F64) * sig[0], (1, 4, 4), noise)
    model, hook = synchronized(D, VIEWS, case)
    return run_sampler(name, model, w, sig, callback=hook)


@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp_2m"])
def test_xt_equals_x0_for_one_evaluation_samplers(name):
    """Canvas noise: a step linear in (x, x0_hats) with scalar coefficients commutes with F A, so projecting the
    states (xt) or the x0_hats (x0) is one map -- for DPM++(2M) too, although it remembers each instance's own
    unprojected D_(i-1): it enters linearly, so projecting it later is projecting it then."""
    out = {case: run_synced(name, window_mean_denoiser, case, "canvas") for case in ("x0", "eps", "xt", "none")}
    torch.testing.assert_close(out["xt"], out["x0"], atol=1e-9, rtol=0)
    torch.testing.assert_close(out["eps"], out["x0"], atol=1e-9, rtol=0)
    assert (out["none"] - out["x0"]).abs().max() > 1e-2  # the denoiser does make the windows disagree


def heun_projecting_the_predictor(D, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Heun with the instances projected after the Euler predictor as well as after the step."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - D(x, s.expand(len(x)))) / s
        x_pred = x + d * (s_next - s)
        if s_next > 0:
            x_pred = VIEWS.project(x_pred)
            d_next = (x_pred - D(x_pred, s_next.expand(len(x)))) / s_next
            x_pred = x + (d + d_next) / 2 * (s_next - s)
        x = VIEWS.project(x_pred)
    return x


def test_xt_heun_differs_from_x0_only_by_its_unsynchronized_corrector():
    """x_t sync makes the states agree after each completed step, not inside it: Heun's corrector evaluates each
    instance's own Euler predictor. With a denoiser that makes windows disagree, xt therefore parts from x0 (which
    the predictor projected would reproduce); with a per-pixel denoiser nothing inside a step disagrees and they
    are one map again."""
    x0 = run_synced("heun", window_mean_denoiser, "x0", "canvas")
    xt = run_synced("heun", window_mean_denoiser, "xt", "canvas")
    none = run_synced("heun", window_mean_denoiser, "none", "canvas")
    assert 1e-4 < (xt - x0).abs().max() < (none - x0).abs().max() / 3
    sig = get_sigmas_karras(8, 0.01, 20.0).double()
    g = torch.Generator().manual_seed(0)
    w = initial_instances(VIEWS, lambda shape: torch.randn(shape, generator=g, dtype=F64) * sig[0], (1, 4, 4))
    torch.testing.assert_close(heun_projecting_the_predictor(window_mean_denoiser, w, sig), x0, atol=1e-9, rtol=0)
    for name in ("heun", "dpmpp_2m"):
        local = {case: run_synced(name, pixel_denoiser, case, "canvas") for case in ("x0", "xt")}
        torch.testing.assert_close(local["xt"], local["x0"], atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m"])
def test_xt_and_x0_part_ways_from_per_view_noise(name):
    out = {case: run_synced(name, window_mean_denoiser, case, "views") for case in ("x0", "xt", "none")}
    assert (out["xt"] - out["x0"]).abs().max() > 1e-2
    assert (out["none"] - out["x0"]).abs().max() > 1e-2
