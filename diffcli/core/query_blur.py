"""Query blurs for Smoothed Energy Guidance: tensors in, tensors out.

Every blur takes a query of shape (..., h*w, d) whose tokens are the raster-ordered cells of an h x w grid
(the self-attention layout of a UNet block) and returns one of the same shape. The channel axis d is never
mixed. A `Blur` is the parsed form of a command-line spec (`gaussian_K_S`, `interpolatedBoxBlur_K_A`,
`ema_A0_A1_MODE`); `Blur.at(progress)` fixes what depends on the step (EMA's alpha ramp).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..shared.errors import DiffcliError

INFINITE_SIGMA = 9999.0  # the official code's switch: sigma above this means the query's spatial mean
RAMPS = ("linear", "quadratic", "cosine")


def _grid(q: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if q.shape[-2] != h * w:
        raise ValueError(f"query has {q.shape[-2]} tokens, not an {h}x{w} grid")
    return q.unflatten(-2, (h, w))  # (..., h, w, d), a view


# ---------------------------------------------------------------- gaussian (separable, reflect padding)

def gaussian_kernel_size(sigma: float) -> int:
    """The official rule for K = -1: ceil(6 sigma) + 1, made odd."""
    c = math.ceil(6 * sigma)
    return c + 1 - c % 2


def _capped(k: int, n: int) -> int:
    """Kernel size capped to a grid side and kept odd, so reflect padding (k // 2 <= n - 1) is defined."""
    return min(k, n if n % 2 else n - 1)


@functools.lru_cache(maxsize=64)
def _gaussian_operator(n: int, k: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The (n, n) matrix of a 1-D gaussian of odd size k with reflect padding: row i holds the weights of cell i.

    Building the operator once lets the blur run as two small matmuls on the query in its own layout
    (no permutes, any k); it equals padding + convolution exactly, reflect indices folded in.
    """
    p = k // 2
    offsets = torch.arange(-p, p + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    taps = taps / taps.sum()
    src = torch.arange(n).unsqueeze(1) + torch.arange(-p, p + 1).unsqueeze(0)  # (n, k) source cells
    src = src.abs()  # reflect on the left: -j -> j
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)  # reflect on the right
    op = torch.zeros(n, n, dtype=torch.float64)
    op.scatter_add_(1, src, taps.expand(n, k).clone())
    return op.to(device=device, dtype=dtype)


def gaussian_blur(q: torch.Tensor, h: int, w: int, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable gaussian over the token grid; `kernel_size` -1 derives it from sigma; sigma 0 returns q."""
    if sigma <= 0:
        return q
    k = gaussian_kernel_size(sigma) if kernel_size == -1 else kernel_size
    k += 1 - k % 2  # keep it odd so the window is centred
    g = _grid(q, h, w)
    rows = _gaussian_operator(h, _capped(k, h), float(sigma), q.device, q.dtype)
    cols = _gaussian_operator(w, _capped(k, w), float(sigma), q.device, q.dtype)
    g = torch.matmul(rows, g.flatten(-2)).unflatten(-1, (w, -1))  # along the rows: (h, h) @ (h, w*d)
    return torch.matmul(cols, g).flatten(-3, -2)  # along the columns: (w, w) @ (w, d) in every row


def mean_query(q: torch.Tensor) -> torch.Tensor:
    """The infinite gaussian: every token becomes the spatial mean (attention then sees one query, repeated)."""
    return q.mean(-2, keepdim=True).expand_as(q)


# ---------------------------------------------------------------- box blur by integral image

def _window_sums(s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over [lo, hi) along `dim` from a cumulative sum with a leading zero: S[hi] - S[lo]."""
    return s.index_select(dim, hi) - s.index_select(dim, lo)


def box_blur(q: torch.Tensor, h: int, w: int, kernel_size: int) -> torch.Tensor:
    """Mean over the centred K x K window clipped to the grid, by a summed-area table: cost independent of K.

    Dividing by the cells actually inside the window (not K^2) keeps constant inputs constant at the
    borders too; on the interior it is a plain K x K average. Sums run in float32 (at least) around the spatial mean,
    so the table's differences stay accurate for large grids and half-precision queries.
    """
    g = _grid(q, h, w).to(torch.promote_types(q.dtype, torch.float32))
    mean = g.mean(dim=(-3, -2), keepdim=True)
    g = g - mean
    before, after = kernel_size // 2, (kernel_size - 1) // 2
    out = g
    for dim, n in ((-3, h), (-2, w)):
        zero = torch.zeros_like(out.narrow(dim, 0, 1))
        table = torch.cat([zero, out.cumsum(dim)], dim)
        i = torch.arange(n, device=q.device)
        lo, hi = (i - before).clamp(0, n), (i + after + 1).clamp(0, n)
        count = (hi - lo).to(out.dtype).view(-1, *([1] * (-dim - 1)))
        out = _window_sums(table, lo, hi, out.ndim + dim) / count
    return (out + mean).to(q.dtype).flatten(-3, -2)


def interpolated_box_blur(q: torch.Tensor, h: int, w: int, kernel_size: int, alpha: float) -> torch.Tensor:
    """(1 - alpha) q + alpha box_K(q), the 000 seed's box blur."""
    if alpha == 0:
        return q
    return torch.lerp(q, box_blur(q, h, w, kernel_size), alpha)


# ---------------------------------------------------------------- causal EMA along token rows

@functools.lru_cache(maxsize=64)
def _ema_operator(n: int, alpha: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, n) lower-triangular matrix of y_0 = x_0, y_j = alpha y_{j-1} + (1 - alpha) x_j.

    Row j: alpha^(j-i) (1 - alpha) for 1 <= i <= j, alpha^j for i = 0; every row sums to 1 (constants kept).
    A matmul instead of a loop over tokens: the recurrence unrolled.
    """
    j = torch.arange(n, dtype=torch.float64)
    lag = (j.unsqueeze(1) - j.unsqueeze(0)).clamp(min=0)
    op = torch.where(j.unsqueeze(1) >= j.unsqueeze(0), alpha ** lag * (1 - alpha), torch.zeros(()))
    op[:, 0] = alpha ** j
    return op.to(device=device, dtype=dtype)


def ema_rows(q: torch.Tensor, h: int, w: int, alpha: float) -> torch.Tensor:
    """Causal EMA left to right along each row of the token grid (restarting at every row); alpha 0 returns q."""
    if alpha == 0:
        return q
    op = _ema_operator(w, float(alpha), q.device, q.dtype)
    return torch.matmul(op, _grid(q, h, w)).flatten(-3, -2)


def ramp(alpha_start: float, alpha_end: float, mode: str, progress: float) -> float:
    """alpha at `progress` in [0, 1] of the denoising steps, from alpha_start (noisiest) to alpha_end."""
    p = min(max(progress, 0.0), 1.0)
    f = {"linear": p, "quadratic": p * p, "cosine": (1 - math.cos(math.pi * p)) / 2}[mode]
    return alpha_start + (alpha_end - alpha_start) * f


# ---------------------------------------------------------------- specs

@dataclass(frozen=True)
class Blur:
    """One parsed blur spec. `alpha` is the interpolation (box) or the EMA's current alpha."""

    kind: str  # a key of BLURS: gaussian | box | ema
    spec: str
    kernel_size: int = -1
    sigma: float = 0.0
    alpha: float = 0.0
    alpha_end: float = 0.0
    ramp: str | None = None

    @property
    def infinite(self) -> bool:
        return self.kind == "gaussian" and self.sigma > INFINITE_SIGMA

    def at(self, progress: float) -> "Blur":
        """The blur at this point of the denoising (only EMA changes along the steps)."""
        if self.kind != "ema" or self.ramp is None:
            return self
        return replace(self, alpha=ramp(self.alpha, self.alpha_end, self.ramp, progress), ramp=None)

    def __call__(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return BLURS[self.kind].apply(self, q, h, w)


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|inf"


def parse_gaussian(m: re.Match, bad: Callable[[str], DiffcliError]) -> Blur:
    k, sigma = int(m[1]), float(m[2])
    if k == 0 or k < -1:
        raise bad("kernel size K must be >= 1 or -1")
    if sigma < 0:
        raise bad("sigma S must be >= 0")
    return Blur("gaussian", m[0], kernel_size=k, sigma=sigma)


def parse_box(m: re.Match, bad: Callable[[str], DiffcliError]) -> Blur:
    k, alpha = int(m[1]), float(m[2])
    if k < 1 or not 0 <= alpha <= 1:
        raise bad("need K >= 1 and 0 <= A <= 1")
    return Blur("box", m[0], kernel_size=k, alpha=alpha)


def parse_ema(m: re.Match, bad: Callable[[str], DiffcliError]) -> Blur:
    a0, a1, mode = float(m[1]), float(m[2]), m[3]
    if mode not in RAMPS or not (0 <= a0 <= 1 and 0 <= a1 <= 1):
        raise bad("need 0 <= A0, A1 <= 1 and a ramp of " + "|".join(RAMPS))
    return Blur("ema", m[0], alpha=a0, alpha_end=a1, ramp=mode)


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class BlurFamily:
    """One entry of BLURS, keyed by `Blur.kind`: the spec's pattern, its parser (match, error maker) -> Blur, how a
    parsed blur runs on a query, and the spec's form with its ranges (the help line, `description`)."""
    pattern: str
    parse: Callable[[re.Match, Callable[[str], DiffcliError]], Blur]
    apply: Callable[[Blur, torch.Tensor, int, int], torch.Tensor]
    description: str


BLURS: dict[str, BlurFamily] = {
    "gaussian": BlurFamily(
        rf"gaussian_(-?\d+)_({_NUM})", parse_gaussian,
        lambda b, q, h, w: mean_query(q) if b.infinite else gaussian_blur(q, h, w, b.kernel_size, b.sigma),
        "gaussian_K_S (K >= 1, made odd, or -1 = from S; S = 0 none, S > 9999 infinite)"),
    "box": BlurFamily(
        rf"interpolatedBoxBlur_(\d+)_({_NUM})", parse_box,
        lambda b, q, h, w: interpolated_box_blur(q, h, w, b.kernel_size, b.alpha),
        "interpolatedBoxBlur_K_A (K >= 1, 0 <= A <= 1)"),
    "ema": BlurFamily(
        rf"ema_({_NUM})_({_NUM})_(\w+)", parse_ema,
        lambda b, q, h, w: ema_rows(q, h, w, b.at(0.0).alpha),
        f"ema_A0_A1_{'|'.join(RAMPS)} (0 <= A <= 1)"),
}
SPEC_FORMS = ", ".join(family.description for family in BLURS.values())


def describe() -> str:
    """The accepted --blur forms (SPEC_FORMS), for the --blur help."""
    return SPEC_FORMS


def parse_blur(spec: str) -> Blur:
    """`gaussian_K_S` | `interpolatedBoxBlur_K_A` | `ema_A0_A1_MODE`; a bad spec is one line naming the forms."""
    def bad(why: str) -> DiffcliError:
        return DiffcliError(f"--blur {spec!r}: {why}; accepted forms: {SPEC_FORMS}")

    for family in BLURS.values():
        if m := re.fullmatch(family.pattern, spec):
            return family.parse(m, bad)
    raise bad("not a blur spec")
