"""Diffusion synchronization (SyncTweedies, Kim et al. 2024): one denoiser wrapper that every case uses.

The sampler's state is the stack of instances W (V, C, h, w), one per view; the canvas is their average
A(W) (inverse maps, overlaps averaged) and F maps a canvas forward to instances. With D the per-instance
denoiser (CFG included), run over the V rows in batches of `--view-batch`, the cases are:

- `x0` (SyncTweedies): D'(W) = F(A(D(W)))  -- the Tweedie estimates agree, every instance steps from them.
- `eps`: the noise predictions agree. eps = (W - D(W)) / sigma is linear in what A and F act on, so sigma
  cancels: D'(W) = W - F(A(W - D(W))).
- `xt`: the states agree: each instance takes its own sampler step, then W <- F(A(W)) (a step callback).
- `none`: D'(W) = D(W); each view is sampled on its own (to show why synchronization matters).

With exact views (crops, bijections) and instances drawn from one canvas noise (`noise="canvas"`, the 003
protocol), F(A(W)) = W holds along the whole path and the three synchronized cases are the same map up to
float rounding (SyncTweedies' analysis of 1-to-1 and 1-to-n projections). They part ways when each view starts
from its own noise (`noise="views"`): `xt` averages the noise away at the first step, `x0` keeps each
instance's own noise shrinking with sigma, `eps` carries the instances' differences to the end.

Steps with several evaluations or a memory. `xt` synchronizes the state after every completed step (the
callback's x, the tensor the sampler continues from) and nothing inside a step: what a sampler evaluates within
a step, or keeps from earlier ones, is per instance. DPM-Solver++(2M) extrapolates from each instance's own
previous x0_hat; its step is linear in (x, x0_hats) with scalar coefficients, as Euler's and DDIM's are, so
projecting that x0_hat a step later is the same as projecting it then, and the "same map" above holds for it.
Heun's corrector evaluates each instance's own Euler predictor, which `xt` has not projected (`x0` and `eps`
have, through D'): `xt` equals `x0` for heun / stochastic_heun only when the denoiser keeps agreeing instances
agreeing (a per-pixel one); in general they differ by that unsynchronized evaluation (tests/test_samplers.py).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .samplers import Callback, run_sampler
from .views import ViewSet

CASES = ("x0", "eps", "xt", "none")
NOISES = ("canvas", "views")

Denoiser = Callable[..., torch.Tensor]


def rows_of(cond: Any, start: int, stop: int) -> Any:
    """Rows start:stop of batched conditioning (tensors / nested dicts); a one-row tensor is shared by all."""
    if isinstance(cond, dict):
        return {k: rows_of(v, start, stop) for k, v in cond.items()}
    if isinstance(cond, torch.Tensor) and cond.ndim > 0:
        return cond.expand(stop - start, *cond.shape[1:]) if cond.shape[0] == 1 else cond[start:stop]
    return cond


def in_batches(make: Callable[[int, int], Denoiser], rows: int, batch: int) -> Denoiser:
    """A denoiser over `rows` instances that runs them `batch` at a time; make(start, stop) builds the denoiser
    of those rows (their conditioning), once, so each call only runs the network."""
    parts = [(a, min(a + batch, rows)) for a in range(0, rows, max(1, batch))]
    models = [make(a, b) for a, b in parts]

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        if x.shape[0] != rows:
            raise ValueError(f"expected {rows} instances, got {x.shape[0]}")
        return torch.cat([m(x[a:b], sigma[a:b], **kw) for (a, b), m in zip(parts, models)])

    return denoise


def synchronized(model: Denoiser, views: ViewSet, case: str = "x0") -> tuple[Denoiser, Callback]:
    """(denoiser over the instance stack, step callback or None) for one synchronization case."""
    if case == "none":
        return model, None
    if case == "x0":
        return (lambda w, sigma, **kw: views.project(model(w, sigma, **kw))), None
    if case == "eps":
        return (lambda w, sigma, **kw: w - views.project(w - model(w, sigma, **kw))), None
    if case == "xt":
        # the sampler keeps stepping the tensor it handed the callback: projecting it in place syncs the states
        return model, lambda info: info["x"].copy_(views.project(info["x"]))
    raise ValueError(f"unknown synchronization case {case!r}; choose one of {', '.join(CASES)}")


def initial_instances(views: ViewSet, draw: Callable[[tuple[int, ...]], torch.Tensor], instance_shape: tuple[int, ...],
                      noise: str = "canvas") -> torch.Tensor:
    """Start states: one canvas noise mapped to every view (003), or independent noise per view."""
    if noise == "canvas":
        return views.forward(draw(views.canvas))
    if noise == "views":
        return torch.stack([draw(instance_shape) for _ in range(len(views))])
    raise ValueError(f"unknown noise {noise!r}; choose one of {', '.join(NOISES)}")


def chain(*callbacks: Callback) -> Callback:
    """Several step callbacks as one (None entries skipped), run in order."""
    live = [c for c in callbacks if c is not None]
    if not live:
        return None

    def run(info: dict) -> None:
        for c in live:
            c(info)

    return run


def sample_views(make_rows: Callable[[int, int], Denoiser], views: ViewSet, sigmas: torch.Tensor,
                 unit_noise: Callable[[tuple[int, ...]], torch.Tensor], instance_shape: tuple[int, ...], *,
                 sampler: str = "euler", case: str = "x0", noise: str = "canvas", view_batch: int = 8,
                 start_scale: float | None = None, knobs: dict[str, Any] | None = None,
                 callback: Callback = None) -> torch.Tensor:
    """The one synchronized sampling run (panorama, anagram): final instance stack (V, ...) in x = x0 + sigma n form.

    `make_rows(a, b)` builds the (guided) denoiser of instances a:b; `unit_noise(shape)` draws unit Gaussian noise.
    Start states and every fresh noise a stochastic sampler adds are drawn the same way (`noise`: one canvas draw
    seen through every view, or one draw per view), the start scaled by `start_scale` (default sqrt(1 + sigma_0^2),
    the variance of a VP latent at sigma_0 in VE form).
    """
    model, hook = synchronized(in_batches(make_rows, len(views), view_batch), views, case)
    scale = math.sqrt(1 + float(sigmas[0]) ** 2) if start_scale is None else start_scale
    draw = lambda like=None: initial_instances(views, unit_noise, instance_shape, noise)  # noqa: E731
    return run_sampler(sampler, model, draw() * scale, sigmas, callback=chain(hook, callback), noise=draw,
                       **(knobs or {}))
