"""APG and CFG-Zero* (CFG rules) against diffusers' guiders on identical predictions; CFG++ against its update."""
from __future__ import annotations

import pytest
import torch

from diffcli.core.guidance import Apg, Guidance, ZeroStar, classifier_free
from diffcli.core.samplers import CFG_PP, SAMPLERS, run_sampler, sample_dpmpp_2m, sample_euler

gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731


def predictions(seed, shape=(3, 4, 5, 5), dtype=torch.float64):
    g = gen(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("eta,threshold,momentum", [(0.0, 0.0, 0.0), (0.3, 2.5, -0.5), (1.0, 0.0, 0.4)])
def test_apg_equals_diffusers_adaptive_projected_guidance(eta, threshold, momentum):
    from diffusers.guiders import AdaptiveProjectedGuidance
    w, steps = 4.0, 4
    # the paper's D_c + (w - 1) update is diffusers' "original formulation" at scale w - 1
    ref = AdaptiveProjectedGuidance(guidance_scale=w - 1, adaptive_projected_guidance_momentum=momentum or None,
                                    adaptive_projected_guidance_rescale=threshold, eta=eta,
                                    use_original_formulation=True)
    combine = Apg(eta, threshold, momentum).combiner(w)
    for step in range(steps):  # momentum carries over the steps of one run
        d_c, d_u = predictions(step)
        ref.set_state(step, steps, torch.tensor(999 - step))
        ref.prepare_inputs({"x": (d_c, d_u)})
        expected = ref.forward(d_c, d_u).pred
        torch.testing.assert_close(combine(d_u, d_c, None, None), expected, atol=1e-6, rtol=0)
    # a second run starts with a fresh running average: its first step equals a momentum-free step
    again = Apg(eta, threshold, momentum).combiner(w)
    d_c, d_u = predictions(0)
    torch.testing.assert_close(again(d_u, d_c, None, None), Apg(eta, threshold, 0.0).combiner(w)(d_u, d_c, None, None))


def test_apg_momentum_is_per_sample():
    combine = Apg(0.0, 0.0, -0.5).combiner(3.0)
    alone = Apg(0.0, 0.0, -0.5).combiner(3.0)
    for step in range(3):
        d_c, d_u = predictions(step)
        both = combine(d_u, d_c, None, None)
        torch.testing.assert_close(both[:1], alone(d_u[:1], d_c[:1], None, None))


@pytest.mark.parametrize("zero_init", [0, 1, 2])
def test_cfg_zero_star_equals_diffusers_on_the_noise_predictions(zero_init):
    from diffusers.guiders import ClassifierFreeZeroStarGuidance
    w, sigmas = 5.0, torch.tensor([8.0, 3.0, 1.0, 0.4, 0.0], dtype=torch.float64)
    ref = ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=zero_init)
    combine = ZeroStar(zero_init).combiner(w, sigmas)
    x = torch.randn(3, 4, 5, 5, generator=gen(9), dtype=torch.float64) * 4
    for step in range(4):
        eps_c, eps_u = predictions(10 + step)
        sigma = sigmas[step].expand(3)
        ref.set_state(step, 4, torch.tensor(999 - step))
        expected = ref.forward(eps_c, eps_u).pred
        d = combine(x - sigma.view(-1, 1, 1, 1) * eps_u, x - sigma.view(-1, 1, 1, 1) * eps_c, x, sigma)
        torch.testing.assert_close((x - d) / sigma.view(-1, 1, 1, 1), expected, atol=1e-6, rtol=0)


def toy_denoiser():
    """A conditional toy denoiser (not a network): x0_hat depends on x, sigma and a per-row condition."""
    def model(x, sigma, c):
        s = sigma.view(-1, 1, 1, 1)
        return (x * 0.5 + c.view(-1, 1, 1, 1)) / (1 + s ** 2) + torch.tanh(x) * 0.1
    return model


def test_rules_in_the_stack_and_apg_eta_one_is_cfg():
    model = toy_denoiser()
    cond, uncond = {"c": torch.tensor([1.0, -2.0])}, {"c": torch.zeros(2)}
    x, sigma = torch.randn(2, 1, 4, 4, generator=gen(3), dtype=torch.float64), torch.full((2,), 2.0, dtype=torch.float64)
    sigmas = torch.tensor([2.0, 0.0], dtype=torch.float64)
    plain = Guidance(3.0).denoiser(model, cond, uncond, sigmas)(x, sigma)
    apg_cfg = Guidance(3.0, rule=Apg(1.0, 0.0, 0.0)).denoiser(model, cond, uncond, sigmas)(x, sigma)
    torch.testing.assert_close(apg_cfg, plain, atol=1e-12, rtol=0)
    apg = Guidance(3.0, rule=Apg(0.0, 0.0, 0.0)).denoiser(model, cond, uncond, sigmas)(x, sigma)
    assert not torch.allclose(apg, plain)
    zs = Guidance(3.0, rule=ZeroStar(0)).denoiser(model, cond, uncond, sigmas)(x, sigma)
    assert not torch.allclose(zs, plain)
    assert torch.equal(Guidance(3.0, rule=ZeroStar(1)).denoiser(model, cond, uncond, sigmas)(x, sigma), x)
    assert Guidance(1.0, rule=ZeroStar(1)).rows() == {"uncond": 1, "cond": 1}


# ---------------------------------------------------------------- CFG++

def cfg_pp_reference(d_c, d_u, x, sigmas, lam, order):
    """The CFG++ update written from the paper (Chung et al. 2024, Algorithms 1 and DPM-Solver++ 2M form), in
    x_t = x0 + sigma eps: x0_lam = x0_u + lam (x0_c - x0_u); eps_u = (x - x0_u) / sigma;
    Euler/DDIM: x_next = x0_lam + sigma_next eps_u. 2M: with lambda = -log sigma, h the step in lambda and r the
    previous step over this one, the data-prediction multistep update of x0_lam with the unconditional
    renoising: x_next = x0_lam + (sigma_next/sigma) (x - x0_u) + (1 - sigma_next/sigma) (x0_lam - x0_u,prev) / (2r)."""
    prev_u, h_prev = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0_u, x0_c = d_u(x, s), d_c(x, s)
        x0_lam = x0_u + lam * (x0_c - x0_u)
        if s_next == 0:
            return x0_lam
        eps_u = (x - x0_u) / s
        h = torch.log(torch.tensor(s / s_next, dtype=torch.float64))
        x_next = x0_lam + s_next * eps_u
        if order == 2 and prev_u is not None:
            r = h_prev / h
            x_next = x_next + (1 - s_next / s) * (x0_lam - prev_u) / (2 * r)
        x, prev_u, h_prev = x_next, x0_u, h
    return x


@pytest.mark.parametrize("name,order", [("euler_cfg_pp", 1), ("dpmpp_2m_cfg_pp", 2)])
def test_cfg_pp_equals_the_paper_update(name, order):
    model = toy_denoiser()
    cond, uncond = {"c": torch.tensor([1.0, -2.0])}, {"c": torch.zeros(2)}
    sigmas = torch.tensor([10.0, 4.0, 1.5, 0.6, 0.2, 0.0], dtype=torch.float64)
    x = torch.randn(2, 1, 4, 4, generator=gen(4), dtype=torch.float64) * 10
    lam = 0.6
    ours = run_sampler(name, classifier_free(model, lam, cond, uncond), x, sigmas)
    full = lambda c: (lambda x, s: model(x, torch.full((2,), s, dtype=torch.float64), c["c"]))  # noqa: E731
    ref = cfg_pp_reference(full(cond), full(uncond), x, sigmas, lam, order)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    # lambda 0: the plain sampler on the unconditional model; lambda 1 keeps the renoising unconditional
    plain = (sample_euler if order == 1 else sample_dpmpp_2m)(classifier_free(model, 0.0, cond, uncond), x, sigmas)
    torch.testing.assert_close(run_sampler(name, classifier_free(model, 0.0, cond, uncond), x, sigmas), plain,
                               atol=1e-9, rtol=0)
    assert not torch.allclose(run_sampler(name, classifier_free(model, 1.0, cond, uncond), x, sigmas),
                              (sample_euler if order == 1 else sample_dpmpp_2m)(classifier_free(model, 1.0, cond, uncond), x, sigmas))
    assert set(CFG_PP) <= set(SAMPLERS)


def test_cfg_pp_without_a_cfg_pass_is_the_plain_sampler():
    """A denoiser with no CFG combinator is its own unconditional model; one that reports two D_u is refused."""
    model, sigmas = toy_denoiser(), torch.tensor([10.0, 3.0, 1.0, 0.0], dtype=torch.float64)
    plain = lambda x, s, **kw: model(x, s, torch.ones(2, dtype=torch.float64))  # noqa: E731
    x = torch.randn(2, 1, 4, 4, generator=gen(5), dtype=torch.float64) * 10
    assert torch.equal(run_sampler("euler_cfg_pp", plain, x, sigmas), sample_euler(plain, x, sigmas)) or \
        torch.allclose(run_sampler("euler_cfg_pp", plain, x, sigmas), sample_euler(plain, x, sigmas), atol=1e-12)
    torch.testing.assert_close(run_sampler("dpmpp_2m_cfg_pp", plain, x, sigmas), sample_dpmpp_2m(plain, x, sigmas),
                               atol=1e-12, rtol=0)

    def two(x, s, uncond_sink=None):
        uncond_sink += [x, x]
        return x
    with pytest.raises(ValueError, match="one unconditional"):
        run_sampler("euler_cfg_pp", two, x, sigmas)


# ---------------------------------------------------------------- PG's class-posterior kernel on a class subset

def test_posterior_push_on_each_particles_own_classes_equals_the_full_push():
    """When a particle's posterior is zero outside its classes, the push over those classes alone (with the other
    particles' mass on them) is the full push."""
    from diffcli.core.particles import posterior_push
    g = gen(7)
    n, classes, k = 4, 6, 3
    picked = torch.stack([torch.randperm(classes, generator=g)[:k].sort().values for _ in range(n)])
    p_sub = torch.rand(n, k, generator=g, dtype=torch.float64)
    p_sub = p_sub / p_sub.sum(1, keepdim=True)
    full = torch.zeros(n, classes, dtype=torch.float64).scatter(1, picked, p_sub)
    d_full = torch.randn(n, classes, 2, 3, generator=g, dtype=torch.float64)
    d_sub = d_full.gather(1, picked[..., None, None].expand(-1, -1, 2, 3))
    q = (full.sum(0, keepdim=True) - full).gather(1, picked)
    torch.testing.assert_close(posterior_push(p_sub, d_sub, q), posterior_push(full, d_full))


def test_posterior_support_runs_fewer_rows_after_the_first_evaluation():
    from diffcli.core.guidance import class_particle_guidance
    classes, calls = 5, []

    def model(x, sigma, class_labels):
        calls.append(x.shape[0])
        return x * 0.3 + class_labels.view(-1, 1, 1, 1).double() * 0.1

    x = torch.randn(3, 1, 2, 2, generator=gen(1), dtype=torch.float64)
    sigma = torch.full((3,), 2.0, dtype=torch.float64)
    d = class_particle_guidance(model, 5.0, classes, {}, sigma_max=10.0, support=2)
    d(x, sigma), d(x, sigma), d(x, sigma * 100)  # in window twice, then outside the window
    assert calls == [3 * 6, 3 * 3, 3]
    calls.clear()
    everything = class_particle_guidance(model, 5.0, classes, {}, support=0)
    a = everything(x, sigma)
    assert torch.equal(a, class_particle_guidance(model, 5.0, classes, {}, support=classes)(x, sigma))
