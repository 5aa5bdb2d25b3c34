"""Factorized views (Factorized Diffusion, Geng et al. 2024): each component checked against the paper's
definition written out here with torchvision / plain convolutions, the components summing to the image at both IF
stage sizes, whole sets only, the synchronized sum, and on a tiny IF: equal prompts give plain sampling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from diffcli.core.views import FACTORIZED, FACTORS, VIEWS, ViewOptions, ViewSet, check_factorized, frame, make_view
from diffcli.shared.errors import DiffcliError


def paper_components(factor: str, x: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The paper's (and its code's) components of x (C, H, W) at k times the 64 px base: kernel 33k (+1 if even),
    stds 2k (hybrid), 1k and 2k (triple); the diagonal blur of 7k (+1 if even); the channel mean; 4k blocks."""
    size = 33 * k + ((k + 1) % 2)
    if factor == "hybrid":
        low = TF.gaussian_blur(x, size, 2.0 * k)
        return [low, x - low]
    if factor == "triple":
        mid = TF.gaussian_blur(x, size, 1.0 * k)
        low = TF.gaussian_blur(mid, size, 2.0 * k)
        return [low, mid - low, x - mid]
    if factor == "colour":
        grey = torch.stack([x.mean(0)] * 3)
        return [grey, x - grey]
    if factor == "motion":
        n = 7 * k + ((k + 1) % 2)
        kernel = torch.eye(n)[None, None] / n
        blur = torch.cat([F.conv2d(x[i][None], kernel, padding=n // 2) for i in range(3)])
        return [blur, x - blur]
    small = F.interpolate(F.avg_pool2d(x[None], 4 * k), scale_factor=4 * k, mode="nearest")[0]
    return [small, x - small]


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("k", [1, 2])  # the stage-I size and twice it (IF stage II is x4: the same rule)
def test_components_are_the_papers_and_sum_to_the_image(factor, k):
    x = torch.rand(3, 64 * k, 64 * k, generator=torch.Generator().manual_seed(k)) * 2 - 1
    views = [make_view(n, 64, 64) for n in FACTORS[factor]]
    ours = [v.inverse_view(x) for v in views]
    for mine, theirs in zip(ours, paper_components(factor, x, k)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sum(ours), x, atol=1e-6, rtol=0)
    assert all(torch.equal(v.view(x), x) for v in views)  # the model sees the whole image
    assert all(c.abs().max() > 1e-3 for c in ours)        # no component is empty


@pytest.mark.parametrize("factor", FACTORS)
def test_synchronized_sum_of_components(factor):
    """ViewSet over a whole factorization: the average of the instances is sum_i f_i(x_i), one image."""
    views = ViewSet([make_view(n, 16, 16, ViewOptions(scale_factor=2)) for n in FACTORS[factor]], (3, 16, 16))
    assert torch.equal(views.count, torch.ones(1, 16, 16))
    xs = torch.randn(len(views), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    want = sum(v.inverse_view(x) for v, x in zip(views.views, xs))
    torch.testing.assert_close(views.average(xs), want)
    same = xs[:1].expand_as(xs)  # equal predictions: the sum of the components gives the prediction back
    torch.testing.assert_close(views.average(same), xs[0], atol=1e-6, rtol=0)


def test_whole_sets_only():
    check_factorized(["low_pass", "high_pass"])
    check_factorized(["triple_high", "triple_low", "triple_mid"])
    check_factorized(["identity", "rotate_cw"])
    for bad in (["low_pass"], ["low_pass", "high_pass", "high_pass"], ["identity", "low_pass"],
                ["low_pass", "color"], ["grayscale", "color", "rotate_cw"]):
        with pytest.raises(DiffcliError, match="one whole set"):
            check_factorized(bad)
    with pytest.raises(DiffcliError, match="does not split into 8x8 blocks"):
        make_view("scale_small", 12, 12, ViewOptions(scale_factor=8)).inverse_view(torch.zeros(3, 12, 12))


@pytest.mark.parametrize("name", FACTORIZED)
def test_frames_and_looks(name):
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    v = make_view(name, 32, 32)
    assert torch.equal(frame(v, x, 0), x)
    moved = [frame(v, x, t) for t in (0.25, 0.5, 1.0)]
    assert all(m.shape == x.shape and torch.isfinite(m).all() for m in moved)
    assert any((m - x).abs().max() > 1e-3 for m in moved)  # the animation shows something happen
    look = ViewSet([v], (3, 32, 32)).looks(x)[0] if VIEWS[name].factor is None else v.look(x)
    assert look.shape == x.shape
    if name in ("grayscale",):
        assert torch.equal(look[0], look[1]) and torch.equal(frame(v, x, 1.0)[0], frame(v, x, 1.0)[2])


def test_equal_prompts_are_plain_sampling_on_a_tiny_if(tiny_if):
    from diffcli.anagram import AnagramConfig, Job, generate
    from diffcli.backends import pipelines
    cpu = torch.device("cpu")
    pipe = pipelines.load_family(str(tiny_if[0]), cpu, torch.float32)
    plain = generate(pipe, None, Job("x", ["a horse"]), AnagramConfig(views=["identity"], steps=3), (16, 16), cpu)
    for factor in ("hybrid", "colour"):
        cfg = AnagramConfig(views=list(FACTORS[factor]), steps=3)
        out = generate(pipe, None, Job("x", ["a horse"] * len(FACTORS[factor])), cfg, (16, 16), cpu)
        torch.testing.assert_close(out["canvas"], plain["canvas"], atol=1e-4, rtol=1e-4)
    two = generate(pipe, None, Job("x", ["a horse", "a village"]), AnagramConfig(views=list(FACTORS["hybrid"]),
                                                                                 steps=3), (16, 16), cpu)
    assert (two["canvas"] - plain["canvas"]).abs().max() > 1e-3


def test_cli_hybrid_both_stages_and_refusals(tmp_path, tiny_if):
    from conftest import call_cli
    out = tmp_path / "hybrid"
    args = ["anagram", "a horse", "a village", "--model", tiny_if[0], "--sr-model", tiny_if[1], "--steps", "2",
            "--sr-steps", "1", "--frames", "2"]
    proc = call_cli(*args, "--views", "low_pass", "identity", "--out", out)
    assert proc.returncode != 0 and "one whole set" in proc.stderr and not out.exists()
    proc = call_cli(*args, "--views", "low_pass", "high_pass", "--triple-sigmas", "1", "--out", out)
    assert proc.returncode != 0 and "--triple-sigmas expects two positive numbers" in proc.stderr
    call_cli(*args, "--views", "motion_blur", "motion_rest", "--out", out, check=True)
    assert sorted(p.name for p in out.iterdir()) == ["a_horse.png", "a_village.png"]
    assert {p.name for p in (tmp_path / "hybrid.animations").iterdir()} == {"a_horse-a_village.gif",
                                                                           "a_horse-a_village_strip.png"}
