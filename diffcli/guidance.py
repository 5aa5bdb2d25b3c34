"""Guidance combinators: functions that take a denoiser and return a denoiser."""
from __future__ import annotations

from typing import Any

import torch


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


def classifier_free(model, scale: float, cond: dict[str, Any], uncond: dict[str, Any]):
    """CFG: D_u + w (D_c - D_u), both passes as ONE batch.

    w = 1 is the plain conditional model (one pass), w = 0 the unconditional one. The 002 seed's
    alpha in (1 - alpha) D_u + alpha D_c is the same number: w = alpha.
    """
    if scale == 1.0:
        return lambda x, sigma, **kw: model(x, sigma, **cond, **kw)
    if scale == 0.0:
        return lambda x, sigma, **kw: model(x, sigma, **uncond, **kw)
    both = cat_cond(uncond, cond)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        d_u, d_c = model(torch.cat([x, x]), torch.cat([sigma, sigma]), **both, **kw).chunk(2)
        return d_u + scale * (d_c - d_u)

    return denoise
