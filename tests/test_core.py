"""Formulas, schedules and samplers against hand-computed values and distributions with exact denoisers."""
from __future__ import annotations

import math

import pytest
import torch

from diffcli.core.denoisers import EDMPrecond, edm_coefficients
from diffcli.core.guidance import classifier_free
from diffcli.core.samplers import (get_ancestral_step, get_sigmas_karras, nfe, run_sampler, sample_ddim,
                                   sample_euler, sample_heun, sample_stochastic_heun)
from diffcli.train import EDMLoss


def test_edm_coefficients_hand_values():
    c_skip, c_out, c_in, c_noise = edm_coefficients(torch.tensor([1.0, 2.0]), 0.5)
    # sigma = 1: sd^2/(s^2+sd^2) = .25/1.25; s*sd/sqrt(1.25); 1/sqrt(1.25); ln(1)/4
    assert torch.allclose(c_skip, torch.tensor([0.2, 0.25 / 4.25]))
    assert torch.allclose(c_out, torch.tensor([0.5 / math.sqrt(1.25), 1.0 / math.sqrt(4.25)]))
    assert torch.allclose(c_in, torch.tensor([1 / math.sqrt(1.25), 1 / math.sqrt(4.25)]))
    assert torch.allclose(c_noise, torch.tensor([0.0, math.log(2) / 4]))


def test_precond_combines_skip_and_net():
    net = lambda x, c_noise, labels: torch.full_like(x, 3.0)  # F = 3 everywhere
    model = EDMPrecond(net, sigma_data=0.5)
    x = torch.ones(2, 1, 2, 2)
    out = model(x, torch.tensor([1.0, 1.0]))
    assert torch.allclose(out, torch.full_like(x, 0.2 * 1 + (0.5 / math.sqrt(1.25)) * 3))


def test_loss_weight_is_inverse_c_out_squared():
    sigma = torch.tensor([0.3])
    _, c_out, _, _ = edm_coefficients(sigma)
    # a "model" that is off by exactly 1 everywhere makes the loss equal to the weight
    loss = EDMLoss()(lambda x, s, y: torch.zeros_like(x) + 1.0, torch.zeros(1, 1, 2, 2), sigma, torch.zeros(1, 1, 2, 2), None)
    assert loss.item() == pytest.approx(1 / c_out.item() ** 2, rel=1e-5)


def test_karras_schedule_hand_values():
    s = get_sigmas_karras(3, 0.002, 80.0, 7.0)
    mid = ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    assert s.tolist() == pytest.approx([80.0, mid, 0.002, 0.0], rel=1e-6)
    assert get_sigmas_karras(1, 0.002, 80.0).tolist() == pytest.approx([80.0, 0.0])


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.fn(x, sigma, **kw)


def gaussian_denoiser(mu: float, std: float):
    """Exact D for data ~ N(mu, std^2) per dimension: E[x0 | x] = mu + std^2/(std^2+sigma^2) (x - mu)."""
    def D(x, sigma):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return mu + std ** 2 / (std ** 2 + s ** 2) * (x - mu)
    return D


@pytest.mark.parametrize("name,steps,expected", [("euler", 10, 10), ("heun", 10, 19), ("stochastic_heun", 10, 19),
                                                 ("ddim", 10, 10), ("heun", 1, 1)])
def test_network_evaluations(name, steps, expected):
    model = Counter(gaussian_denoiser(0.0, 1.0))
    run_sampler(name, model, torch.randn(4, 1) * 80, get_sigmas_karras(steps), s_churn=40.0, eta=1.0)
    assert model.calls == expected == nfe(name, steps)


@pytest.mark.parametrize("name,steps", [("euler", 200), ("heun", 32), ("stochastic_heun", 64), ("ddim", 200)])
def test_samples_match_gaussian_target(name, steps):
    torch.manual_seed(0)
    mu, std = 0.7, 0.4
    x = torch.randn(20000, 1) * 80
    out = run_sampler(name, gaussian_denoiser(mu, std), x, get_sigmas_karras(steps), s_churn=20.0, s_tmin=0.05,
                      s_tmax=50.0, s_noise=1.0, eta=1.0 if name == "ddim" else 0.0)
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    assert out.std().item() == pytest.approx(std, rel=0.05)


def test_ddim_eta_zero_is_euler_and_eta_changes_result():
    D = gaussian_denoiser(0.2, 0.5)
    x = torch.randn(64, 3)
    sig = get_sigmas_karras(8)
    assert torch.allclose(sample_ddim(D, x, sig, eta=0.0), sample_euler(D, x, sig), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    noisy = sample_ddim(D, x, sig, eta=1.0, noise=lambda t: torch.randn(t.shape, generator=g))
    assert not torch.allclose(noisy, sample_euler(D, x, sig))


def test_ancestral_step_preserves_variance():
    down, up = get_ancestral_step(torch.tensor(2.0), torch.tensor(1.0), eta=1.0)
    assert (down ** 2 + up ** 2).item() == pytest.approx(1.0)
    down0, up0 = get_ancestral_step(torch.tensor(2.0), torch.tensor(1.0), eta=0.0)
    assert down0.item() == 1.0 and up0.item() == 0.0


def test_stochastic_heun_without_churn_is_heun():
    D = gaussian_denoiser(0.0, 0.5)
    x = torch.randn(16, 2) * 80
    sig = get_sigmas_karras(6)
    assert torch.equal(sample_stochastic_heun(D, x, sig, s_churn=0.0), sample_heun(D, x, sig))


def test_callback_sees_every_step():
    seen = []
    sample_heun(gaussian_denoiser(0, 1), torch.randn(2, 1), get_sigmas_karras(5), callback=lambda d: seen.append(d["i"]))
    assert seen == [0, 1, 2, 3, 4]


def test_cfg_combines_in_one_batch():
    calls = []

    def model(x, sigma, class_labels):
        calls.append(x.shape[0])
        return x + class_labels.float().reshape(-1, 1)

    x, s = torch.zeros(3, 1), torch.ones(3)
    cond, uncond = {"class_labels": torch.tensor([2, 2, 2])}, {"class_labels": torch.tensor([0, 0, 0])}
    out = classifier_free(model, 2.5, cond, uncond)(x, s)
    assert calls == [6]  # uncond and cond passes as one batch
    assert torch.allclose(out, torch.full((3, 1), 0 + 2.5 * (2 - 0)))
    calls.clear()
    assert torch.allclose(classifier_free(model, 1.0, cond, uncond)(x, s), torch.full((3, 1), 2.0))
    assert calls == [3]  # w = 1 needs no unconditional pass
