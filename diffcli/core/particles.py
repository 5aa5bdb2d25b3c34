"""Particle-guidance kernels: the gradient of each particle's kernel sum, grad_{x_i} sum_j k(x_i, x_j).

A kernel gradient is a function `(z: (N, ...)) -> (N, ...)`; it never knows which sampler or model it
serves. `diffcli.core.guidance.particle_guidance` turns one into a denoiser.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..shared import registries
from ..shared.registries import having

KernelGrad = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Kernel:
    """One entry of KERNELS: where the kernel reads the particles, which models it serves, and its help line.

    `reads`: "x" (the noisy sample itself), "x0_hat" (the denoiser's estimate), "features" (a feature network's
    of x0_hat: `make_kernel` takes it) or "class denoisers" (the model's class-conditional passes:
    `class_posterior`, `posterior_push`, run by `guidance.class_particle_guidance`). `serves`: "digits" (diffcli
    models, next-frame ones included) and/or "pipelines" (diffusers). `backward`: its gradient reaches x through
    the network (one backward pass a step under --pg-grad exact; EDM's c_skip I under skip).
    """
    reads: str
    serves: tuple[str, ...]
    description: str

    @property
    def reads_x0(self) -> bool:
        """PG evaluates it on x0_hat (every kernel but rbf), not on x."""
        return self.reads != "x"

    @property
    def backward(self) -> bool:
        return self.reads in ("x0_hat", "features")


_BOTH = ("digits", "pipelines")
KERNELS: dict[str, Kernel] = {
    "rbf": Kernel("x", _BOTH, "an RBF on the sample x itself (pixels, or a pipeline's latent)"),
    "x0": Kernel("x0_hat", _BOTH, "an RBF on the denoiser's x0_hat"),
    "classifier": Kernel("features", ("digits",), "an RBF on the digit classifier's 128-d features of x0_hat"),
    "clip": Kernel("features", ("pipelines",), "an RBF on CLIP image features of the decoded x0_hat"),
    "posterior": Kernel("class denoisers", ("digits",), "the chance two particles share a class, from the model's "
                        "own class-conditional denoisers (unconditional sampling, every class a pass)"),
    "centroid": Kernel("features", ("digits",), "an RBF on where the ink of x0_hat is (next-frame models: the "
                       "digit's position)"),
}
MODELS = {"digits": "digit models", "pipelines": "pipelines"}  # what `serves` names, in words


def kernels_for(models: str) -> tuple[str, ...]:
    """The kernels that serve "digits" or "pipelines", in KERNELS' order."""
    return having(KERNELS, lambda k: models in k.serves)


DIGIT_KERNELS = kernels_for("digits")         # diffcli digit models
PIPELINE_KERNELS = kernels_for("pipelines")   # diffusers pipelines (clip: decoded x0_hat through open_clip)
# how a kernel on x0_hat reaches x: exact = through the network (a backward pass), skip = EDM's c_skip(sigma) I
PG_GRADS = ("exact", "skip")


def pairwise_sq_dists(z: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N) squared Euclidean distances (exact zeros on the diagonal)."""
    d2 = (z[:, None, :] - z[None, :, :]).pow(2).sum(-1)
    return d2


def median_bandwidth(d2: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """h = scale * median(d^2 over pairs i != j) / log(N - 1), detached (Corso et al. 2023; scale 1).

    N = 2 would make log(N - 1) = 0 and h infinite (no repulsion at all); log 2 stands in there. A smaller
    scale makes the kernel local (only near neighbours repel), a larger one global.
    """
    n = d2.shape[0]
    off = d2.detach()[~torch.eye(n, dtype=torch.bool, device=d2.device)]
    return scale * off.median().clamp(min=1e-12) / math.log(max(n - 1, 2))


def rbf_grad(z: torch.Tensor, bandwidth: float = 1.0) -> torch.Tensor:
    """Closed form of grad_{z_i} sum_j exp(-|z_i - z_j|^2 / h) = -2/h sum_j k_ij (z_i - z_j), h the median
    heuristic times `bandwidth`.

    It points from the other particles towards z_i's neighbours; PG moves against it (repulsion).
    """
    flat = z.flatten(1).double()  # the sum over D and the median are sensitive in fp32 for big latents
    d2 = pairwise_sq_dists(flat)
    h = median_bandwidth(d2, bandwidth)
    k = torch.exp(-d2 / h)
    grad = -2 / h * (k.sum(1, keepdim=True) * flat - k @ flat)
    return grad.to(z.dtype).view_as(z)


def rbf_energy(z: torch.Tensor, bandwidth: float = 1.0) -> torch.Tensor:
    """0.5 sum_ij k(z_i, z_j) with h detached: its autograd gradient is `rbf_grad` (kernel symmetric)."""
    flat = z.flatten(1)
    d2 = pairwise_sq_dists(flat)
    return 0.5 * torch.exp(-d2 / median_bandwidth(d2, bandwidth)).sum()


def feature_grad(features: Callable[[torch.Tensor], torch.Tensor], bandwidth: float = 1.0) -> KernelGrad:
    """RBF kernel on features f(z): grad_{z_i} sum_j k(f(z_i), f(z_j)) by one vector-Jacobian product.

    The kernel gradient in feature space is closed form (`rbf_grad`); autograd only carries it back
    through f. Works under the samplers' no_grad.
    """
    def grad(z: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z_in = z.detach().requires_grad_(True)
            f = features(z_in).flatten(1)
            g_f = rbf_grad(f.detach(), bandwidth)
            (g,) = torch.autograd.grad((f * g_f).sum(), z_in)
        return g.to(z.dtype)

    return grad


def latent_kernel() -> tuple[KernelGrad, bool]:
    """The RBF kernel on the sample itself (pixels, or a pipeline's latent): (gradient, reads x0_hat = False)."""
    return rbf_grad, False


def make_kernel(name: str, features: Callable[[torch.Tensor], torch.Tensor] | None = None,
                bandwidth: float = 1.0) -> tuple[KernelGrad, bool]:
    """(kernel gradient, whether it reads x0_hat) by name (KERNELS): rbf on x itself, x0 on the denoiser's x0_hat,
    classifier / clip / centroid on `features` of x0_hat (the digit classifier's, `classifier_features`; CLIP's of
    the decoded image, `clip_model.image_features_fn`; the ink centroid, `sequences.centroid`). `bandwidth` scales the median-heuristic bandwidth."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose one of {', '.join(KERNELS)}")
    kernel = KERNELS[name]
    if kernel.reads == "class denoisers":
        raise ValueError(f"the {name} kernel reads the model's class denoisers, not features: "
                         "guidance.class_particle_guidance")
    if kernel.reads != "features":
        grad = rbf_grad if bandwidth == 1.0 else (lambda z: rbf_grad(z, bandwidth))
        return grad, kernel.reads_x0
    if features is None:
        raise ValueError(f"the {name} kernel needs its feature network")
    return feature_grad(features, bandwidth), True


def describe() -> str:
    """KERNELS with their help lines, for the --kernel help."""
    return registries.describe(KERNELS, lambda k: " and ".join(MODELS[m] for m in k.serves))


def project_simplex(w: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of (N, K) onto the probability simplex (sort-based, exact)."""
    u = w.sort(dim=1, descending=True).values
    css = u.cumsum(1) - 1
    k = torch.arange(1, w.shape[1] + 1, device=w.device, dtype=w.dtype)
    rho = (u - css / k > 0).sum(1, keepdim=True)
    tau = css.gather(1, rho - 1) / rho
    return (w - tau).clamp(min=0)


def class_posterior(d_classes: torch.Tensor, d_null: torch.Tensor, iters: int = 200) -> torch.Tensor:
    """The model's own class posterior p(c | x_sigma), (N, K), read from its denoisers at one noise level.

    For exact denoisers E[x0 | x] = sum_c p(c | x) E[x0 | x, c]: the unconditional output is the posterior mix of
    the class-conditional ones (d_classes (N, K, ...), d_null (N, ...)). The posterior is the point of the simplex
    whose mix is nearest d_null, min_w |sum_c w_c (D_c - D_null)|^2 (projected gradient, step 1/L, in float64).
    No classifier: it reads a noisy x at any sigma where the class denoisers differ.
    """
    a = (d_classes.flatten(2) - d_null.flatten(1)[:, None]).double()   # (N, K, D)
    gram = a @ a.transpose(1, 2)                                       # (N, K, K)
    step = 1 / torch.linalg.matrix_norm(gram, ord=2).clamp(min=1e-30)[:, None]
    w = torch.full(gram.shape[:2], 1 / gram.shape[1], dtype=gram.dtype, device=gram.device)
    for _ in range(iters):
        w = project_simplex(w - step * (gram @ w[..., None])[..., 0])
    return w.to(d_null.dtype)


def posterior_push(p: torch.Tensor, d_classes: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    """sigma^2 grad_{x_i} sum_{j != i} k(x_i, x_j) for k = sum_c p(c|x_i) p(c|x_j), the chance two particles share a
    class, through the model's implicit classifier: grad_x log p(c|x) = (D_c - D_bar)/sigma^2, D_bar = sum_c p_c D_c
    (the posterior mix, equal to the unconditional denoiser for exact ones). So

        sigma^2 grad_i = sum_c p_i(c) q_i(c) (D_c(x_i) - D_bar_i),   q_i(c) = sum_{j != i} p_j(c),

    in denoiser units (the sigma^2 of PG cancels): PG pulls each particle away from the classes it shares with the
    others, along the model's own class directions (not a classifier's gradient, which leaves the data). A
    particle alone in its class, or the batch in distinct classes, gets no push.

    `q` (N, K) given: the other particles' mass on each particle's K classes, when each particle runs its own subset
    of the classes (`guidance.class_particle_guidance` with `support`); default: from `p`, the same K classes for all.
    """
    if q is None:
        q = p.sum(0, keepdim=True) - p                   # the other particles' class mass, (N, K)
    weights = (p * q)[(...,) + (None,) * (d_classes.ndim - 2)]
    d_bar = (p[(...,) + (None,) * (d_classes.ndim - 2)] * d_classes).sum(1, keepdim=True)
    return (weights * (d_classes - d_bar)).sum(1)


def classifier_features(classifier: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Digit images (N, C, H, W) in [-1, 1] -> the classifier's 128-d features (colour averaged to grey)."""
    def features(x: torch.Tensor) -> torch.Tensor:
        return classifier.features(x.mean(1, keepdim=True) if x.shape[1] != 1 else x)

    return features
