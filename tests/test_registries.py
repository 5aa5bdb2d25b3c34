"""Each registry entry's facts hold: a sampler's knobs and defaults are its function's and it reads exactly those
(its NFE against counted calls: test_samplers.test_dispatch_and_network_evaluations), a schedule's pipeline_only is
what the options check refuses, a kernel's `serves` is what the options check accepts and `reads` is what
make_kernel builds, a view's square_only and frame are what it does, a blur family parses its own specs; the help
renderings list every choice in the registry's order."""
from __future__ import annotations

import inspect

import pytest
import torch

from diffcli.core import particles, query_blur, samplers, views
from diffcli.core.particles import KERNELS, make_kernel
from diffcli.core.query_blur import BLURS, SPEC_FORMS, parse_blur
from diffcli.core.samplers import SAMPLERS, SCHEDULES, get_sigmas_karras, run_sampler
from diffcli.core.views import VIEWS, ViewOptions, frame, make_view
from diffcli.options import GuidanceOptions, SamplingOptions, check_particles, check_sampling
from diffcli.shared.devices import PerSampleRandn
from diffcli.shared.errors import DiffcliError

F64 = torch.float64


def toy_denoiser(x, sigma):
    return x / (1 + sigma.reshape(-1, 1).to(x.dtype) ** 2)


# ---------------------------------------------------------------- samplers and schedules

@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_record_matches_its_function(name):
    entry = SAMPLERS[name]
    params = inspect.signature(entry.fn).parameters
    run = inspect.signature(run_sampler).parameters
    for knob, default in entry.knobs.items():
        assert knob in run and params[knob].default == default  # None means the function's own default
    assert ("noise" in params) == entry.noise


CHANGED = {"eta": 0.5, "s_churn": 0.5, "s_tmin": 100.0, "s_tmax": 0.01, "s_noise": 1.2}


@pytest.mark.parametrize("name", SAMPLERS)
def test_a_sampler_reads_exactly_its_knobs(name):
    base = {"eta": None, "s_churn": 1.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    sig = get_sigmas_karras(5, 0.01, 20.0).double()

    def run(**knobs):
        return run_sampler(name, toy_denoiser, x, sig, noise=PerSampleRandn(range(4)), **{**base, **knobs})

    ref = run()
    for knob, value in CHANGED.items():
        assert (not torch.equal(run(**{knob: value}), ref)) == (knob in SAMPLERS[name].knobs), knob
    assert set(samplers.takes("eta")) == set(samplers.ETA_DEFAULTS) == {
        "ddim", "euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde",
        "res_multistep"}


@pytest.mark.parametrize("name", SCHEDULES)
def test_pipeline_only_schedules_are_refused_for_diffcli_models(name):
    check_sampling(SamplingOptions(schedule=name), pipeline=True)
    if SCHEDULES[name].pipeline_only:
        with pytest.raises(DiffcliError, match=f"--schedule {name} needs a diffusers pipeline"):
            check_sampling(SamplingOptions(schedule=name), pipeline=False)
    else:
        check_sampling(SamplingOptions(schedule=name), pipeline=False)


# ---------------------------------------------------------------- PG kernels

@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("models", ["digits", "pipelines"])
def test_a_kernel_serves_what_the_options_check_accepts(name, models):
    opts = GuidanceOptions(pg_factor=1.0, kernel=name)
    if models in KERNELS[name].serves:
        check_particles(opts, 4, pipeline=models == "pipelines")
    else:
        with pytest.raises(DiffcliError, match=f"--kernel {name} is for"):
            check_particles(opts, 4, pipeline=models == "pipelines")


@pytest.mark.parametrize("name", KERNELS)
def test_make_kernel_builds_what_the_kernel_reads(name):
    kernel = KERNELS[name]
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    if kernel.reads == "class denoisers":
        with pytest.raises(ValueError, match="class denoisers"):
            make_kernel(name)
        assert kernel.reads_x0 and not kernel.backward
        return
    if kernel.reads == "features":
        with pytest.raises(ValueError, match="needs its feature network"):
            make_kernel(name)
        grad, on_x0 = make_kernel(name, lambda v: v[:, :3] * 2)
        assert torch.allclose(grad(z)[:, 3:], torch.zeros(4, 3))  # through the features only
    else:
        grad, on_x0 = make_kernel(name)
        torch.testing.assert_close(grad(z), particles.rbf_grad(z))
    assert on_x0 == kernel.reads_x0 == (name != "rbf") and kernel.backward == kernel.reads_x0


# ---------------------------------------------------------------- views

@pytest.mark.parametrize("name", VIEWS)
def test_square_only_is_what_make_view_refuses(name):
    opts = ViewOptions(patches=4, pieces=4, squares=2)
    if VIEWS[name].square_only:
        with pytest.raises(DiffcliError, match=f"view {name} needs a square image, got 16x32"):
            make_view(name, 16, 32, opts)
    else:
        assert make_view(name, 16, 32, opts).view(torch.zeros(3, 16, 32)).shape == (3, 16, 32)


@pytest.mark.parametrize("name", VIEWS)
def test_a_views_frame_is_its_kind(name):
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    v = make_view(name, 16, 16)
    kind = VIEWS[name].frame
    assert v.name == name and torch.equal(frame(v, x, 0.5), kind(v, x, 0.5, 1.0))
    if kind is views.still:
        assert torch.equal(frame(v, x, 0.99), x)
    elif kind is views.turn_disc:  # the corners never move
        corner = ~torch.tensor([[(2 * i - 15) ** 2 + (2 * j - 15) ** 2 < 256 for j in range(16)] for i in range(16)])
        assert torch.equal(frame(v, x, 0.5)[:, corner], x[:, corner])
    else:  # fade, turn, move (and the factorized views' frames): almost the last frame just before t = 1
        assert (frame(v, x, 0.9999) - frame(v, x, 1)).abs().max() < 0.05
        assert VIEWS[name].factor is not None or torch.equal(frame(v, x, 1), v.view(x))


# ---------------------------------------------------------------- SEG blurs

EXAMPLES = {"gaussian": "gaussian_3_1.5", "box": "interpolatedBoxBlur_3_0.5", "ema": "ema_0.2_0.9_cosine"}


@pytest.mark.parametrize("kind", BLURS)
def test_a_blur_family_parses_its_specs_and_runs_its_blur(kind):
    blur = parse_blur(EXAMPLES[kind])
    q = torch.randn(2, 24, 4, generator=torch.Generator().manual_seed(4))
    assert blur.kind == kind and BLURS[kind].description in SPEC_FORMS
    out = blur(q, 4, 6)
    assert out.shape == q.shape and not torch.equal(out, q)
    torch.testing.assert_close(out.mean(-2), q.mean(-2), atol=0.3, rtol=0)  # a blur, roughly mean preserving


def test_every_family_has_an_example():
    assert set(EXAMPLES) == set(BLURS)


# ---------------------------------------------------------------- help texts

@pytest.mark.parametrize("registry, text", [(SAMPLERS, samplers.describe()), (SCHEDULES, samplers.describe_schedules()),
                                            (KERNELS, particles.describe()), (VIEWS, views.describe())])
def test_help_lists_every_choice_in_order(registry, text):
    places = [text.index(f"{name}: {entry.description}") for name, entry in registry.items()]
    assert places == sorted(places) and places[0] == 0
    assert query_blur.describe() == SPEC_FORMS
