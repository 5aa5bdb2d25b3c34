"""The shared pipeline layer: our loop over a loaded SD / SDXL pipeline equals the pipeline's own DDIM loop."""
from __future__ import annotations

import pytest
import torch

from diffcli.backends import pipelines
from diffcli.shared.errors import DiffcliError
from diffcli.shared.devices import PerSampleRandn
from diffcli.core.guidance import classifier_free
from diffcli.core.samplers import sample_euler


@pytest.mark.parametrize("which", ["tiny_sd", "tiny_sdxl"])
def test_our_loop_matches_the_pipeline_call(which, request):
    from diffusers import DDIMScheduler
    path = request.getfixturevalue(which)
    device = torch.device("cpu")
    pipe = pipelines.load_pipeline(str(path), device, torch.float32)
    assert pipelines.family(pipe) == ("sdxl" if which == "tiny_sdxl" else "sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    size, steps, scale = pipelines.default_size(pipe), 4, 3.0
    prompts = ["a cat", "a dog"]
    shape = pipelines.latent_shape(pipe, size, size)
    start = PerSampleRandn([7, 8], device).randn(shape)
    sigmas = pipelines.sigmas(pipe, steps, device)
    cond, uncond = pipelines.encode_prompts(pipe, prompts, None, size, size, device)
    model = classifier_free(pipelines.denoiser(pipe), scale, cond, uncond)
    x = sample_euler(model, pipelines.initial_latents(PerSampleRandn([7, 8], device), shape, sigmas[0]), sigmas)
    ours = x / (1 + sigmas[-1] ** 2).sqrt()
    ref = pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=scale,
               latents=start.clone(), output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    images = pipelines.decode(pipe, x, sigmas[-1])
    assert images.shape == (2, 3, size, size) and images.abs().max() <= 1


def test_missing_pipeline_is_one_clear_error(tmp_path):
    with pytest.raises(DiffcliError, match="local folder"):
        pipelines.load_pipeline(str(tmp_path / "nothing"), torch.device("cpu"), torch.float32)


def test_size_must_fit_the_unet(tiny_sd):
    pipe = pipelines.load_pipeline(str(tiny_sd), torch.device("cpu"), torch.float32)
    pipelines.check_size(pipe, 16, 48)
    with pytest.raises(DiffcliError, match="multiple of 4"):
        pipelines.check_size(pipe, 16, 18)
