"""Flow-matching transformer families (SD3, Flux.1) on tiny random pipelines built in code and loaded through
`from_pretrained`: the denoiser form against the diffusers pipelines themselves, schedules, sizes, refusals."""
from __future__ import annotations

import pytest
import torch

from diffcli.backends import pipelines
from diffcli.backends.flow_common import SIGMA_T1, sigma_to_t, t_to_sigma
from diffcli.backends.flow_flux import Flux, pack, unpack
from diffcli.backends.flow_sd3 import StableDiffusion3
from diffcli.core.guidance import classifier_free
from diffcli.core.samplers import run_sampler
from diffcli.shared.errors import DiffcliError

CPU = torch.device("cpu")


def family(path):
    return pipelines.load_family(str(path), CPU, torch.float32)


def test_families_load_through_the_same_names(tiny_sd3, tiny_flux):
    sd3, flux = family(tiny_sd3), family(tiny_flux)
    assert type(sd3) is StableDiffusion3 and sd3.name == "sd3" and sd3.kind == "StableDiffusion3Pipeline"
    assert type(flux) is Flux and flux.name == "flux" and flux.distilled
    assert pipelines.family(sd3.pipe) == "sd3" and pipelines.family(flux.pipe) == "flux"


def test_sigma_t_maps_are_inverse():
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999, 1.0], dtype=torch.float64)
    s = t_to_sigma(t)
    assert s[-1] == SIGMA_T1 and float(sigma_to_t(s)[-1]) == 1.0
    assert torch.allclose(sigma_to_t(s), t, atol=1e-12)


@pytest.mark.parametrize("height,width", [(16, 32), (32, 16)])
def test_sd3_euler_on_its_schedule_is_the_pipeline(tiny_sd3, height, width):
    """`--sampler euler` on the scheduler's sigmas == StableDiffusion3Pipeline (CFG 5) on the same initial noise."""
    fam = family(tiny_sd3)
    fam.check_size(height, width)
    noise = torch.randn(2, *fam.latent_shape(height, width), generator=torch.Generator().manual_seed(1))
    want = fam.pipe(prompt=["a cat", "a dog"], height=height, width=width, num_inference_steps=5, guidance_scale=5.0,
                    latents=noise.clone(), output_type="latent").images
    cond, uncond = fam.encode_prompts(["a cat", "a dog"], None, height, width)
    sigmas = fam.sigmas(5)
    model = classifier_free(fam.denoiser(), 5.0, cond, uncond)
    got = run_sampler("euler", model, fam.initial_latents(_Fixed(noise), noise.shape[1:], sigmas[0]), sigmas)
    assert sigmas[-1] == 0
    torch.testing.assert_close(got.float(), want, atol=2e-5, rtol=1e-4)


def test_flux_euler_on_its_schedule_is_the_pipeline(tiny_flux):
    """Flux (guidance-distilled, embedded guidance 2.5, no CFG; dynamic shift from the 4x8 tokens; non-square)."""
    fam = family(tiny_flux)
    height, width = 16, 32
    fam.check_size(height, width)
    fam.set_guidance_embed(2.5)
    noise = torch.randn(1, *fam.latent_shape(height, width), generator=torch.Generator().manual_seed(2))
    want = fam.pipe(prompt="a cat", height=height, width=width, num_inference_steps=4, guidance_scale=2.5,
                    latents=pack(noise), output_type="latent").images
    cond, uncond = fam.encode_prompts(["a cat"], None, height, width)
    sigmas = fam.sigmas(4)
    model = classifier_free(fam.denoiser(), 1.0, cond, uncond)
    got = run_sampler("euler", model, fam.initial_latents(_Fixed(noise), noise.shape[1:], sigmas[0]), sigmas)
    torch.testing.assert_close(pack(got.float()), want, atol=2e-5, rtol=1e-4)
    assert torch.equal(unpack(pack(got), height // 2, width // 2), got)


def test_flux_shift_follows_the_token_count(tiny_flux):
    fam = family(tiny_flux)
    fam.check_size(16, 16)
    small = fam.sigmas(6)
    fam.check_size(64, 64)
    large = fam.sigmas(6)
    assert (large[1:-1] > small[1:-1]).all()  # more tokens, larger shift: more time at high noise


def test_karras_schedule_spans_the_flow_levels(tiny_sd3):
    fam = family(tiny_sd3)
    levels = fam.noise_levels()
    s = fam.sigmas(8, schedule="karras")
    assert s[-1] == 0 and abs(float(s[0]) - levels.sigma_max) < 1e-2 * levels.sigma_max
    assert abs(float(s[-2]) - levels.sigma_min) < 1e-6 + 1e-4 * levels.sigma_min


def test_bad_inputs_are_refused_in_one_line(tiny_sd3, tiny_flux):
    sd3 = family(tiny_sd3)
    with pytest.raises(DiffcliError, match="multiple of 4 px"):
        sd3.check_size(16, 18)  # the VAE's 2 px x the 2x2 patch
    with pytest.raises(DiffcliError, match="no distilled guidance embedding"):
        sd3.set_guidance_embed(3.5)
    with pytest.raises(DiffcliError, match="no such attention block.*joint"):
        sd3.layers(["d0"], "--layers")
    flux = family(tiny_flux)
    assert flux.layers(["d0", "s1"]) == ["transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    assert sd3.layers(["mid"]) == ["transformer_blocks.1.attn"] and sd3.layers(["joint"]) == sd3.layers(["all"])


class _Fixed:
    """A PerSampleRandn stand-in that returns one given tensor: the pipeline's initial noise."""

    device = CPU

    def __init__(self, noise):
        self.noise = noise

    def randn(self, shape):
        assert tuple(shape) == tuple(self.noise.shape[1:]) or tuple(shape) == tuple(self.noise.shape)
        return self.noise.clone()


def test_memory_estimate_counts_the_weights_unless_offloaded(tiny_flux, monkeypatch):
    from diffcli.shared import memory
    fam = pipelines.load_family(str(tiny_flux), CPU, torch.float32, offload=True)  # on a CPU: a plain load
    assert fam.offload
    weights = sum(p.numel() for p in fam.pipe.transformer.parameters()) * 4
    c = fam.pipe.transformer.config
    activations = (fam.image_tokens(16, 16) + fam.text_tokens) * c.num_attention_heads * c.attention_head_dim * 4 * 4
    monkeypatch.setattr(memory, "device_memory", lambda device: activations + weights // 2)
    fam.check_memory(1, 16, 16, torch.float32, CPU, "a batch", "lower --n")  # offloaded: the activations only
    fam.offload = False
    with pytest.raises(DiffcliError, match="with the transformer's weights.*lower --n"):
        fam.check_memory(1, 16, 16, torch.float32, CPU, "a batch", "lower --n")


def test_text_encoders_are_freed_after_encoding(tiny_sd3):
    fam = family(tiny_sd3)
    fam.encode_all([["a cat"], ["a dog"] * 2], None, 16, 16, CPU)
    assert fam.pipe.text_encoder is None and fam.pipe.text_encoder_2 is None
    cond, _ = fam.encode_prompts(["a dog"] * 2, None, 16, 16)
    assert cond["encoder_hidden_states"].shape[0] == 2
    with pytest.raises(DiffcliError, match="text encoders were freed"):
        fam.encode_prompts(["a bird"], None, 16, 16)


def test_flux_without_guidance_embedding(tmp_path):
    """A Flux without the distilled embedding (schnell-like): --guidance-embed refused, CFG keeps its default."""
    from pipes import build_tiny_flux
    from diffcli.options import default_cfg
    fam = family(build_tiny_flux(tmp_path, distilled=False))
    assert not fam.distilled and default_cfg(fam, None, 5.0) == 5.0
    with pytest.raises(DiffcliError, match="no distilled guidance embedding"):
        fam.set_guidance_embed(3.5)
    cond, _ = fam.encode_prompts(["a cat"], None, 16, 16)
    assert "guidance" not in cond
    fam.check_size(16, 16)
    x = fam.initial_latents(_Fixed(torch.randn(1, 4, 8, 8)), (4, 8, 8), fam.sigmas(2)[0])
    assert torch.isfinite(fam.denoiser()(x, fam.sigmas(2)[:1], **cond)).all()


@pytest.mark.parametrize("schedule", ["simple", "sgm_uniform", "beta", "exponential", "kl_optimal"])
def test_shared_schedules_run_on_flow_levels(tiny_sd3, schedule):
    """Every shared schedule takes a flow model's levels (its shifted t grid in sigma): descending, inside the
    scheduler's finite range, ending in 0; Align Your Steps (no published table for SD3) is refused in one line."""
    fam = family(tiny_sd3)
    fam.check_size(16, 16)
    levels = fam.noise_levels()
    sigmas = fam.sigmas(6, schedule=schedule)
    assert sigmas[-1] == 0 and len(sigmas) == 7 and bool((sigmas[:-1] > 0).all())
    assert bool((sigmas[:-1].diff() < 0).all())
    assert levels.sigma_min * 0.999 <= float(sigmas[-2]) and float(sigmas[0]) <= levels.sigma_max * 1.001
    with pytest.raises(DiffcliError, match="Align Your Steps"):
        fam.sigmas(6, schedule="ays")
