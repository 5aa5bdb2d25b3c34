"""Panoramas, anagrams and particle guidance on the flow transformers (tiny SD3 and Flux): windows and views on
the unpacked latent grid, one window / identity views == plain sampling, refusals in one line."""
from __future__ import annotations

import pytest
import torch

from conftest import call_cli
from diffcli.backends import pipelines
from diffcli.core.guidance import classifier_free
from diffcli.core.samplers import sample_euler
from diffcli.panorama import PanoramaConfig, generate, plan, validate
from diffcli.shared.devices import PerSampleRandn

CPU = torch.device("cpu")


def family(path):
    return pipelines.load_family(str(path), CPU, torch.float32)


@pytest.mark.parametrize("which", ["tiny_sd3", "tiny_flux"])
def test_one_window_panorama_is_plain_sampling(which, request):
    fam = family(request.getfixturevalue(which))
    cfg = PanoramaConfig(prompt="a beach", steps=3, height=16, width=16, stride=2, cfg=7.5, window=8)
    p = plan(fam, cfg, validate(cfg))
    image, z = generate(fam, p, cfg.prompt, cfg, CPU)
    assert len(p.views) == 1
    sigmas = fam.sigmas(3, CPU)
    cond, uncond = fam.encode_prompts(["a beach"], None, 16, 16, CPU)
    x = fam.initial_latents(PerSampleRandn([cfg.seed]), fam.latent_shape(16, 16), sigmas[0])
    plain = sample_euler(classifier_free(fam.denoiser(), 7.5, cond, uncond), x, sigmas)
    assert torch.equal(z, plain[0])
    assert torch.equal(image, fam.decode(plain, sigmas[-1])[0])


@pytest.mark.parametrize("which", ["tiny_sd3", "tiny_flux"])
def test_wide_panorama_runs_on_the_latent_grid(which, request, tmp_path):
    model = request.getfixturevalue(which)
    out = tmp_path / "pano"
    call_cli("panorama", "a beach", "--model", model, "--steps", "2", "--height", "16", "--width", "40",
             "--stride", "2", "--window", "8", "--device", "cpu", "--out", out, check=True)
    from diffcli.shared.images import load_images
    files = sorted(out.glob("*.png"))
    assert files and load_images(files[:1]).shape[-2:] == (16, 40)


@pytest.mark.parametrize("which,kernel", [("tiny_sd3", "rbf"), ("tiny_flux", "rbf"), ("tiny_flux", "clip")])
def test_particle_guidance_on_flow_models(which, kernel, request, tmp_path, capsys):
    """PG repels the particles on the latent (rbf) or through the decoded x0_hat's CLIP features (clip): --compare
    writes the plain set beside, and PG changes the images."""
    from conftest import invoke_cli
    model = request.getfixturevalue(which)
    extra = []
    if kernel == "clip":
        pytest.importorskip("open_clip")
        from pipes import build_tiny_clip
        config, weights, _ = build_tiny_clip(tmp_path, "tinyclip-flowpg", seed=4)
        extra = ["--clip-model", config, "--clip-pretrained", weights]
    out = tmp_path / "pg"
    code, _, err = invoke_cli(["pg", "a dog", "--model", model, "--n", "2", "--steps", "3", "--height", "16",
                               "--width", "16", "--kernel", kernel, *extra, "--pg-factor", "50", "--compare",
                               "--out", out, "--device", "cpu"], capsys)
    assert code == 0, err
    assert (out / "plain" / "00001-seed1.png").read_bytes() != (out / "00001-seed1.png").read_bytes()
