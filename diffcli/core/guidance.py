"""Guidance combinators: functions that take a denoiser and return a denoiser, and the one stack of them.

`stack` applies autoguidance to the network (every pass the other terms make runs on the autoguided network),
then CFG and SEG (their passes as ONE network batch), the scheduler's limits on x0_hat, then PG, in that order,
for every command and for the Python API; synchronization (diffcli.core.sync) wraps the result.

Every term has a guidance interval (Kynkaeaeniemi et al. 2024): it acts only at noise levels sigma in (lo, hi]
(`inside`) and is off elsewhere (CFG: the conditional pass alone; AG: the main network alone). The default
(0, inf] is every step, so a term without an interval is exactly the term as it was.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch

from . import attention
from .denoisers import expand_sigma
from .particles import class_posterior, posterior_push
from .query_blur import Blur

REGIONS = ("begin", "mid", "end")  # SEG's thirds of the denoising steps, begin = noisiest


def cat_cond(*conds: Any) -> Any:
    """Concatenate conditioning along the batch: tensors, nested dicts of tensors, or None."""
    first = conds[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(conds)
    if isinstance(first, dict):
        return {k: cat_cond(*(c[k] for c in conds)) for k in first}
    raise TypeError(f"cannot batch conditioning of type {type(first).__name__}")


def level(sigma: torch.Tensor | float) -> float:
    """The one noise level of a call (a batch shares it)."""
    return float(torch.as_tensor(sigma).flatten()[0])


def inside(sigma: torch.Tensor | float, lo: float = 0.0, hi: float = math.inf) -> bool:
    """Is this call's noise level in the guidance interval (lo, hi]?"""
    return lo < level(sigma) <= hi


def everywhere(lo: float, hi: float) -> bool:
    """An interval that holds every noise level a sampler evaluates (sigma > 0)."""
    return lo <= 0.0 and math.isinf(hi)


def classifier_free(model, scale: float, cond: dict[str, Any], uncond: dict[str, Any], lo: float = 0.0,
                    hi: float = math.inf):
    """CFG: D_u + w (D_c - D_u), both passes as ONE batch.

    w = 1 is the plain conditional model (one pass), w = 0 the unconditional one. The 002 seed's
    alpha in (1 - alpha) D_u + alpha D_c is the same number: w = alpha. With an interval (lo, hi] CFG acts only
    there; elsewhere the conditional pass alone runs (w = 1).
    """
    if not everywhere(lo, hi) and scale != 1.0:
        guided = classifier_free(model, scale, cond, uncond)
        plain = classifier_free(model, 1.0, cond, uncond)
        return lambda x, sigma, **kw: (guided if inside(sigma, lo, hi) else plain)(x, sigma, **kw)
    if scale == 1.0:
        return lambda x, sigma, **kw: model(x, sigma, **cond, **kw)
    if scale == 0.0:
        return lambda x, sigma, **kw: model(x, sigma, **uncond, **kw)
    both = cat_cond(uncond, cond)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        d_u, d_c = model(torch.cat([x, x]), torch.cat([sigma, sigma]), **both, **kw).chunk(2)
        return d_u + scale * (d_c - d_u)

    return denoise


def smoothed_energy(model, seg_scale: float, guidance: float, cond: dict[str, Any], uncond: dict[str, Any],
                    state, blur_at: Callable[[torch.Tensor], Any], cfg_lo: float = 0.0, cfg_hi: float = math.inf):
    """SEG (Hong 2024): D_c + s (D_c - D_seg), plus the CFG term (D = D_u + w (D_c - D_u) + s (D_c - D_seg)).

    D_seg is the same model with the query of chosen self-attention layers blurred. `state`
    (`attention.SegState`) tells the processors the roles of the batch chunks and the blur; `blur_at(sigma)`
    gives the blur for this step, or None outside the guided steps, where only the CFG passes run. All passes
    of a step go through the model as ONE batch, the perturbed chunk last. As the official code, guidance w of 0
    or 1 means SEG without CFG (the conditional pass only); s = 0 is plain CFG. CFG's interval (cfg_lo, cfg_hi]:
    outside it the step runs as w = 1 (SEG without CFG).
    """
    if not everywhere(cfg_lo, cfg_hi) and guidance not in (0.0, 1.0):
        guided = smoothed_energy(model, seg_scale, guidance, cond, uncond, state, blur_at)
        plain = smoothed_energy(model, seg_scale, 1.0, cond, uncond, state, blur_at)
        return lambda x, sigma, **kw: (guided if inside(sigma, cfg_lo, cfg_hi) else plain)(x, sigma, **kw)
    use_cfg = guidance not in (0.0, 1.0)
    plain = classifier_free(model, guidance if use_cfg else 1.0, cond, uncond)
    roles = ("uncond", "cond", "seg") if use_cfg else ("cond", "seg")
    batched = cat_cond(*(uncond if role == "uncond" else cond for role in roles))

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        blur = blur_at(sigma) if seg_scale else None
        state.latent_hw, state.sigma = tuple(x.shape[-2:]), float(torch.as_tensor(sigma).flatten()[0])
        if blur is None:
            state.roles, state.blur = roles[:-1], None
            return plain(x, sigma, **kw)
        k = len(roles)
        state.roles, state.blur = roles, blur
        try:
            parts = model(torch.cat([x] * k), torch.cat([sigma] * k), **batched, **kw).chunk(k)
        finally:
            state.blur = None  # a later call that forgets to set it must not blur
        d_c, d_seg = parts[-2], parts[-1]
        guided = parts[0] + guidance * (d_c - parts[0]) if use_cfg else d_c
        return guided + seg_scale * (d_c - d_seg)

    return denoise


def particle_guidance(model, factor: float, kernel_grad, sigma_min: float = 0.0, sigma_max: float = float("inf"),
                      on_denoised: bool = False, sigma_data: float = 0.5, exact: bool = False):
    """PG (Corso et al. 2023) as a denoiser: D'(x) = D(x) - factor * sigma^2 * grad_x_i sum_j k(x_i, x_j).

    The sampler's derivative (x - D')/sigma is then (x - D)/sigma + factor * sigma * grad, the PG term of
    dx/dsigma. Sampling runs sigma downwards (dsigma < 0), so each step moves x_i AGAINST the kernel
    gradient, away from its neighbours: factor > 0 repels (the 001 thesis code subtracted the term from
    dx/dsigma, which attracts). Every sampler runs it unchanged; the batch is the particle set.

    `kernel_grad` maps (N, ...) -> (N, ...) (see diffcli.core.particles). PG acts only where
    sigma_min < sigma <= sigma_max (its guidance interval). With `on_denoised` the kernel reads x0_hat
    instead of x (features of noise say nothing), and its gradient comes back to x through the denoiser:
    `exact` by one vector-Jacobian product through the network (J_D(x)^T grad, a backward pass per step), else
    through the Jacobian D has for Gaussian data of std sigma_data, sigma_data^2 / (sigma^2 + sigma_data^2) I
    (EDM's c_skip, no backward pass). The latter is about 4e-5 at sigma = 80: it drops nearly all of how x0_hat
    depends on x at the noise levels where a sample's class or layout is decided, which the exact product keeps.
    factor = 0 returns `model` itself, so it is exactly plain sampling.
    """
    if factor == 0.0:
        return model

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        if not inside(sigma, sigma_min, sigma_max):  # one noise level for the whole particle set
            return model(x, sigma, **kw)
        sigma_b = expand_sigma(sigma, x)
        if on_denoised and exact:
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                denoised = model(x_in, sigma, **kw)
                (grad,) = torch.autograd.grad(denoised, x_in, kernel_grad(denoised.detach()).to(denoised.dtype))
            denoised = denoised.detach()
        elif on_denoised:
            denoised = model(x, sigma, **kw)
            grad = kernel_grad(denoised) * sigma_data ** 2 / (sigma_b ** 2 + sigma_data ** 2)
        else:
            denoised = model(x, sigma, **kw)
            grad = kernel_grad(x)
        return denoised - factor * sigma_b ** 2 * grad

    return denoise


def class_particle_guidance(model, factor: float, classes: int, uncond: dict[str, Any], sigma_min: float = 0.0,
                            sigma_max: float = float("inf")):
    """PG with the class-posterior kernel of a class-conditional model (labels 0..classes-1, `classes` the null
    label): D'(x_i) = D_null(x_i) - factor * sum_c p_i(c) q_i(c) (D_c(x_i) - D_bar_i) (particles.posterior_push),
    the posterior p read from the same denoisers (particles.class_posterior). Inside the sigma window every class
    and the null label run as ONE network batch (classes + 1 times the rows); outside it, only the null pass.
    `uncond` is the batch's conditioning without labels (a next-frame model's context rides along).
    """
    def null(n: int, device) -> dict[str, Any]:
        return {**uncond, "class_labels": torch.full((n,), classes, device=device, dtype=torch.long)}

    if factor == 0.0:
        return lambda x, sigma, **kw: model(x, sigma, **null(x.shape[0], x.device), **kw)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        n, k = x.shape[0], classes + 1
        if not inside(sigma, sigma_min, sigma_max):
            return model(x, sigma, **null(n, x.device), **kw)
        labels = torch.arange(k, device=x.device).repeat_interleave(n)  # chunk c: label c; the last: null
        every = {**cat_cond(*([uncond] * k)), "class_labels": labels}
        out = model(torch.cat([x] * k), expand_sigma(sigma, x).flatten().repeat(k), **every, **kw)
        out = out.view(k, n, *x.shape[1:]).transpose(0, 1)   # (N, classes + 1, ...)
        d_classes, d_null = out[:, :classes], out[:, classes]
        p = class_posterior(d_classes, d_null)
        return d_null - factor * posterior_push(p, d_classes)

    return denoise


def autoguided(model, guide, scale: float, lo: float = 0.0, hi: float = math.inf):
    """Autoguidance (Karras et al. 2024): D = D_guide + w (D_main - D_guide), edm2's `gnet(x).lerp(net(x), w)`.

    `guide` is a weaker denoiser of the same data and conditioning (a smaller, shorter-trained model); it gets
    exactly the call `model` gets (the same x, sigma and conditioning), so every pass another term makes (CFG's
    unconditional one, SEG's perturbed one) runs on the autoguided network. Acts at sigma in (lo, hi]; elsewhere
    `model` alone. w = 1 returns `model` itself (no guide pass), so switching it off is bit for bit the run without.
    """
    if scale == 1.0:
        return model

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        d_main = model(x, sigma, **kw)
        if not inside(sigma, lo, hi):
            return d_main
        return guide(x, sigma, **kw).to(d_main.dtype).lerp(d_main, scale)

    return denoise


@dataclass
class Autoguide:
    """Autoguidance settings: the guide denoiser (same interface and conditioning as the main one), the scale w and
    the interval (sigma_min, sigma_max]. `net`: the guide's module that holds its attention layers, where SEG
    installs its processors too (so SEG's perturbed pass is perturbed in both networks)."""
    guide: Callable[..., torch.Tensor]
    scale: float
    sigma_min: float = 0.0
    sigma_max: float = math.inf
    net: torch.nn.Module | None = None


# ---------------------------------------------------------------- SEG: which steps are guided, with which blur

def region(step: int, steps: int) -> str:
    """begin / mid / end third of the denoising steps (begin = noisiest)."""
    return REGIONS[min(2, 3 * step // steps)]


def guided_steps(sigmas: torch.Tensor, regions: list[str], sigma_start: float = math.inf,
                 sigma_end: float = 0.0) -> list[bool]:
    """Per step: does it run the perturbed pass? Inside the chosen regions AND the guidance interval (end, start]."""
    levels = sigmas[:-1].tolist()
    return [region(i, len(levels)) in regions and sigma_end < s <= sigma_start for i, s in enumerate(levels)]


def step_index(sigmas: torch.Tensor, sigma: torch.Tensor | float) -> int:
    """The step whose noise level is nearest `sigma` (a multi-evaluation step's second call, at the next level,
    counts as the next step; a churned sigma_hat as its own step)."""
    s = float(torch.as_tensor(sigma).flatten()[0])
    levels = sigmas[:-1].tolist()
    return min(range(len(levels)), key=lambda i: abs(levels[i] - s))


def blur_schedule(blur: Blur, sigmas: torch.Tensor, guided: list[bool]) -> Callable[[torch.Tensor], Blur | None]:
    """sigma -> the blur of that step (EMA's alpha ramps over all the steps), or None on unguided steps."""
    last = max(len(guided) - 1, 1)

    def at(sigma: torch.Tensor) -> Blur | None:
        i = step_index(sigmas, sigma)
        return blur.at(i / last) if guided[i] else None

    return at


@dataclass
class Seg:
    """SEG for one run: the scale, the blur, the guided steps, and the processors' shared state.

    `installed(unet)` puts the query-blurring processors on the perturbed layers for the duration of a run.
    """
    scale: float
    blur: Blur
    layers: list[str]
    regions: list[str] = field(default_factory=lambda: list(REGIONS))
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    state: attention.SegState = field(default_factory=attention.SegState)

    def schedule(self, sigmas: torch.Tensor) -> Callable[[torch.Tensor], Blur | None]:
        return blur_schedule(self.blur, sigmas, guided_steps(sigmas, self.regions, self.sigma_start, self.sigma_end))

    @contextlib.contextmanager
    def installed(self, unet: torch.nn.Module, tracked: list[str] = (),
                  recorder: list[dict[str, Any]] | None = None) -> Iterator[list[str]]:
        """Install on `unet`'s chosen self-attention layers; yields their module paths."""
        paths = attention.resolve_layers(unet, self.layers)
        with attention.installed(unet, self.state, paths, tracked, recorder):
            yield paths


@dataclass
class PG:
    """Particle guidance settings: factor, kernel gradient (diffcli.core.particles) and the sigma window."""
    factor: float
    kernel_grad: Callable[[torch.Tensor], torch.Tensor]
    on_denoised: bool = False
    sigma_min: float = 0.0
    sigma_max: float = math.inf
    exact: bool = False    # kernels on x0_hat: the gradient through the network (a backward pass) or c_skip I
    sigma_data: float = 0.5
    classes: int = 0       # > 0: the class-posterior kernel over this many classes (class_particle_guidance)


def stack(model, cfg: float, cond: dict[str, Any], uncond: dict[str, Any], sigmas: torch.Tensor,
          seg: Seg | None = None, limit: Callable | None = None, pg: PG | None = None, ag: Autoguide | None = None,
          cfg_interval: tuple[float, float] = (0.0, math.inf)):
    """The guided denoiser every command samples: AG on the network -> CFG (+ SEG in the same batch) -> `limit` -> PG.

    `seg` None or scale 0 is exactly `classifier_free`, PG None or factor 0 exactly no PG, AG None or scale 1
    exactly the main network, the CFG interval (0, inf] exactly CFG at every step, so switching a method
    off reproduces the command without it bit for bit. `limit` is a combinator for the scheduler's bounds on
    x0_hat (pipelines.clip_x0); PG comes after it so the bounds never cut the repulsion. PG with the class-posterior
    kernel (`pg.classes`) runs the model's class passes itself: unconditional sampling, no SEG, no limit.
    """
    if ag is not None:
        model = autoguided(model, ag.guide, ag.scale, ag.sigma_min, ag.sigma_max)
    if pg is not None and pg.classes:
        return class_particle_guidance(model, pg.factor, pg.classes, uncond, pg.sigma_min, pg.sigma_max)
    if seg is None or seg.scale == 0:
        denoiser = classifier_free(model, cfg, cond, uncond, *cfg_interval)
    else:
        denoiser = smoothed_energy(model, seg.scale, cfg, cond, uncond, seg.state, seg.schedule(sigmas),
                                   *cfg_interval)
    if limit is not None:
        denoiser = limit(denoiser)
    if pg is not None:
        denoiser = particle_guidance(denoiser, pg.factor, pg.kernel_grad, pg.sigma_min, pg.sigma_max,
                                     on_denoised=pg.on_denoised, sigma_data=pg.sigma_data, exact=pg.exact)
    return denoiser


@dataclass
class Guidance:
    """The guidance terms of one run: the CFG scale and its interval, SEG (None: off), PG (None: off) and
    autoguidance (None: off).

    Each term says what it puts in the network for the run (`installed`: SEG's query-blurring processors on its
    layers, in the guide's network too under AG; CFG, PG and AG install nothing) and how it wraps the denoiser
    (`denoiser`: `stack`, in its one order). A term switched off is absent, so the run is bit for bit the run
    without it.
    """
    cfg: float = 1.0
    seg: Seg | None = None
    pg: PG | None = None
    ag: Autoguide | None = None
    cfg_interval: tuple[float, float] = (0.0, math.inf)  # CFG acts at sigma in (lo, hi]

    @contextlib.contextmanager
    def installed(self, net: torch.nn.Module) -> Iterator[None]:
        """What the terms install in `net` (the module holding the attention layers) for the duration."""
        guide_net = self.ag.net if self.ag is not None and self.seg is not None else None
        with self.seg.installed(net) if self.seg is not None else contextlib.nullcontext(), \
                self.seg.installed(guide_net) if guide_net is not None else contextlib.nullcontext():
            yield

    def with_guide(self, wrap: Callable[[Callable], Callable]) -> "Guidance":
        """The same terms with the guide denoiser wrapped (as the caller wraps its main network, e.g. in fixed
        batch groups); itself without AG."""
        return self if self.ag is None else replace(self, ag=replace(self.ag, guide=wrap(self.ag.guide)))

    def denoiser(self, model, cond: dict[str, Any], uncond: dict[str, Any], sigmas: torch.Tensor | None,
                 limit: Callable | None = None):
        """`model` guided by the terms (see `stack`)."""
        return stack(model, self.cfg, cond, uncond, sigmas, seg=self.seg, limit=limit, pg=self.pg, ag=self.ag,
                     cfg_interval=self.cfg_interval)
