"""Guidance combinators: functions that take a denoiser and return a denoiser, and the one stack of them.

`stack` applies autoguidance to the network (every pass the other terms make runs on the autoguided network),
then CFG (or its APG / CFG-Zero* rule), SEG and PAG (their passes as ONE network batch), the scheduler's limits on
x0_hat, then PG, in that order, for every command and for the Python API; synchronization (diffcli.core.sync)
wraps the result.

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
from .denoisers import UNCOND_SINK, expand_sigma
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


def classifier_free(model, scale: float, cond: dict[str, Any], uncond: dict[str, Any], rule=None, lo: float = 0.0,
                    hi: float = math.inf):
    """CFG: D_u + w (D_c - D_u), both passes as ONE batch.

    w = 1 is the plain conditional model (one pass), w = 0 the unconditional one. The 002 seed's
    alpha in (1 - alpha) D_u + alpha D_c is the same number: w = alpha. `rule(d_u, d_c, x, sigma)` replaces the
    combination (APG, CFG-Zero*; both passes run whatever w). A caller that passes `uncond_sink=[...]` (the CFG++
    samplers) gets D_u appended to it: the unconditional pass runs then even at w = 1. With an interval (lo, hi]
    CFG acts only there; elsewhere the conditional pass alone runs (w = 1).
    """
    if not everywhere(lo, hi) and (scale != 1.0 or rule is not None):
        guided = classifier_free(model, scale, cond, uncond, rule)
        plain = classifier_free(model, 1.0, cond, uncond)
        return lambda x, sigma, **kw: (guided if inside(sigma, lo, hi) else plain)(x, sigma, **kw)
    if rule is None and scale in (0.0, 1.0):
        one = cond if scale == 1.0 else uncond

        def single(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
            sink = kw.pop(UNCOND_SINK, None)
            if sink is None or scale == 0.0:
                out = model(x, sigma, **one, **kw)
                if sink is not None:
                    sink.append(out)
                return out
            d_u, d_c = model(torch.cat([x, x]), torch.cat([sigma, sigma]), **cat_cond(uncond, cond), **kw).chunk(2)
            sink.append(d_u)
            return d_c

        return single
    both = cat_cond(uncond, cond)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        sink = kw.pop(UNCOND_SINK, None)
        d_u, d_c = model(torch.cat([x, x]), torch.cat([sigma, sigma]), **both, **kw).chunk(2)
        if sink is not None:
            sink.append(d_u)
        return d_u + scale * (d_c - d_u) if rule is None else rule(d_u, d_c, x, sigma)

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
    return perturbed_guidance(model, guidance, cond, uncond, state, seg_scale=seg_scale, blur_at=blur_at,
                              cfg_lo=cfg_lo, cfg_hi=cfg_hi)


def perturbed_guidance(model, guidance: float, cond: dict[str, Any], uncond: dict[str, Any], state,
                       seg_scale: float = 0.0, blur_at: Callable[[torch.Tensor], Any] | None = None,
                       pag_scale: float = 0.0, pag_at: Callable[[torch.Tensor], bool] | None = None,
                       rule: "Callable | None" = None, cfg_lo: float = 0.0, cfg_hi: float = math.inf):
    """CFG with SEG and PAG in ONE network batch: D = D_u + w (D_c - D_u) + s (D_c - D_seg) + p (D_c - D_pag).

    The batch's chunks are, of (uncond, cond, seg, pag), those this step needs; `state` (`attention.SegState`)
    tells the processors their roles, the blur of the "seg" chunk (`blur_at(sigma)`, None on unguided steps) and
    whether the "pag" chunk takes identity attention (`pag_at(sigma)`, default every step while p > 0). As the
    official SEG code, w of 0 or 1 means no CFG pass (the conditional pass only, D_c + ...). `rule` replaces the
    CFG combination D_u + w (D_c - D_u) (APG, CFG-Zero*: `Rule.combiner`), called as rule(d_u, d_c, x, sigma).
    With p = 0 this is exactly `smoothed_energy`'s denoiser, with s = 0 too exactly `classifier_free`. CFG's
    interval (cfg_lo, cfg_hi]: outside it the step runs as w = 1 (the perturbed terms without CFG).
    """
    if not everywhere(cfg_lo, cfg_hi) and (guidance not in (0.0, 1.0) or rule is not None):
        guided = perturbed_guidance(model, guidance, cond, uncond, state, seg_scale, blur_at, pag_scale, pag_at, rule)
        plain = perturbed_guidance(model, 1.0, cond, uncond, state, seg_scale, blur_at, pag_scale, pag_at)
        return lambda x, sigma, **kw: (guided if inside(sigma, cfg_lo, cfg_hi) else plain)(x, sigma, **kw)
    use_cfg = guidance not in (0.0, 1.0) or rule is not None
    plain = classifier_free(model, guidance if use_cfg else 1.0, cond, uncond, rule)
    batches: dict[tuple[str, ...], Any] = {}

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        blur = blur_at(sigma) if seg_scale and blur_at is not None else None
        pag = bool(pag_scale) and (pag_at is None or pag_at(sigma))
        state.latent_hw, state.sigma = tuple(x.shape[-2:]), float(torch.as_tensor(sigma).flatten()[0])
        if blur is None and not pag:
            state.roles, state.blur, state.identity = ("uncond",) * use_cfg + ("cond",), None, False
            return plain(x, sigma, **kw)
        sink = kw.pop(UNCOND_SINK, None)
        has_u = use_cfg or sink is not None  # a CFG++ sampler needs D_u even without CFG
        roles = ("uncond",) * has_u + ("cond",) + ("seg",) * (blur is not None) + ("pag",) * pag
        if roles not in batches:
            batches[roles] = cat_cond(*(uncond if role == "uncond" else cond for role in roles))
        k = len(roles)
        state.roles, state.blur, state.identity = roles, blur, pag
        try:
            parts = model(torch.cat([x] * k), torch.cat([sigma] * k), **batches[roles], **kw).chunk(k)
        finally:
            state.blur, state.identity = None, False  # a later call that forgets to set them must not perturb
        d_c = parts[has_u]
        if rule is not None:
            guided = rule(parts[0], d_c, x, sigma)
        else:
            guided = parts[0] + guidance * (d_c - parts[0]) if use_cfg else d_c
        if sink is not None:
            sink.append(parts[0])
        if blur is not None:
            guided = guided + seg_scale * (d_c - parts[has_u + 1])
        if pag:
            guided = guided + pag_scale * (d_c - parts[-1])
        return guided

    return denoise


# ---------------------------------------------------------------- CFG rules: APG and CFG-Zero*

def apg_update(d_c: torch.Tensor, d_u: torch.Tensor, eta: float, norm_threshold: float,
               running: torch.Tensor | None = None, momentum: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """APG's guidance direction (Sadat et al. 2024), per sample (norms and projections over all but dim 0).

    diff = D_c - D_u, with momentum folded in: running = diff + momentum * running (the previous running value,
    None on the first call); its norm capped at `norm_threshold` (> 0); then split into its parts parallel and
    orthogonal to D_c, the parallel part (what oversaturates) scaled by eta. Returns (update, running). The
    projection runs in float64 (as the reference code).
    """
    diff = d_c - d_u
    if momentum and running is not None:
        diff = diff + momentum * running
    running = diff
    dims = list(range(1, diff.ndim))
    if norm_threshold > 0:
        diff = diff * torch.minimum(torch.ones_like(diff),
                                    norm_threshold / diff.norm(p=2, dim=dims, keepdim=True))
    v0, v1 = diff.double(), torch.nn.functional.normalize(d_c.double(), dim=dims)
    parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
    orthogonal = (v0 - parallel).to(diff.dtype)
    return orthogonal + eta * parallel.to(diff.dtype), running


def zero_star_alpha(d_c: torch.Tensor, d_u: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """CFG-Zero*'s optimized scale (Fan et al. 2025) per sample: s* = <v_c, v_u> / ||v_u||^2 (float32), shaped to
    broadcast over the sample."""
    c, u = d_c.flatten(1).float(), d_u.flatten(1).float()
    alpha = (c * u).sum(1, keepdim=True) / ((u * u).sum(1, keepdim=True) + eps)
    return alpha.to(d_c.dtype).view(-1, *(1,) * (d_c.ndim - 1))


@dataclass
class Apg:
    """APG (Sadat et al. 2024) in place of CFG's combination, on x0_hat as the paper applies it:
    D = D_c + (w - 1) (diff_orth + eta diff_par), diff = D_c - D_u (with momentum, norm-capped at `norm_threshold`).

    The momentum is state across steps, kept per denoiser: `combiner()` starts a fresh running average, so each
    run (each network batch's sampling) starts at zero and each sample (row) keeps its own. With eta = 1, no
    threshold and no momentum it is CFG. Every evaluation (Heun's corrector too) updates the average, as the
    reference updates it at every guider call.
    """
    eta: float = 0.0
    norm_threshold: float = 0.0
    momentum: float = 0.0
    name = "apg"

    def combiner(self, scale: float, sigmas: torch.Tensor | None = None):
        state: dict[str, torch.Tensor | None] = {"running": None}

        def combine(d_u: torch.Tensor, d_c: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            update, state["running"] = apg_update(d_c, d_u, self.eta, self.norm_threshold, state["running"],
                                                  self.momentum)
            return d_c + (scale - 1.0) * update

        return combine


@dataclass
class ZeroStar:
    """CFG-Zero* (Fan et al. 2025) in place of CFG's combination, on the noise prediction eps = (x - D) / sigma
    (what an SD UNet predicts): eps = a eps_u + w (eps_c - a eps_u), a = `zero_star_alpha`; the first
    `zero_init_steps` steps predict eps = 0 (D = x: the step leaves x where it is)."""
    zero_init_steps: int = 1
    name = "zero-star"

    def combiner(self, scale: float, sigmas: torch.Tensor | None = None):
        if self.zero_init_steps and sigmas is None:
            raise ValueError("CFG-Zero*'s zero-init steps need the run's sigmas")

        def combine(d_u: torch.Tensor, d_c: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            if self.zero_init_steps and step_index(sigmas, sigma) < self.zero_init_steps:
                return x.clone()
            s = expand_sigma(sigma, x)
            eps_c, eps_u = (x - d_c) / s, (x - d_u) / s
            eps_u = eps_u * zero_star_alpha(eps_c, eps_u)
            return x - s * (eps_u + scale * (eps_c - eps_u))

        return combine


Rule = Apg | ZeroStar


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
                            sigma_max: float = float("inf"), support: int = 0):
    """PG with the class-posterior kernel of a class-conditional model (labels 0..classes-1, `classes` the null
    label): D'(x_i) = D_null(x_i) - factor * sum_c p_i(c) q_i(c) (D_c(x_i) - D_bar_i) (particles.posterior_push),
    the posterior p read from the same denoisers (particles.class_posterior). Inside the sigma window every class
    and the null label run as ONE network batch (classes + 1 times the rows); outside it, only the null pass.
    `uncond` is the batch's conditioning without labels (a next-frame model's context rides along).

    `support` = k in 1..classes-1: after the window's first evaluation (all classes), each particle runs only the k
    classes that carried the most of its posterior mass at the previous evaluation (k + 1 rows a particle); its
    posterior is then over those k, zero elsewhere, and q_i(c) the other particles' mass on particle i's classes.
    The state (the last posterior) lives in this denoiser: one per run, reset with it. 0: every class, every time.
    """
    def null(n: int, device) -> dict[str, Any]:
        return {**uncond, "class_labels": torch.full((n,), classes, device=device, dtype=torch.long)}

    if factor == 0.0:
        return lambda x, sigma, **kw: model(x, sigma, **null(x.shape[0], x.device), **kw)
    last: dict[str, torch.Tensor] = {}

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        n = x.shape[0]
        if not inside(sigma, sigma_min, sigma_max):
            return model(x, sigma, **null(n, x.device), **kw)
        if not support or support >= classes or "p" not in last or last["p"].shape[0] != n:
            picked = torch.arange(classes, device=x.device).expand(n, classes)
        else:
            picked = last["p"].topk(support, dim=1).indices.sort(dim=1).values   # (N, k), each particle's own
        k = picked.shape[1] + 1
        labels = torch.cat([picked.T.reshape(-1), torch.full((n,), classes, device=x.device)])  # chunk j: class j
        every = {**cat_cond(*([uncond] * k)), "class_labels": labels.long()}
        out = model(torch.cat([x] * k), expand_sigma(sigma, x).flatten().repeat(k), **every, **kw)
        out = out.view(k, n, *x.shape[1:]).transpose(0, 1)   # (N, k, ...)
        d_classes, d_null = out[:, :-1], out[:, -1]
        p = class_posterior(d_classes, d_null)
        full = p.new_zeros(n, classes).scatter(1, picked, p)
        last["p"] = full
        if picked.shape[1] == classes:
            return d_null - factor * posterior_push(p, d_classes)
        q = (full.sum(0, keepdim=True) - full).gather(1, picked)
        return d_null - factor * posterior_push(p, d_classes, q)

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
    support: int = 0       # the posterior kernel: classes a particle runs after the first evaluation (0: all)


@dataclass
class Pag:
    """PAG for one run (Ahn et al. 2024): the scale p in + p (D_c - D_pag) and the self-attention layers whose
    attention becomes the identity (output = V) in the perturbed pass. `state` is shared with SEG's when both run
    (`Guidance` sees to it): one set of processors, one batch."""
    scale: float
    layers: list[str]
    state: attention.SegState = field(default_factory=attention.SegState)
    sigma_min: float = 0.0  # the interval (sigma_min, sigma_max] where the pag chunk runs
    sigma_max: float = math.inf

    def at(self) -> Callable[[torch.Tensor], bool] | None:
        """Per call: does the pag chunk run? None: every step."""
        if everywhere(self.sigma_min, self.sigma_max):
            return None
        return lambda sigma: inside(sigma, self.sigma_min, self.sigma_max)


def stack(model, cfg: float, cond: dict[str, Any], uncond: dict[str, Any], sigmas: torch.Tensor,
          seg: Seg | None = None, limit: Callable | None = None, pg: PG | None = None, pag: Pag | None = None,
          rule: Rule | None = None, ag: Autoguide | None = None, cfg_interval: tuple[float, float] = (0.0, math.inf)):
    """The guided denoiser every command samples: AG on the network -> CFG (+ SEG, PAG in the same batch; APG or
    CFG-Zero* as `rule`) -> `limit` -> PG.

    `seg` None or scale 0 is exactly `classifier_free`, PG None or factor 0 exactly no PG, `pag` None or scale 0
    and `rule` None exactly without them, AG None or scale 1 exactly the main network, the CFG interval (0, inf]
    exactly CFG at every step, so switching a method off reproduces the command without it bit for bit. `limit` is
    a combinator for the scheduler's bounds on x0_hat (pipelines.clip_x0); PG comes after it so the bounds never
    cut the repulsion. PG with the class-posterior kernel (`pg.classes`) runs the model's class passes itself:
    unconditional sampling, no SEG, no limit.
    """
    if ag is not None:
        model = autoguided(model, ag.guide, ag.scale, ag.sigma_min, ag.sigma_max)
    if pg is not None and pg.classes:
        return class_particle_guidance(model, pg.factor, pg.classes, uncond, pg.sigma_min, pg.sigma_max, pg.support)
    combine = None if rule is None else rule.combiner(cfg, sigmas)
    seg_on, pag_on = seg is not None and seg.scale != 0, pag is not None and pag.scale != 0
    if not seg_on and not pag_on:
        denoiser = classifier_free(model, cfg, cond, uncond, combine, *cfg_interval)
    elif not pag_on and combine is None:
        denoiser = smoothed_energy(model, seg.scale, cfg, cond, uncond, seg.state, seg.schedule(sigmas),
                                   *cfg_interval)
    else:
        state = seg.state if seg_on else pag.state
        denoiser = perturbed_guidance(model, cfg, cond, uncond, state,
                                      seg.scale if seg_on else 0.0, seg.schedule(sigmas) if seg_on else None,
                                      pag.scale if pag_on else 0.0, pag.at() if pag_on else None, rule=combine,
                                      cfg_lo=cfg_interval[0],
                                      cfg_hi=cfg_interval[1])
    if limit is not None:
        denoiser = limit(denoiser)
    if pg is not None:
        denoiser = particle_guidance(denoiser, pg.factor, pg.kernel_grad, pg.sigma_min, pg.sigma_max,
                                     on_denoised=pg.on_denoised, sigma_data=pg.sigma_data, exact=pg.exact)
    return denoiser


@dataclass
class Guidance:
    """The guidance terms of one run: the CFG scale, its rule (None: plain CFG; `Apg`, `ZeroStar`) and interval,
    SEG, PAG, PG and autoguidance (None: off).

    Each term says what it puts in the network for the run (`installed`: SEG's query-blurring and PAG's identity
    processors on their layers, one processor per layer and one shared state, so SEG and PAG may pick different
    layers and still ride in one batch, in the guide's network too under AG; CFG, its rules, PG and AG install
    nothing) and how it wraps the denoiser (`denoiser`: `stack`, in its one order). A term switched off is absent,
    so the run is bit for bit the run without it. `rows()` is what one evaluation costs: network rows per sample.
    """
    cfg: float = 1.0
    seg: Seg | None = None
    pg: PG | None = None
    pag: Pag | None = None
    rule: Rule | None = None
    ag: Autoguide | None = None
    cfg_interval: tuple[float, float] = (0.0, math.inf)  # CFG acts at sigma in (lo, hi]

    def __post_init__(self) -> None:
        if self.seg is not None and self.pag is not None:
            self.pag.state = self.seg.state  # one set of processors reads one state

    def rows(self) -> dict[str, int]:
        """Network rows per sample of one evaluation on a guided step, by pass: cond 1, uncond 1 with CFG (w not 0
        or 1, or a rule), seg 1, pag 1; the class-posterior PG kernel: one row per class and the null label."""
        if self.pg is not None and self.pg.classes:
            return {"classes": self.pg.classes, "null": 1}
        perturbed = (self.seg is not None and self.seg.scale != 0) or (self.pag is not None and self.pag.scale != 0)
        if self.rule is not None or (self.cfg not in (0.0, 1.0)):
            rows = {"uncond": 1, "cond": 1}
        else:
            rows = {"uncond" if self.cfg == 0.0 and not perturbed else "cond": 1}
        if self.seg is not None and self.seg.scale != 0:
            rows["seg"] = 1
        if self.pag is not None and self.pag.scale != 0:
            rows["pag"] = 1
        return rows

    @contextlib.contextmanager
    def installed(self, net: torch.nn.Module) -> Iterator[None]:
        """What the terms install in `net` (the module holding the attention layers) for the duration."""
        nets = [net]
        if self.ag is not None and self.ag.net is not None and (self.seg is not None or self.pag is not None):
            nets.append(self.ag.net)  # the guide's perturbed passes are perturbed too
        with contextlib.ExitStack() as stack_:
            for n in nets:
                stack_.enter_context(self._installed_in(n))
            yield

    @contextlib.contextmanager
    def _installed_in(self, net: torch.nn.Module) -> Iterator[None]:
        if self.pag is None or self.pag.scale == 0:
            with self.seg.installed(net) if self.seg is not None else contextlib.nullcontext():
                yield
            return
        seg = attention.resolve_layers(net, self.seg.layers) if self.seg is not None else []
        with attention.installed(net, self.pag.state, seg, identity=attention.resolve_layers(net, self.pag.layers)):
            yield

    def with_guide(self, wrap: Callable[[Callable], Callable]) -> "Guidance":
        """The same terms with the guide denoiser wrapped (as the caller wraps its main network, e.g. in fixed
        batch groups); itself without AG."""
        return self if self.ag is None else replace(self, ag=replace(self.ag, guide=wrap(self.ag.guide)))

    def denoiser(self, model, cond: dict[str, Any], uncond: dict[str, Any], sigmas: torch.Tensor | None,
                 limit: Callable | None = None):
        """`model` guided by the terms (see `stack`)."""
        return stack(model, self.cfg, cond, uncond, sigmas, seg=self.seg, limit=limit, pg=self.pg, pag=self.pag,
                     rule=self.rule, ag=self.ag, cfg_interval=self.cfg_interval)
