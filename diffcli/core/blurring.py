"""Blurring diffusion (Hoogeboom & Salimans, ICLR 2023), the 004 seed: schedule, forward process, loss, sampler.

In the DCT basis u = DCT(x) the forward process is, per frequency,

    q(u_t | u_x) = N(alpha_t d_t u_x, sigma_t^2 I),   d_t = (1 - d_min) exp(-lambda tau_t) + d_min,

lambda = (pi f_h / H)^2 + (pi f_w / W)^2, tau_t = sigma_B(t)^2 / 2, sigma_B(t) = sigma_B,max sin^2(pi t / 2):
heat dissipation of the image (a Gaussian blur of std sigma_B(t) px) under the usual cosine noise schedule,
logSNR from 10 at t = 0 to -10 at t = 1. The net predicts eps in pixel space from z_t = IDCT(u_t) and t
(paper Algorithm 1); sampling is the paper's ancestral step (its `denoise`). With sigma_B,max = 0 every d_t
is exactly 1 and all of this is plain DDPM-style (VDM) diffusion (tested against a scalar implementation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..shared.errors import DiffcliError
from .dct import dct2, idct2

SAMPLERS = ("ancestral",)  # the paper's reverse process; EDM's ODE samplers assume isotropic noise
DEFAULT_STEPS = 100  # the seed's T
VAR_FLOOR = 1e-6  # floor on sigma_s^2 and on the denoising precision (the paper's delta, 1e-8; neither binds at logSNR <= 10)


@dataclass(frozen=True)
class BlurSchedule:
    """The process's constants under the paper's names; `alphas_sigmas` is its `get_alpha_sigma`."""
    blur_sigma_max: float = 20.0
    d_min: float = 0.001
    logsnr_min: float = -10.0
    logsnr_max: float = 10.0

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """Cosine schedule -2 log tan(pi t / 2), squeezed (by t's range, not a clamp) to [logsnr_min, logsnr_max]."""
        lo = math.atan(math.exp(-0.5 * self.logsnr_max))
        span = math.atan(math.exp(-0.5 * self.logsnr_min)) - lo
        return -2 * torch.log(torch.tan(lo + span * t.double()))

    def noise_scaling(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, sigma_t) of the cosine schedule, variance preserving: a^2 + sigma^2 = 1."""
        logsnr = self.logsnr(t)
        return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()

    def damping(self, t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """d_t per frequency, shape (B, 1, H, W): 1 at frequency (0, 0) and wherever sigma_B(t) = 0, falling to d_min."""
        tau = (self.blur_sigma_max * torch.sin(math.pi * t.double() / 2) ** 2) ** 2 / 2
        decay = -torch.expm1(-frequencies_squared(size, t.device)[None, None] * tau.reshape(-1, 1, 1, 1))
        # 1 - (1 - d_min)(1 - e^{-lambda tau}) is the paper's d_t, written so that tau = 0 gives exactly 1.
        return 1 - (1 - self.d_min) * decay

    def alphas_sigmas(self, t: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t = a_t d_t per frequency (B, 1, H, W) and sigma_t (B, 1, 1, 1), float64 (cast at use)."""
        a, sigma = self.noise_scaling(t)
        return a.reshape(-1, 1, 1, 1) * self.damping(t, size), sigma.reshape(-1, 1, 1, 1)


def frequencies_squared(size: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """lambda[i, j] = (pi i / H)^2 + (pi j / W)^2, the heat equation's decay rate of DCT basis function (i, j)."""
    h, w = size
    fh = (math.pi * torch.arange(h, dtype=torch.float64, device=device) / h) ** 2
    fw = (math.pi * torch.arange(w, dtype=torch.float64, device=device) / w) ** 2
    return fh[:, None] + fw[None, :]


def _f32(*tensors: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Coefficients are computed in float64 (logSNR 10 leaves 4.5e-5 of variance); images stay float32."""
    return [t.to(device=device, dtype=torch.float32) for t in tensors]


def diffuse(x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: BlurSchedule) -> torch.Tensor:
    """z_t = IDCT(alpha_t DCT(x)) + sigma_t noise: a draw from q(z_t | x) given the noise (pixel space)."""
    alpha, sigma = _f32(*schedule.alphas_sigmas(t, tuple(x.shape[-2:])), device=x.device)
    return idct2(alpha * dct2(x)) + sigma * noise


def blurred_mean(x: torch.Tensor, t: torch.Tensor, schedule: BlurSchedule) -> torch.Tensor:
    """IDCT(d_t DCT(x)): the image the process blurs towards at time t, before scaling and noise (for pictures)."""
    d = schedule.damping(t, tuple(x.shape[-2:])).to(device=x.device, dtype=torch.float32)
    return idct2(d * dct2(x))


def reverse_step(z_t: torch.Tensor, eps_hat: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                 schedule: BlurSchedule, noise: torch.Tensor | None, clip_denoised: bool = False) -> torch.Tensor:
    """The paper's `denoise`: one ancestral step z_t -> z_s (s < t) of q(u_s | u_t, u_x = u_x_hat), per frequency.

    `noise` (None for the mean) is white pixel noise taken to DCT space, so that with sigma_B,max = 0 this is a
    plain DDPM step with the very same draws. `clip_denoised` keeps x_hat = IDCT(u_x_hat) in the data range
    [-1, 1], as DDPM's sampler does (Ho et al.'s `clip_denoised`; not in the blurring paper's Algorithm). It is
    only sound without blur: u_x_hat = (u_t - sigma_t u_eps_hat) / alpha_t multiplies eps_hat's error by up to
    sigma_t / (a_t d_min) ~ 1.5e5 at high frequencies, and the clamp spreads that error into all of them.
    """
    size = tuple(z_t.shape[-2:])
    alpha_s, sigma_s = schedule.alphas_sigmas(s, size)
    alpha_t, sigma_t = schedule.alphas_sigmas(t, size)
    alpha_ts = alpha_t / alpha_s
    sigma2_ts = sigma_t ** 2 - alpha_ts ** 2 * sigma_s ** 2
    sigma2_s = sigma_s ** 2
    var = 1 / (1 / sigma2_s.clamp(min=VAR_FLOOR) + alpha_ts ** 2 / sigma2_ts).clamp(min=VAR_FLOOR)
    c_t = alpha_ts * var / sigma2_ts  # weight of u_t
    c_x = var / (alpha_ts * sigma2_s.clamp(min=VAR_FLOOR))  # weight of u_t - sigma_t u_eps (= alpha_t u_x_hat)
    c_t, c_x, var, sigma_t, alpha_t = _f32(c_t, c_x, var, sigma_t, alpha_t, device=z_t.device)
    u_t = dct2(z_t)
    signal = u_t - sigma_t * dct2(eps_hat.float())  # alpha_t u_x_hat
    if clip_denoised:
        signal = alpha_t * dct2(idct2(signal / alpha_t).clamp(-1, 1))
    u_s = c_t * u_t + c_x * signal
    if noise is not None:
        u_s = u_s + var.sqrt() * dct2(noise)
    return idct2(u_s)


def get_ts(steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """steps + 1 times from 1 down to 0, evenly spaced (the paper's t = i / T)."""
    return torch.linspace(1, 0, steps + 1, dtype=torch.float64, device=device)


@torch.no_grad()
def sample_blurring(model, z: torch.Tensor, ts: torch.Tensor, schedule: BlurSchedule, extra_args=None,
                    callback: Callable[[dict[str, Any]], None] | None = None,
                    noise: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
                    clip_denoised: bool = False) -> torch.Tensor:
    """Ancestral sampling from z = z_{ts[0]} ~ N(0, I) with an eps-predictor model(z, t, **extra_args).

    The last step (to t = 0) returns its mean: its noise (std ~0.007) would only dither the image.
    callback gets (x, i, t, t_next, eps) after each step.
    """
    extra_args = extra_args or {}
    for i in range(len(ts) - 1):
        t, s = ts[i].expand(z.shape[0]), ts[i + 1].expand(z.shape[0])
        eps = model(z, t.float(), **extra_args)
        z = reverse_step(z, eps, t, s, schedule, noise(z) if i < len(ts) - 2 else None, clip_denoised)
        if callback is not None:
            callback({"x": z, "i": i, "t": ts[i], "t_next": ts[i + 1], "eps": eps})
    return z


# ---------------------------------------------------------------- model and training loss

class BlurringModel(nn.Module):
    """eps_hat = net(z_t, 1000 t, class_labels): the paper's eps-prediction net on our UNet.

    The time is scaled to DDPM's 0..1000 range, which the UNet's sinusoidal embedding was designed for.
    Same attributes as EDMPrecond (`net`, `num_classes`, `null_label`) so training, EMA, CFG and IO are shared.
    """

    def __init__(self, net: nn.Module, schedule: BlurSchedule, num_classes: int = 0):
        super().__init__()
        self.net, self.schedule, self.num_classes = net, schedule, num_classes

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, z: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes and class_labels is None:
            class_labels = torch.full((z.shape[0],), self.null_label, device=z.device, dtype=torch.long)
        net_dtype = next(self.net.parameters(), z).dtype
        t = torch.as_tensor(t, device=z.device, dtype=torch.float32).expand(z.shape[0])
        return self.net(z.to(net_dtype), (1000 * t).to(net_dtype), class_labels).to(torch.float32)


@dataclass
class BlurringLoss:
    """Paper Algorithm 1: t ~ U(0, 1), z_t ~ q(z_t | x), unweighted MSE between eps and the net's eps_hat."""
    blur_sigma_max: float = 20.0
    d_min: float = 0.001

    @property
    def schedule(self) -> BlurSchedule:
        return BlurSchedule(self.blur_sigma_max, self.d_min)

    def process_record(self) -> dict[str, Any]:
        """What a checkpoint says about its process (`load_model` and `diffcli sample` read it)."""
        s = self.schedule
        return {"kind": "blurring", "blur_sigma_max": s.blur_sigma_max, "d_min": s.d_min,
                "logsnr_min": s.logsnr_min, "logsnr_max": s.logsnr_max, "prediction": "eps"}

    def draw(self, batch: int, shape: tuple[int, ...], gen: torch.Generator):
        """The random part of one step for the whole global batch, as EDMLoss.draw: (t, noise)."""
        return torch.rand(batch, generator=gen), torch.randn((batch, *shape), generator=gen)

    def __call__(self, model: nn.Module, images: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                 labels: torch.Tensor | None) -> torch.Tensor:
        z_t = diffuse(images, t, noise, self.schedule)
        return ((model(z_t, t, labels).float() - noise) ** 2).mean()


def schedule_of(meta: dict[str, Any]) -> BlurSchedule:
    return BlurSchedule(meta["blur_sigma_max"], meta["d_min"], meta["logsnr_min"], meta["logsnr_max"])


def check_blur_sigma(value: float) -> float:
    """blur_sigma_max (sigma_B,max), checked: finite and >= 0."""
    if not (math.isfinite(value) and value >= 0):
        raise DiffcliError(f"blur_sigma_max must be a finite number >= 0 (0 = plain diffusion), got {value}")
    return float(value)
