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


@pytest.mark.parametrize("which", ["tiny_sd", "tiny_sd3", "tiny_flux"])
def test_identity_anagram_on_a_latent_model_is_plain_sampling(which, request, tmp_path, capsys):
    """One identity view on the latent grid == plain CFG sampling of its prompt (same seed, same sigmas)."""
    from conftest import invoke_cli
    from diffcli.shared.images import load_images
    model = request.getfixturevalue(which)
    out = tmp_path / "ana"
    code, _, err = invoke_cli(["anagram", "a cat", "--views", "identity", "--model", model, "--steps", "3",
                               "--height", "16", "--width", "16", "--cfg", "4", "--seed", "3", "--out", out,
                               "--device", "cpu"], capsys)
    assert code == 0, err
    fam = family(model)
    fam.check_size(16, 16)
    sigmas = fam.sigmas(3, CPU)
    cond, uncond = fam.encode_prompts(["a cat"], None, 16, 16, CPU)
    x = fam.initial_latents(PerSampleRandn([3]), fam.latent_shape(16, 16), sigmas[0])
    plain = fam.decode(sample_euler(classifier_free(fam.denoiser(), 4.0, cond, uncond), x, sigmas), sigmas[-1])
    assert torch.equal(load_images([out / "a_cat.png"])[0], load_images_of(plain[0], tmp_path)[0])


def load_images_of(image, tmp_path):
    from diffcli.shared.images import load_images, save_image
    save_image(tmp_path / "plain.png", image)
    return load_images([tmp_path / "plain.png"])


def test_latent_anagram_views(tiny_flux, tmp_path, capsys):
    """A flip anagram on Flux writes one image per view, synchronized (view 2 is view 1 upside down on the latent
    grid); views with no latent meaning are refused in one line before anything is written."""
    from conftest import invoke_cli
    out = tmp_path / "ana"
    code, _, err = invoke_cli(["anagram", "a cat", "a dog", "--views", "identity", "flip", "--model", tiny_flux,
                               "--steps", "2", "--height", "16", "--width", "16", "--out", out, "--device", "cpu"],
                              capsys)
    assert code == 0, err
    assert (out / "a_cat.png").exists() and (out / "a_dog.png").exists()
    for views in (["identity", "negate"], ["identity", "skew"], ["identity", "inner_rotate"]):
        bad = tmp_path / f"bad-{views[1]}"
        code, _, err = invoke_cli(["anagram", "a cat", "a dog", "--views", *views, "--model", tiny_flux, "--steps", "2",
                                   "--height", "16", "--width", "16", "--out", bad, "--device", "cpu"], capsys)
        assert code != 0 and "no meaning on a FluxPipeline's latent grid" in err, err
        assert len(err.strip().splitlines()) == 1 and not bad.exists()
