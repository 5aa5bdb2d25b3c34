"""Every sampler and schedule against an independent reference.

- k-diffusion's own functions (tests/conftest.py `k_sampling`) on the same model, sigmas and noise: in float64 on
  an exact Gaussian denoiser (data ~ N(mu, s^2), D known in closed form), where only the formula can differ, and
  in float32 on a two-Gaussian mixture, where rounding enters (1e-5).
- SDE samplers on per-sample Brownian trees: equal to k-diffusion's BrownianTreeNoiseSampler with the same seed
  list, and a sample does not depend on its batch.
- Convergence: every ODE sampler approaches the Gaussian's exact probability-flow solution as steps grow.
- diffusers' UniPCMultistepScheduler and DPMSolverMultistepScheduler on a tiny SD, stepped by their own loop.
- ComfyUI's schedules, their formulas written out here from its definitions, and the published AYS tables.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffcli.backends import pipelines
from diffcli.core.samplers import SAMPLERS, get_sigmas_karras, nfe, run_sampler, sample_dpm_adaptive
from diffcli.core.schedules import AYS_TABLES, SCHEDULES, NoiseLevels, schedule_sigmas
from diffcli.shared.devices import PerSampleRandn

F64 = torch.float64
MU, STD = 0.3, 0.5


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x] for x0 ~ N(MU, STD^2) per element."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return MU + STD ** 2 / (STD ** 2 + s ** 2) * (x - MU)


def mixture_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for x0 ~ 0.5 N(+0.6, 0.2^2) + 0.5 N(-0.6, 0.2^2) per element: curved ODE paths."""
    s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype) ** 2
    var = 0.04 + s2
    w = torch.sigmoid(2 * 0.6 * x / var)
    mean = lambda m: m + 0.04 / var * (x - m)  # noqa: E731
    return w * mean(0.6) + (1 - w) * mean(-0.6)


def start(n: int, dtype=F64, sigma_max: float = 80.0) -> torch.Tensor:
    return PerSampleRandn(range(n)).randn((2, 4, 4), dtype) * sigma_max


class Sequence:
    """The same stream of fresh noise for both implementations (ancestral steps draw in the same order)."""

    def __init__(self, seed: int = 5):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.g, dtype=like.dtype)


# ours -> k-diffusion's function and keyword arguments at our defaults
ODE = {"dpm_2": "sample_dpm_2", "lms": "sample_lms", "dpmpp_2m": "sample_dpmpp_2m", "heun": "sample_heun",
       "euler": "sample_euler"}
ANCESTRAL = {"euler_ancestral": "sample_euler_ancestral", "dpm_2_ancestral": "sample_dpm_2_ancestral",
             "dpmpp_2s_ancestral": "sample_dpmpp_2s_ancestral"}
BROWNIAN = {"dpmpp_sde": "sample_dpmpp_sde", "dpmpp_2m_sde": "sample_dpmpp_2m_sde",
            "dpmpp_3m_sde": "sample_dpmpp_3m_sde"}
CASES = [(gaussian_denoiser, F64, 1e-12), (mixture_denoiser, torch.float32, 1e-5)]


@pytest.mark.parametrize("D,dtype,tol", CASES)
@pytest.mark.parametrize("name", list(ODE))
def test_ode_samplers_equal_k_diffusion(k_sampling, name, D, dtype, tol):
    sig = get_sigmas_karras(9, 0.002, 80.0).to(dtype)
    x = start(3, dtype)
    ours = run_sampler(name, D, x, sig)
    theirs = getattr(k_sampling, ODE[name])(D, x.clone(), sig, disable=True)
    torch.testing.assert_close(ours, theirs, atol=tol * 80, rtol=tol)


@pytest.mark.parametrize("D,dtype,tol", CASES)
@pytest.mark.parametrize("name", list(ANCESTRAL))
def test_ancestral_samplers_equal_k_diffusion(k_sampling, name, D, dtype, tol):
    sig = get_sigmas_karras(8, 0.002, 80.0).to(dtype)
    x = start(3, dtype)
    ours = run_sampler(name, D, x, sig, noise=Sequence(), eta=0.8)
    noise = Sequence()
    theirs = getattr(k_sampling, ANCESTRAL[name])(D, x.clone(), sig, disable=True, eta=0.8,
                                                  noise_sampler=lambda s, s_next: noise(x))
    torch.testing.assert_close(ours, theirs, atol=tol * 80, rtol=tol)


@pytest.mark.filterwarnings("ignore:Should have ta>=t0")  # float32 exp(log sigma_min) a hair below the tree's start
@pytest.mark.parametrize("D,dtype,tol", CASES)
@pytest.mark.parametrize("name", list(BROWNIAN))
def test_sde_samplers_equal_k_diffusion_on_the_same_brownian_trees(k_sampling, name, D, dtype, tol):
    sig = get_sigmas_karras(8, 0.002, 80.0).to(dtype)
    x = start(3, dtype)
    seeds = [200, 201, 202]
    ours = run_sampler(name, D, x, sig, noise=PerSampleRandn(seeds))
    trees = k_sampling.BrownianTreeNoiseSampler(x, sig[sig > 0].min(), sig.max(), seed=seeds)
    theirs = getattr(k_sampling, BROWNIAN[name])(D, x.clone(), sig, disable=True, noise_sampler=trees)
    torch.testing.assert_close(ours, theirs, atol=tol * 80, rtol=tol)
    # sample 1 alone, from its own seed, is the same sample (to the bit: trees are per sample)
    alone = run_sampler(name, D, x[1:2], sig, noise=PerSampleRandn(seeds[1:2]))
    assert torch.equal(alone, ours[1:2])
    # and the noise is real: another seed gives another sample
    assert not torch.allclose(run_sampler(name, D, x[1:2], sig, noise=PerSampleRandn([7])), alone)


@pytest.mark.parametrize("D,dtype", [(gaussian_denoiser, F64), (mixture_denoiser, torch.float32)])
def test_dpm_fast_and_adaptive_equal_k_diffusion(k_sampling, D, dtype):
    sig = get_sigmas_karras(10, 0.002, 80.0).to(dtype)
    x = start(3, dtype)
    lo, hi = float(sig[-2]), float(sig[0])
    torch.testing.assert_close(run_sampler("dpm_fast", D, x, sig),
                               k_sampling.sample_dpm_fast(D, x.clone(), lo, hi, 10, disable=True), atol=1e-4, rtol=1e-5)
    stats: dict = {}
    ours = sample_dpm_adaptive(D, x, sig, stats=stats)
    theirs, info = k_sampling.sample_dpm_adaptive(D, x.clone(), lo, hi, disable=True, return_info=True)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    assert stats["nfe"] == info["nfe"] and stats["accepted"] == info["n_accept"]
    assert nfe("dpm_adaptive", 10) is None and nfe("dpm_fast", 10) == 10


def test_brownian_noise_is_one_path():
    """W(b) - W(a) over two halves adds up to the whole: (s1 - s0)^1/2 n01 + ... = (s2 - s0)^1/2 n02."""
    x = torch.zeros(2, 3, dtype=F64)
    w = PerSampleRandn([1, 2]).brownian(x, torch.tensor(0.1, dtype=F64), torch.tensor(10.0, dtype=F64))
    a, b, c = (torch.tensor(v, dtype=F64) for v in (8.0, 3.0, 0.5))
    whole = w(a, c) * (a - c).sqrt()
    torch.testing.assert_close(w(a, b) * (a - b).sqrt() + w(b, c) * (b - c).sqrt(), whole)


# ---------------------------------------------------------------- convergence to the exact solution

def exact_solution(x: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """The probability-flow ODE's exact map from sigma_max to 0 for N(MU, STD^2) data."""
    return MU + STD / math.sqrt(STD ** 2 + sigma_max ** 2) * (x - MU)


ODE_NAMES = [n for n in SAMPLERS if n not in ("lcm", "dpm_adaptive")]
FIRST_ORDER = ("euler", "ddim", "euler_ancestral", "euler_cfg_pp")


@pytest.mark.parametrize("name", ODE_NAMES)
def test_every_ode_sampler_converges_to_the_exact_solution(name):
    """With eta 0 (ancestral and SDE samplers become ODE ones) the error to the exact solution shrinks from 10 to
    40 Karras steps as the method's order says (first order: over 3x, to below 0.15; the others over 8x, to below
    0.03; x starts at scale 80)."""
    x = start(4)
    want = exact_solution(x, 80.0)
    errors = []
    for steps in (10, 40):
        sig = get_sigmas_karras(steps, 0.002, 80.0).double()
        out = run_sampler(name, gaussian_denoiser, x, sig, eta=0.0, s_churn=0.0, noise=PerSampleRandn(range(4)))
        errors.append(float((out - want).abs().max()))
    ratio, bound = (3, 0.15) if name in FIRST_ORDER else (8, 0.03)
    assert errors[1] < errors[0] / ratio and errors[1] < bound, errors


def test_dpm_adaptive_meets_its_tolerance():
    x = start(4)
    out = sample_dpm_adaptive(gaussian_denoiser, x, get_sigmas_karras(10, 0.002, 80.0).double(), rtol=1e-4,
                              atol=1e-5)
    assert float((out - exact_solution(x, 80.0)).abs().max()) < 0.01


def test_lcm_jumps_to_x0_and_renoises():
    """LCM's step, written out: x0_hat, plus sigma_next times fresh noise (none after the last); it is a consistency
    model's sampler, so with an exact denoiser it collapses the variance (x0_hat is a mean): no quality claim."""
    sig = get_sigmas_karras(4, 0.002, 80.0).double()
    x = start(3)
    out = run_sampler("lcm", gaussian_denoiser, x, sig, noise=Sequence())
    noise, want = Sequence(), x
    for i in range(4):
        want = gaussian_denoiser(want, sig[i:i + 1].expand(3))
        if sig[i + 1] > 0:
            want = want + noise(want) * sig[i + 1]
    torch.testing.assert_close(out, want, atol=0, rtol=0)


# ---------------------------------------------------------------- diffusers on a tiny SD

def diffusers_loop(pipe, scheduler, cond, latents):
    for t in scheduler.timesteps:
        eps = pipe.unet(scheduler.scale_model_input(latents, t), t, **cond, return_dict=False)[0]
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]
    return latents


def ours_on(pipe, scheduler, cond, latents, name):
    """Our sampler on the scheduler's own sigmas, VE state = VP latents * sqrt(1 + sigma^2) (both ways)."""
    sig = torch.as_tensor(scheduler.sigmas, dtype=torch.float32)
    x = latents * (1 + sig[0] ** 2).sqrt()
    model = pipelines.denoiser(pipe)
    return run_sampler(name, lambda x, s: model(x, s, **cond), x, sig) / (1 + sig[-1] ** 2).sqrt()


@pytest.mark.parametrize("kind,name,config", [
    ("DPMSolverMultistepScheduler", "dpmpp_2m",
     {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"}),
    # bh1 ends at the table's smallest sigma: diffusers' bh1 step to sigma 0 is NaN (B(h) = -h is infinite there)
    ("UniPCMultistepScheduler", "uni_pc", {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", "uni_pc_bh2", {"solver_order": 3, "solver_type": "bh2", "final_sigmas_type": "zero"}),
])
def test_multistep_solvers_equal_diffusers_on_a_tiny_sd(tiny_sd, kind, name, config):
    """On the scheduler's own (integer) timesteps our sampler through the denoiser equals diffusers' loop to float
    rounding: the sigmas are the table's, so our fractional timestep is the integer one. (With Karras sigmas
    diffusers rounds each timestep to an integer while keeping the unrounded sigma, so the UNet sees a slightly
    different level than ours; see docs/sample.md.)"""
    import diffusers

    pipe = pipelines.load_pipeline(str(tiny_sd), torch.device("cpu"), torch.float32)
    scheduler = getattr(diffusers, kind).from_config(pipe.scheduler.config, **config)
    scheduler.set_timesteps(8)
    cond, _ = pipelines.encode_prompts(pipe, ["a cat"], None, 16, 16, torch.device("cpu"))
    latents = PerSampleRandn([3]).randn(pipelines.latent_shape(pipe, 16, 16))
    with torch.no_grad():
        theirs = diffusers_loop(pipe, scheduler, cond, latents.clone())
        scheduler.set_timesteps(8)
        ours = ours_on(pipe, scheduler, cond, latents, name)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------- schedules: ComfyUI's formulas, written out

SD_TABLE = NoiseLevels.from_alphas_cumprod(
    torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=F64) ** 2, 0))


def test_comfyui_simple_normal_sgm_ddim_uniform():
    table = SD_TABLE.sigmas_table()
    n = 7
    # simple: sigmas[-(1 + int(i * T / n))]
    want = [float(table[-(1 + int(i * 1000 / n))]) for i in range(n)] + [0.0]
    assert schedule_sigmas("simple", SD_TABLE, n).tolist() == pytest.approx(want, rel=1e-6)
    # normal: timesteps linspace(999, 0, n), sigma(t) log-linear between table entries, then 0
    def sigma_at(t):
        lo, hi, w = math.floor(t), math.ceil(t), t - math.floor(t)
        return math.exp((1 - w) * math.log(table[lo]) + w * math.log(table[hi]))
    want = [sigma_at(t) for t in np.linspace(999, 0, n)] + [0.0]
    assert schedule_sigmas("normal", SD_TABLE, n).tolist() == pytest.approx(want, rel=1e-6)
    want = [sigma_at(t) for t in np.linspace(999, 0, n + 1)[:-1]] + [0.0]
    assert schedule_sigmas("sgm_uniform", SD_TABLE, n).tolist() == pytest.approx(want, rel=1e-6)
    # ddim_uniform: table entries 1, 1 + c, ... (c = T // n), descending, then 0
    want = [float(table[i]) for i in range(1, 1000, 1000 // n)][::-1] + [0.0]
    assert schedule_sigmas("ddim_uniform", SD_TABLE, n).tolist() == pytest.approx(want, rel=1e-6)


def test_beta_linear_quadratic_kl_optimal_and_k_diffusion_schedules(k_sampling):
    from scipy import stats
    table = SD_TABLE.sigmas_table()
    n = 10
    ts = np.rint(stats.beta.ppf(1 - np.arange(n) / n, 0.6, 0.6) * 999).astype(int)
    ts = [t for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
    assert schedule_sigmas("beta", SD_TABLE, n).tolist() == pytest.approx([float(table[t]) for t in ts] + [0.0],
                                                                          rel=1e-6)
    # linear_quadratic: t linear to 0.025 over n // 2 steps, then the quadratic through (n // 2, 0.025) and (n, 1)
    t = schedule_sigmas("linear_quadratic", SD_TABLE, n).double() / SD_TABLE.sigma_max
    t = 1 - t
    assert t[:n // 2].tolist() == pytest.approx([0.025 * i / (n // 2) for i in range(n // 2)], abs=1e-6)
    assert t[n // 2].item() == pytest.approx(0.025, abs=1e-6) and t[-1].item() == pytest.approx(1.0)
    assert (t[n // 2:].diff().diff() > 0).all()  # quadratic: growing steps
    lo, hi = SD_TABLE.sigma_min, SD_TABLE.sigma_max
    want = [math.tan(math.atan(hi) + i / (n - 1) * (math.atan(lo) - math.atan(hi))) for i in range(n)] + [0.0]
    assert schedule_sigmas("kl_optimal", SD_TABLE, n).tolist() == pytest.approx(want, rel=1e-5)
    levels = NoiseLevels(0.002, 80.0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)  # k-diffusion's schedules build their ramps in the default dtype
    try:
        theirs = {"karras": k_sampling.get_sigmas_karras(n, 0.002, 80.0, 7.0),
                  "exponential": k_sampling.get_sigmas_exponential(n, 0.002, 80.0),
                  "polyexponential": k_sampling.get_sigmas_polyexponential(n, 0.002, 80.0, 7.0),
                  "vp": k_sampling.get_sigmas_vp(n)}
    finally:
        torch.set_default_dtype(default)
    for name, want in theirs.items():
        torch.testing.assert_close(SCHEDULES[name].sigmas(levels, n, 7.0).double(), want, rtol=1e-6, atol=0)


def test_align_your_steps_tables_and_interpolation():
    sd15 = NoiseLevels(SD_TABLE.sigma_min, SD_TABLE.sigma_max, SD_TABLE.table, ays="sd15")
    ten = schedule_sigmas("ays", sd15, 10).double()
    assert ten[:-1].tolist() == pytest.approx(AYS_TABLES["sd15"][:-1], rel=1e-6) and ten[-1] == 0
    # log-linear: 20 steps put each published level at an even position, geometric means between
    twenty = schedule_sigmas("ays", sd15, 20).double()
    assert twenty[0].item() == pytest.approx(AYS_TABLES["sd15"][0], rel=1e-6)
    assert twenty[2].item() == pytest.approx(AYS_TABLES["sd15"][1], rel=1e-6)
    assert twenty[1].item() == pytest.approx(math.sqrt(AYS_TABLES["sd15"][0] * AYS_TABLES["sd15"][1]), rel=1e-5)
    with pytest.raises(ValueError, match="Align Your Steps is published for SD1.5 and SDXL"):
        schedule_sigmas("ays", NoiseLevels(0.002, 80.0), 10)


@pytest.mark.parametrize("name", [n for n in SCHEDULES if n not in ("scheduler", "ays")])
@pytest.mark.parametrize("steps", [1, 3, 25])
def test_every_schedule_descends_to_zero(name, steps):
    for levels in (SD_TABLE, NoiseLevels(0.002, 80.0)):
        sig = schedule_sigmas(name, levels, steps, 1.0 if name == "polyexponential" else 7.0)
        assert sig[-1] == 0 and bool((sig[:-1] > 0).all()) and bool((sig[1:] < sig[:-1]).all())
        assert len(sig) == steps + 1 or name == "beta"  # beta drops repeated timesteps


# ---------------------------------------------------------------- the command line

def test_sample_takes_any_schedule_and_records_the_nfe(tmp_path, tiny_run):
    import json
    from conftest import call_cli

    call_cli("sample", "--checkpoint", tiny_run, "--n", 2, "--steps", 3, "--sampler", "dpmpp_3m_sde", "--schedule",
             "exponential", "--out", tmp_path / "a", "--device", "cpu", check=True)
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["nfe_per_sample"] == 3 and "exponential" in json.dumps(record)
    call_cli("sample", "--checkpoint", tiny_run, "--n", 2, "--steps", 3, "--sampler", "dpm_adaptive",
             "--out", tmp_path / "b", "--device", "cpu", check=True)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["nfe_per_sample"] is None
    proc = call_cli("sample", "--checkpoint", tiny_run, "--n", 2, "--schedule", "ays", "--out", tmp_path / "c")
    assert proc.returncode != 0 and "--schedule ays needs a diffusers pipeline" in proc.stderr
    assert not (tmp_path / "c").exists()


def test_flow_levels_carry_the_shift():
    """sigma = t / (1 - t) of the shifted grid: simple/sgm_uniform on them are the flow models' shifted schedules."""
    plain, shifted = NoiseLevels.flow(1.0), NoiseLevels.flow(3.0)
    t = shifted.sigmas_table() / (1 + shifted.sigmas_table())
    u = plain.sigmas_table() / (1 + plain.sigmas_table())
    torch.testing.assert_close(t, 3 * u / (1 + 2 * u))
    mid = schedule_sigmas("sgm_uniform", shifted, 4).double()
    t_mid = mid / (1 + mid)
    assert t_mid[0].item() == pytest.approx(float(t[-1]), rel=1e-6) and mid[-1] == 0
