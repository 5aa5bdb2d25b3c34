"""The one interface every method is written against: D(x, sigma, **cond) -> x0_hat.

x is in variance-exploding form, x = x0 + sigma * n. Our EDM models are denoisers natively
(`EDMPrecond`); diffusers eps/v-prediction UNets become one through `DiffusersDenoiser`.
"""
from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import nn


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor: ...


# The one channel from a CFG combinator to a sampler that needs the unconditional x0_hat (the CFG++ samplers): the
# sampler calls D(x, sigma, uncond_sink=[]) and the combinator appends D_u to that list (guidance.classifier_free,
# guidance.perturbed_guidance). Wrappers pass keywords through; a denoiser that appends nothing has no D_u.
UNCOND_SINK = "uncond_sink"


def expand_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Scalar or per-sample sigma -> shape (N, 1, 1, ...) broadcastable against x."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


# ---------------------------------------------------------------- EDM (Karras et al. 2022, Table 1)

def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5):
    """c_skip, c_out, c_in, c_noise of EDM preconditioning."""
    s2, sd2 = sigma ** 2, sigma_data ** 2
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * sigma_data / (s2 + sd2).sqrt()
    c_in = 1 / (s2 + sd2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise); F is any net(x, c_noise, class_labels).

    A next-frame model (context_frames > 0) takes `context=` (N, context_frames * C, H, W): the clean
    frames before x, which F sees concatenated to c_in x along channels.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, num_classes: int = 0,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, context_frames: int = 0):
        super().__init__()
        self.net, self.sigma_data, self.num_classes = net, sigma_data, num_classes
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.context_frames = context_frames

    @property
    def null_label(self) -> int:
        """Class index that means 'no label' (label dropout / the unconditional branch of CFG)."""
        return self.num_classes

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        sigma = expand_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        if self.num_classes and class_labels is None:
            class_labels = torch.full((x.shape[0],), self.null_label, device=x.device, dtype=torch.long)
        params = self.net.parameters() if isinstance(self.net, nn.Module) else iter(())
        net_dtype = next(params, x).dtype  # fp16/bf16 nets get cast inputs; the ODE stays fp32
        inp = c_in * x
        if self.context_frames or context is not None:
            want = (x.shape[0], self.context_frames * x.shape[1], *x.shape[2:])
            if context is None or tuple(context.shape) != want:
                raise ValueError(f"this model needs context= of shape {want} (the {self.context_frames} frames "
                                 f"before x), got {None if context is None else tuple(context.shape)}")
            inp = torch.cat([inp, context.to(inp.dtype)], 1)  # context stays unscaled: it is clean data
        f = self.net(inp.to(net_dtype), c_noise.flatten().to(net_dtype), class_labels)
        return c_skip * x + c_out * f.to(torch.float32)


# ---------------------------------------------------------------- diffusers UNets (eps / v prediction)

def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - a_t) / a_t) for every training timestep t (float64 for exact t lookup)."""
    a = alphas_cumprod.double()
    return ((1 - a) / a).sqrt()


def vp_to_ve(x_vp: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """A diffusers latent at noise level sigma (x_vp = sqrt(a) x_ve) -> our form."""
    return x_vp * math.sqrt(1 + float(sigma) ** 2)


def ve_to_vp(x_ve: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    return x_ve / math.sqrt(1 + float(sigma) ** 2)


class DiffusersDenoiser(nn.Module):
    """Adapter: a diffusers UNet predicting eps (SD 1.x/2.x, SDXL, IF) or v, as a denoiser.

    The UNet sees x * sqrt(a_t) at timestep t; continuous sigma maps to t by interpolating
    log-sigma over the training table. `cond` keyword arguments go to the UNet unchanged
    (encoder_hidden_states, added_cond_kwargs, class_labels, ...).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
        self.unet, self.prediction_type = unet, prediction_type
        self.register_buffer("log_sigmas", sigmas_from_alphas_cumprod(alphas_cumprod).log(), persistent=False)
        self.sigma_min = float(self.log_sigmas[0].exp())
        self.sigma_max = float(self.log_sigmas[-1].exp())

    @classmethod
    def from_scheduler(cls, unet: nn.Module, scheduler: Any) -> "DiffusersDenoiser":
        return cls(unet, scheduler.alphas_cumprod, scheduler.config.get("prediction_type", "epsilon"))

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep whose table sigma is `sigma` (piecewise linear in log-sigma)."""
        log_sigma = sigma.double().clamp(min=1e-12).log().to(self.log_sigmas.device)
        ls = self.log_sigmas
        idx = torch.searchsorted(ls, log_sigma).clamp(1, len(ls) - 1)
        lo, hi = ls[idx - 1], ls[idx]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1).double() + w

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        sigma_b = expand_sigma(sigma, x)
        c_in = 1 / (sigma_b ** 2 + 1).sqrt()
        t = self.sigma_to_t(sigma_b.flatten()).to(device=x.device, dtype=torch.float32)
        unet_dtype = next(self.unet.parameters()).dtype
        out = self.unet((x * c_in).to(unet_dtype), t, **cond, return_dict=False)[0].to(torch.float32)
        if out.shape[1] == 2 * x.shape[1]:  # IF predicts (eps, variance): keep eps
            out = out[:, : x.shape[1]]
        if self.prediction_type == "v_prediction":
            # v = sqrt(a) eps - sqrt(1-a) x0 and x_vp = sqrt(a) x0 + sqrt(1-a) eps  =>  eps = sqrt(a) v + sqrt(1-a) x_vp
            out = c_in * out + sigma_b * c_in * (x * c_in)
        return x - sigma_b * out
