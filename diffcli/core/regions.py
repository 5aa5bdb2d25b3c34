"""Region prompts (MultiDiffusion, Bar-Tal et al. 2023, sec. 4.2): each prompt drives the canvas where its mask is.

Pure tensors. A run has P prompts (the background first when there is one, then the regions), each with a mask
over the latent canvas (P, h, w), weights in [0, 1]. Every (window, prompt) pair is one instance of the
synchronization (`views.ViewSet` with per-instance weights): its prediction counts at each canvas cell by its mask,
so the synchronized x0_hat is the per-cell weighted average sum_p m_p D_p / sum_p m_p (the paper's closed-form
solution of its least-squares objective, eq. 5, with the masks as weights). The background's mask is what the
regions leave: max(0, 1 - sum of the region masks).

Bootstrapping (the paper's sec. 4.2): for the first steps, a region's network input is its own latent where its
mask is and, elsewhere, a random flat colour noised to the step's level: m x + (1 - m) (c + sigma n), with n the
canvas's initial unit noise (as the paper's code) and c the latent of a flat colour image, a fresh colour per
region and step. The background's input is never changed. It makes a region's content form inside its mask from
the first step instead of leaking out of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .views import ViewSet, Window

Denoiser = Callable[..., torch.Tensor]


def prompt_weights(regions: torch.Tensor, background: bool) -> torch.Tensor:
    """Region masks (R, h, w) -> per-prompt weights (P, h, w): the background's (1 - their sum, at least 0) first
    when there is a background prompt."""
    if not background:
        return regions
    rest = (1 - regions.sum(0, keepdim=True)).clamp(min=0)
    return torch.cat([rest, regions])


def zero_weight_cells(weights: torch.Tensor) -> int:
    """How many canvas cells no prompt covers (sum of weights 0): those would have no prediction."""
    return int((weights.sum(0) <= 0).sum())


@dataclass
class RegionViews:
    """The instances of a region run: each window once per prompt that has weight in it."""
    views: ViewSet
    prompt: torch.Tensor     # (V,) the prompt row of each instance
    weights: list            # (1, h, w) per instance, its mask in the window


def region_views(windows: list[Window], weights: torch.Tensor, canvas: tuple[int, int, int]) -> RegionViews:
    """Instances of (window, prompt), window-major; a pair whose mask is zero in the whole window contributes
    nothing to the average and is skipped (no network call is spent on it)."""
    views, prompt, masks = [], [], []
    for w in windows:
        for p in range(weights.shape[0]):
            m = w.view(weights[p:p + 1])
            if bool((m > 0).any()):
                views.append(w)
                prompt.append(p)
                masks.append(m)
    return RegionViews(ViewSet(views, canvas, masks), torch.tensor(prompt, dtype=torch.long), masks)


def gather_rows(cond: Any, index: torch.Tensor) -> Any:
    """Conditioning with one row per prompt -> one row per instance (`index` picks the prompt); a one-row tensor
    stays shared, dicts are gathered entry by entry."""
    if isinstance(cond, dict):
        return {k: gather_rows(v, index) for k, v in cond.items()}
    if isinstance(cond, torch.Tensor) and cond.ndim > 0 and cond.shape[0] > 1:
        return cond.index_select(0, index.to(cond.device))
    return cond


@dataclass
class Bootstrap:
    """What a region's input is composited over in the first steps (module docstring).

    colours: (S, R, C) latent flat colours, per bootstrapped step and region; noise: the canvas's unit noise
    (C, H, W); sigmas: the run's sigmas (a network call at sigma belongs to the last step i with sigmas[i] >= sigma,
    and is bootstrapped when i < S); background: whether prompt 0 is the background (never bootstrapped)."""
    colours: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    background: bool

    @property
    def steps(self) -> int:
        return self.colours.shape[0]

    def step_of(self, sigma: float) -> int:
        s = self.sigmas.double().cpu()
        return int((s >= float(sigma) * (1 - 1e-6)).sum()) - 1

    def composite(self, x: torch.Tensor, sigma: torch.Tensor, instances: RegionViews, start: int) -> torch.Tensor:
        """The network input of instances start:start+len(x) at sigma (one sigma per row; a run steps them
        together)."""
        i = self.step_of(float(sigma.flatten()[0]))
        if self.steps == 0 or i >= self.steps or i < 0:
            return x
        out = x.clone()
        for row in range(x.shape[0]):
            k = start + row
            p = int(instances.prompt[k])
            if self.background and p == 0:
                continue
            region = p - 1 if self.background else p
            v = instances.views.views[k]
            m = instances.weights[k].to(x.device, x.dtype)
            colour = self.colours[i, region].to(x.device, x.dtype).view(-1, 1, 1)
            bg = colour + float(sigma.flatten()[row]) * v.view(self.noise).to(x.device, x.dtype)
            out[row] = m * x[row] + (1 - m) * bg
        return out


def bootstrapped(make: Callable[[int, int], Denoiser], boot: Bootstrap | None,
                 instances: RegionViews) -> Callable[[int, int], Denoiser]:
    """make(a, b) whose denoisers see the bootstrapped composite instead of their own input (the whole guided
    denoiser does: every CFG branch and guidance term sees the same input)."""
    if boot is None or boot.steps == 0:
        return make

    def make_rows(a: int, b: int) -> Denoiser:
        model = make(a, b)
        return lambda x, sigma, **kw: model(boot.composite(x, sigma, instances, a), sigma, **kw)

    return make_rows


def flat_colours(encode: Callable[[torch.Tensor], torch.Tensor], rgb: torch.Tensor, side: int) -> torch.Tensor:
    """(N, 3) colours in [0, 1] -> (N, C) latent colours: a side x side flat image of each, encoded, averaged over
    the latent cells (a flat image's latent is flat up to the encoder's border effects)."""
    images = (rgb * 2 - 1)[:, :, None, None].expand(-1, -1, side, side)
    return encode(images).float().mean((-2, -1))
