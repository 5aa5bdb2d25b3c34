"""Particle-guidance kernels: the gradient of each particle's kernel sum, grad_{x_i} sum_j k(x_i, x_j).

A kernel gradient is a function `(z: (N, ...)) -> (N, ...)`; it never knows which sampler or model it
serves. `diffcli.guidance.particle_guidance` turns one into a denoiser.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

KernelGrad = Callable[[torch.Tensor], torch.Tensor]
KERNELS = ("rbf", "classifier")


def pairwise_sq_dists(z: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N) squared Euclidean distances (exact zeros on the diagonal)."""
    d2 = (z[:, None, :] - z[None, :, :]).pow(2).sum(-1)
    return d2


def median_bandwidth(d2: torch.Tensor) -> torch.Tensor:
    """h = median(d^2 over pairs i != j) / log(N - 1), detached (Corso et al. 2023).

    N = 2 would make log(N - 1) = 0 and h infinite (no repulsion at all); log 2 stands in there.
    """
    n = d2.shape[0]
    off = d2.detach()[~torch.eye(n, dtype=torch.bool, device=d2.device)]
    return off.median().clamp(min=1e-12) / math.log(max(n - 1, 2))


def rbf_grad(z: torch.Tensor) -> torch.Tensor:
    """Closed form of grad_{z_i} sum_j exp(-|z_i - z_j|^2 / h) = -2/h sum_j k_ij (z_i - z_j).

    It points from the other particles towards z_i's neighbours; PG moves against it (repulsion).
    """
    flat = z.flatten(1).double()  # the sum over D and the median are sensitive in fp32 for big latents
    d2 = pairwise_sq_dists(flat)
    h = median_bandwidth(d2)
    k = torch.exp(-d2 / h)
    grad = -2 / h * (k.sum(1, keepdim=True) * flat - k @ flat)
    return grad.to(z.dtype).view_as(z)


def rbf_energy(z: torch.Tensor) -> torch.Tensor:
    """0.5 sum_ij k(z_i, z_j) with h detached: its autograd gradient is `rbf_grad` (kernel symmetric)."""
    flat = z.flatten(1)
    d2 = pairwise_sq_dists(flat)
    return 0.5 * torch.exp(-d2 / median_bandwidth(d2)).sum()


def feature_grad(features: Callable[[torch.Tensor], torch.Tensor]) -> KernelGrad:
    """RBF kernel on features f(z): grad_{z_i} sum_j k(f(z_i), f(z_j)) by one vector-Jacobian product.

    The kernel gradient in feature space is closed form (`rbf_grad`); autograd only carries it back
    through f. Works under the samplers' no_grad.
    """
    def grad(z: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z_in = z.detach().requires_grad_(True)
            f = features(z_in).flatten(1)
            g_f = rbf_grad(f.detach())
            (g,) = torch.autograd.grad((f * g_f).sum(), z_in)
        return g.to(z.dtype)

    return grad


def latent_kernel() -> tuple[KernelGrad, bool]:
    """The RBF kernel on the sample itself (pixels, or a pipeline's latent): (gradient, reads x0_hat = False)."""
    return rbf_grad, False


def make_kernel(name: str, classifier: torch.nn.Module | None = None) -> tuple[KernelGrad, bool]:
    """(kernel gradient, whether it reads x0_hat) by name: rbf on x itself, classifier on the digit classifier's
    features of x0_hat."""
    if name == "rbf":
        return latent_kernel()
    if name != "classifier":
        raise ValueError(f"unknown kernel {name!r}; choose one of {', '.join(KERNELS)}")
    if classifier is None:
        raise ValueError("the classifier kernel needs a digit classifier")
    return feature_grad(classifier_features(classifier)), True


def classifier_features(classifier: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Digit images (N, C, H, W) in [-1, 1] -> the classifier's 128-d features (colour averaged to grey)."""
    def features(x: torch.Tensor) -> torch.Tensor:
        return classifier.features(x.mean(1, keepdim=True) if x.shape[1] != 1 else x)

    return features
