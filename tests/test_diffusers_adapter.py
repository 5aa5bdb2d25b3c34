"""Our denoiser adapter + Euler sampler over a diffusers UNet reproduce the diffusers DDIM scheduler loop."""
from __future__ import annotations

import pytest
import torch

from diffcli.core.denoisers import DiffusersDenoiser, ve_to_vp, vp_to_ve
from diffcli.core.samplers import get_sigmas_scheduler, sample_ddim, sample_euler


def tiny_unet():
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


def scheduler(prediction_type: str, set_alpha_to_one: bool):
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=1,
                         prediction_type=prediction_type)


@pytest.mark.parametrize("prediction_type,set_alpha_to_one", [("epsilon", False), ("epsilon", True),
                                                               ("v_prediction", False)])
@torch.no_grad()
def test_euler_equals_diffusers_ddim(prediction_type, set_alpha_to_one):
    unet = tiny_unet()
    steps = 12
    latents0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    ref_sched = scheduler(prediction_type, set_alpha_to_one)
    ref_sched.set_timesteps(steps)
    latents = latents0 * ref_sched.init_noise_sigma
    for t in ref_sched.timesteps:
        out = unet(ref_sched.scale_model_input(latents, t), t).sample
        latents = ref_sched.step(out, t, latents, eta=0.0).prev_sample

    sched = scheduler(prediction_type, set_alpha_to_one)
    denoiser = DiffusersDenoiser.from_scheduler(unet, sched)
    sigmas = get_sigmas_scheduler(sched, steps)
    x = vp_to_ve(latents0, sigmas[0])
    ours = ve_to_vp(sample_euler(denoiser, x, sigmas), sigmas[-1])
    assert (sigmas[-1] == 0) == set_alpha_to_one
    assert torch.allclose(ours, latents, atol=1e-4, rtol=1e-4), (ours - latents).abs().max()
    # and DDIM with eta = 0 is the same Euler step
    assert torch.allclose(ve_to_vp(sample_ddim(denoiser, x, sigmas, eta=0.0), sigmas[-1]), ours, atol=1e-6)


def test_sigma_to_t_hits_table_timesteps():
    sched = scheduler("epsilon", False)
    d = DiffusersDenoiser.from_scheduler(tiny_unet(), sched)
    a = sched.alphas_cumprod.double()
    for t in (0, 1, 37, 500, 999):
        sigma = ((1 - a[t]) / a[t]).sqrt()
        assert d.sigma_to_t(sigma.reshape(1)).item() == pytest.approx(t, abs=1e-6)
    # half way in log-sigma between two entries lands half way between the timesteps
    s = torch.exp((d.log_sigmas[10] + d.log_sigmas[11]) / 2)
    assert d.sigma_to_t(s.reshape(1)).item() == pytest.approx(10.5, abs=1e-6)


def test_if_style_six_channel_output_uses_eps_half():
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=6, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    sched = scheduler("epsilon", True)
    d = DiffusersDenoiser.from_scheduler(unet, sched)
    x, sigma = torch.randn(1, 3, 8, 8), torch.tensor([2.0])
    with torch.no_grad():
        t = d.sigma_to_t(sigma).float()
        eps = unet(x / (1 + 4) ** 0.5, t).sample[:, :3]
        assert torch.allclose(d(x, sigma), x - 2.0 * eps, atol=1e-5)
