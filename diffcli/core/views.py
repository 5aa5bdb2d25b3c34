"""Views for diffusion synchronization: maps canvas -> instance (`view`) and instance -> canvas (`inverse_view`).

Pure tensor functions over (..., C, H, W). Two kinds:

- anagram views (Visual Anagrams): same-size bijections of the image, so inverse_view(view(x)) == x exactly.
  Pixel-moving views are permutations built on a *base* grid (the stage-I size); at k times that size a base
  pixel is a k x k block, so the view at stage II (256 px) is the stage-I view (64 px) upsampled, and the two
  stages agree on what the illusion is.
- windows (panorama): crops of a larger canvas; inverse_view pastes into zeros, and a coverage count says how
  many windows see each canvas pixel.

`ViewSet` maps a canvas to the stack of its instances and averages instances back (sum of inverse maps divided
by the coverage count): the two operations every synchronization case is made of.
"""
from __future__ import annotations

import dataclasses

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..shared import registries
from ..shared.errors import DiffcliError
from ..shared.registries import having



# ---------------------------------------------------------------- anagram views

class View:
    """A bijection of (..., C, H, W) images; `angle` (degrees, clockwise) marks views that turn the picture."""

    name = "view"
    angle = 0.0

    def view(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inverse_view(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class Identity(View):
    name = "identity"

    def view(self, x):
        return x

    def inverse_view(self, x):
        return x


class Flip(View):
    """Upside down (Visual Anagrams' flip): the illusion appears when the picture is turned over."""
    name = "flip"

    def view(self, x):
        return x.flip(-2)

    def inverse_view(self, x):
        return x.flip(-2)


class Rotate(View):
    """A quarter turn k times clockwise (rot90 counts counter-clockwise, hence the minus)."""

    def __init__(self, quarters: int, name: str):
        self.k, self.name, self.angle = quarters, name, 90.0 * quarters

    def view(self, x):
        return torch.rot90(x, -self.k, dims=(-2, -1))

    def inverse_view(self, x):
        return torch.rot90(x, self.k, dims=(-2, -1))


class Negate(View):
    name = "negate"

    def view(self, x):
        return -x

    def inverse_view(self, x):
        return -x


class Permute(View):
    """Any pixel-moving view: out.flat[p] = in.flat[perm[p]] with `perm` built once on the base grid."""

    def __init__(self, name: str, perm: torch.Tensor, base: tuple[int, int], angle: float = 0.0):
        self.name, self.perm, self.base, self.angle = name, perm.long(), base, angle
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def indices(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(perm, inverse perm) at this size: each base pixel becomes a k x k block moved as one."""
        if (height, width) not in self._cache:
            hb, wb = self.base
            k = height // hb
            if height != k * hb or width != k * wb:
                raise DiffcliError(f"view {self.name} was built for {hb}x{wb} images; {height}x{width} is not a "
                                   "whole multiple of it")
            i = torch.arange(height).view(-1, 1)
            j = torch.arange(width).view(1, -1)
            src = self.perm[(i // k) * wb + j // k]  # the base pixel each output block reads
            perm = ((src // wb) * k + i % k) * width + (src % wb) * k + j % k
            perm = perm.flatten()
            self._cache[(height, width)] = (perm, torch.argsort(perm))
        return self._cache[(height, width)]

    def _gather(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return x.flatten(-2)[..., idx.to(x.device)].view(x.shape)

    def view(self, x):
        return self._gather(x, self.indices(*x.shape[-2:])[0])

    def inverse_view(self, x):
        return self._gather(x, self.indices(*x.shape[-2:])[1])


def _grid(height: int, width: int) -> torch.Tensor:
    return torch.arange(height * width).view(height, width)


def _split(size: int, parts: int, what: str) -> int:
    if parts < 1 or size % parts:
        raise DiffcliError(f"{what}: {size} px does not split into {parts} equal parts")
    return size // parts


def skew_perm(height: int, width: int, factor: float) -> torch.Tensor:
    """Column j slides down by round(factor * (j - centre)) rows, wrapping around: a shear that stays a bijection."""
    idx = _grid(height, width)
    shifts = [round(factor * (j - (width - 1) / 2)) for j in range(width)]
    return torch.stack([idx[:, j].roll(s) for j, s in enumerate(shifts)], 1).flatten()


def patch_perm(height: int, width: int, patches: int, seed: int) -> torch.Tensor:
    """The image cut into patches x patches tiles, shuffled by a seeded permutation."""
    ph, pw = _split(height, patches, "patch_permute"), _split(width, patches, "patch_permute")
    order = torch.randperm(patches * patches, generator=torch.Generator().manual_seed(seed))
    tiles = _grid(height, width).view(patches, ph, patches, pw).permute(0, 2, 1, 3).reshape(-1, ph, pw)
    return tiles[order].view(patches, patches, ph, pw).permute(0, 2, 1, 3).flatten()


def pixel_perm(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randperm(height * width, generator=torch.Generator().manual_seed(seed))


def jigsaw_perm(height: int, width: int, pieces: int, seed: int) -> torch.Tensor:
    """Interlocking puzzle pieces shuffled: a pieces x pieces grid of cells, each with a round tab into its right
    and lower neighbour (wrapping around the border), so every piece is the same shape and any shuffle of the
    pieces tiles the image again exactly."""
    ch, cw = _split(height, pieces, "jigsaw"), _split(width, pieces, "jigsaw")
    i = torch.arange(height, dtype=torch.float64).view(-1, 1) + 0.5
    j = torch.arange(width, dtype=torch.float64).view(1, -1) + 0.5
    row, col = (i // ch).long().expand(height, width), (j // cw).long().expand(height, width)
    radius = min(ch, cw) / 4  # tabs of neighbouring edges never touch: 2 radius < cell / sqrt(2)
    # a tab of the piece on the left, centred on the vertical edge at the start of this cell, reaching into it
    in_left_tab = ((i % ch - ch / 2) ** 2 + (j % cw) ** 2 < radius ** 2)
    in_upper_tab = ((i % ch) ** 2 + (j % cw - cw / 2) ** 2 < radius ** 2)
    col = torch.where(in_left_tab, col - 1, col) % pieces
    row = torch.where(in_upper_tab & ~in_left_tab, row - 1, row) % pieces
    order = torch.randperm(pieces * pieces, generator=torch.Generator().manual_seed(seed))
    src = order[row * pieces + col]  # the piece whose content lands on this pixel's piece
    di, dj = (src // pieces - row) * ch, (src % pieces - col) * cw
    ii = (torch.arange(height).view(-1, 1) + di) % height
    jj = (torch.arange(width).view(1, -1) + dj) % width
    return (ii * width + jj).flatten()


def inner_rotate_perm(height: int, width: int, angle: float) -> torch.Tensor:
    """The inscribed disc turns clockwise by `angle` degrees, the corners stay. Exact bijection: pixels of each
    one-pixel-wide ring are ordered by angle and shifted along the ring, so 90 degrees on a square is exactly
    a quarter turn of the disc."""
    # doubled coordinates relative to the centre keep every quantity an exact integer
    di = (2 * torch.arange(height) - (height - 1)).view(-1, 1).expand(height, width).flatten().numpy()
    dj = (2 * torch.arange(width) - (width - 1)).view(1, -1).expand(height, width).flatten().numpy()
    r2 = di.astype(np.int64) ** 2 + dj.astype(np.int64) ** 2
    perm = np.arange(height * width)
    inside = r2 < min(height, width) ** 2
    ring = np.floor(np.sqrt(r2) / 2).astype(np.int64)
    theta = np.arctan2(di, dj)  # image rows grow downwards, so increasing theta runs clockwise
    for k in np.unique(ring[inside]):
        members = np.nonzero(inside & (ring == k))[0]
        members = members[np.lexsort((r2[members], theta[members]))]
        shift = round(angle / 360 * len(members))
        perm[members] = np.roll(members, shift)  # the pixel at ring position p shows the one at p - shift
    return torch.from_numpy(perm)


def square_hinge_perm(height: int, width: int, squares: int) -> torch.Tensor:
    """A squares x squares grid of squares, each turning a quarter about its own centre, neighbours in
    opposite directions (like a hinged dissection folding open)."""
    s = _split(height, squares, "square_hinge")
    idx = _grid(height, width).clone()
    for r in range(squares):
        for c in range(squares):
            block = idx[r * s:(r + 1) * s, c * s:(c + 1) * s]
            idx[r * s:(r + 1) * s, c * s:(c + 1) * s] = torch.rot90(block, -1 if (r + c) % 2 == 0 else 1)
    return idx.flatten()


@dataclass
class ViewOptions:
    """Knobs of the parametrised views; permutations are seeded so a view is the same in every run."""
    seed: int = 0
    patches: int = 8       # patch_permute: patches per side
    pieces: int = 4        # jigsaw: pieces per side
    squares: int = 2       # square_hinge: squares per side
    skew: float = 0.5      # skew: rows of shift per column
    inner_angle: float = 90.0
    # factorized views' filters, at the base (stage I) size; they scale with the image as the permutations do
    hybrid_sigma: float = 2.0                          # low_pass / high_pass: the Gaussian's std in px
    triple_sigmas: tuple[float, float] = (1.0, 2.0)    # triple_*: the two Gaussians' std in px (fine, coarse)
    motion_size: int = 7                               # motion_*: length of the diagonal blur in px
    scale_factor: int = 4                              # scale_*: the image seen shrunk by this factor


def make_view(name: str, height: int, width: int, opts: ViewOptions | None = None) -> View:
    """The named view for a canvas of height x width (its base grid)."""
    o = opts or ViewOptions()
    if name not in VIEWS:
        raise DiffcliError(f"unknown view {name!r}; choose from {', '.join(VIEWS)}")
    if VIEWS[name].square_only and height != width:
        raise DiffcliError(f"view {name} needs a square image, got {height}x{width}")
    return VIEWS[name].make(name, height, width, o)


# ---------------------------------------------------------------- factorized views

class Component(View):
    """One component f of a factorized image x = sum_i f_i(x) (Factorized Diffusion, Geng et al. 2024): the model
    sees the whole image (`view` is the identity) and its prediction counts only through its component
    (`inverse_view` = f), so the synchronized prediction is sum_i f_i(D_i(x)): each prompt drives one component.
    The components of one factorization (`FACTORS`) sum to the identity, so they count 1/parts each in a
    ViewSet's coverage and its average is that sum. `look` is what a viewer of the component sees (the hybrid's
    far-away blur, the grey picture, the motion-blurred one); filters are set at the base (stage I) size and
    scale with the image (k times the size: k times the blur), so both IF stages see the same illusion."""

    def __init__(self, name: str, factor: str, part: int, base: int,
                 split: Callable[[torch.Tensor, int], list[torch.Tensor]], looks: Callable | None = None):
        self.name, self.factor, self.part, self.base, self.split = name, factor, part, base, split
        self.share = 1.0 / len(FACTORS[factor])
        self._looks = looks

    def k(self, x: torch.Tensor) -> int:
        return max(1, x.shape[-2] // self.base)

    def view(self, x):
        return x

    def inverse_view(self, x):
        return self.split(x, self.k(x))[self.part]

    def components(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every component of x under this view's factorization, in FACTORS order: they sum to x."""
        return self.split(x, self.k(x))

    def look(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._looks is None else self._looks(x, self.k(x))


def _odd(n: int) -> int:
    return n if n % 2 else n + 1


def gaussian_blur(x: torch.Tensor, sigma: float, size: int) -> torch.Tensor:
    """Separable Gaussian blur of (..., C, H, W), reflected at the border (as torchvision's); `size` (odd) is cut to
    what the image can reflect."""
    h, w = x.shape[-2:]
    size = min(_odd(size), _odd(2 * min(h, w) - 3) if min(h, w) > 2 else 1)
    if size < 3 or sigma <= 0:
        return x
    r = size // 2
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = (g / g.sum()).to(x.dtype).to(x.device)
    shape = x.shape
    y = x.reshape(-1, 1, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1))
    return y.reshape(shape)


def motion_blur(x: torch.Tensor, size: int) -> torch.Tensor:
    """The diagonal motion blur of Factorized Diffusion: the mean along the top-left to bottom-right diagonal (a
    size x size identity-matrix kernel / size, zero padding), per channel, as `size` shifted copies."""
    r = _odd(size) // 2
    h, w = x.shape[-2:]
    padded = F.pad(x, (r, r, r, r))
    out = torch.zeros_like(x)
    for d in range(2 * r + 1):
        out += padded[..., d:d + h, d:d + w]
    return out / (2 * r + 1)


def _hybrid(o: "ViewOptions"):
    def split(x, k):
        low = gaussian_blur(x, o.hybrid_sigma * k, 33 * k)
        return [low, x - low]
    return split


def _triple(o: "ViewOptions"):
    def split(x, k):
        fine, coarse = o.triple_sigmas
        mid_and_low = gaussian_blur(x, fine * k, 33 * k)
        low = gaussian_blur(mid_and_low, coarse * k, 33 * k)
        return [low, mid_and_low - low, x - mid_and_low]
    return split


def _colour(o: "ViewOptions"):
    def split(x, k):
        grey = x.mean(-3, keepdim=True).expand_as(x)
        return [grey, x - grey]
    return split


def _motion(o: "ViewOptions"):
    def split(x, k):
        blurred = motion_blur(x, o.motion_size * k)
        return [blurred, x - blurred]
    return split


def shrunk(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as seen shrunk by `block`: each block x block square its mean (the image at 1/block the size, shown at
    full size)."""
    h, w = x.shape[-2:]
    if block <= 1:
        return x
    if h % block or w % block:
        raise DiffcliError(f"scale views: {h}x{w} px does not split into {block}x{block} blocks (--scale-factor)")
    y = F.avg_pool2d(x.reshape(-1, 1, h, w), block)
    return F.interpolate(y, scale_factor=block, mode="nearest").reshape(x.shape)


def _scale(o: "ViewOptions"):
    def split(x, k):
        small = shrunk(x, o.scale_factor * k)
        return [small, x - small]
    return split


# factorization -> (its views in component order, how its components are computed, how each is seen)
FACTORS: dict[str, tuple[str, ...]] = {
    "hybrid": ("low_pass", "high_pass"),
    "triple": ("triple_low", "triple_mid", "triple_high"),
    "colour": ("grayscale", "color"),
    "motion": ("motion_blur", "motion_rest"),
    "scale": ("scale_small", "scale_rest"),
}
_SPLITS = {"hybrid": _hybrid, "triple": _triple, "colour": _colour, "motion": _motion, "scale": _scale}
_LOOKS: dict[str, Callable] = {  # what a viewer of the component sees; the rest see the image itself
    "low_pass": lambda o: lambda x, k: gaussian_blur(x, 2 * o.hybrid_sigma * k, 65 * k),
    "triple_low": lambda o: lambda x, k: gaussian_blur(x, 2 * o.triple_sigmas[1] * k, 65 * k),
    "triple_mid": lambda o: lambda x, k: gaussian_blur(x, o.triple_sigmas[1] * k, 33 * k),
    "grayscale": lambda o: lambda x, k: x.mean(-3, keepdim=True).expand_as(x),
    "motion_blur": lambda o: lambda x, k: motion_blur(x, o.motion_size * k),
    "scale_small": lambda o: lambda x, k: shrunk(x, o.scale_factor * k),
}


def _component(factor: str) -> Callable[[str, int, int, "ViewOptions"], View]:
    def make(name, height, width, o):
        look = _LOOKS.get(name)
        return Component(name, factor, FACTORS[factor].index(name), height, _SPLITS[factor](o),
                         look(o) if look else None)
    return make


def check_factorized(names: list[str]) -> None:
    """Factorized views go in whole factorizations (their components must sum to the image) and not with other
    views; one line naming the sets otherwise."""
    factors = {VIEWS[n].factor for n in names if n in VIEWS}
    if factors == {None}:
        return
    sets = " | ".join(" ".join(v) for v in FACTORS.values())
    whole = len(factors) == 1 and None not in factors and sorted(names) == sorted(FACTORS[next(iter(factors))])
    if not whole:
        raise DiffcliError(f"factorized views come as one whole set, each view once and no other view: {sets} "
                           f"(got {' '.join(names)})")


# ---------------------------------------------------------------- panorama windows

@dataclass(frozen=True)
class Window:
    """A crop of a canvas; inverse_view pastes it back into zeros of the canvas size. With `wrap` the canvas is a
    cylinder: a window running past the right border continues at the left one (a 360-degree panorama)."""
    top: int
    left: int
    height: int
    width: int
    canvas: tuple[int, int]
    name: str = "window"
    wrap: bool = False

    def _spans(self) -> list[tuple[int, int, int]]:
        """(canvas column start, stop, column offset in the window) of the window's one or two pieces."""
        right = self.left + self.width
        if not self.wrap or right <= self.canvas[1]:
            return [(self.left, right, 0)]
        cut = self.canvas[1] - self.left
        return [(self.left, self.canvas[1], 0), (0, right - self.canvas[1], cut)]

    def view(self, x: torch.Tensor) -> torch.Tensor:
        rows = x[..., self.top:self.top + self.height, :]
        spans = self._spans()
        if len(spans) == 1:
            return rows[..., self.left:self.left + self.width]
        return torch.cat([rows[..., a:b] for a, b, _ in spans], -1)

    def inverse_view(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-2], *self.canvas)
        self.accumulate(out, x)
        return out

    def accumulate(self, acc: torch.Tensor, x: torch.Tensor) -> None:
        """acc += inverse_view(x), without building a canvas of zeros per window."""
        rows = acc[..., self.top:self.top + self.height, :]
        for a, b, off in self._spans():
            rows[..., a:b].add_(x[..., off:off + b - a])

    def scaled(self, k: int) -> "Window":
        """The same window on a k times larger canvas (latent window -> pixel tile)."""
        return Window(self.top * k, self.left * k, self.height * k, self.width * k,
                      (self.canvas[0] * k, self.canvas[1] * k), self.name, self.wrap)


def window_starts(size: int, window: int, stride: int, circular: bool = False) -> list[int]:
    """0, stride, 2 stride, ... and a last window flush with the border when the stride does not land there.
    `circular`: the axis closes on itself, so windows start at 0, stride, ... while they start inside it
    (size // stride of them, as diffusers' panorama pipeline with circular padding) and the last ones wrap."""
    if window > size:
        raise DiffcliError(f"the canvas ({size}) is smaller than one window ({window})")
    if not 1 <= stride <= window:
        raise DiffcliError(f"stride {stride} must be between 1 and the window size {window}")
    if circular and size > window:
        starts = [i * stride for i in range(size // stride)]
        if starts[-1] + window < size:
            raise DiffcliError(f"circular windows of {window} every {stride} leave cells {starts[-1] + window} to "
                               f"{size - 1} of the {size} around the cylinder unseen: take a stride dividing "
                               f"{size} or a wider window")
        return starts
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def windows(height: int, width: int, window: tuple[int, int], stride: int, circular: bool = False) -> list[Window]:
    """Every window of a (height, width) canvas, row by row: 512x3072 px / 8 = 64x384 latent, 64 wide, stride 8 -> 41.
    Windows run over both axes when both sides exceed the window (a 2-D canvas); `circular` wraps the side border
    (384 / 8 = 48 windows for the 360-degree 64x384 canvas)."""
    wh, ww = window
    wrap = circular and width > ww
    return [Window(t, l, wh, ww, (height, width), wrap=wrap)
            for t in window_starts(height, wh, stride) for l in window_starts(width, ww, stride, circular)]


# ---------------------------------------------------------------- a canvas and its views

@dataclass
class ViewSet:
    """The views of one canvas of shape (C, H, W): forward to instances, average instances back.

    `weights` (optional, one (1, h, w) tensor per view, in the view's own frame) make the average a per-pixel
    weighted one (region prompts: each instance counts where its mask is); without them every view counts 1."""
    views: list
    canvas: tuple[int, int, int]
    weights: list | None = None
    count: torch.Tensor = field(init=False)

    def __post_init__(self):
        if self.weights is not None and len(self.weights) != len(self.views):
            raise ValueError(f"{len(self.weights)} weights for {len(self.views)} views")
        self.count = coverage(self.views, self.canvas[1:], self.weights)
        if (self.count == 0).any():
            missing = int((self.count == 0).sum())
            raise DiffcliError(f"{missing} canvas pixels are seen by no view" if self.weights is None else
                               f"{missing} canvas pixels have zero total weight")

    def __len__(self) -> int:
        return len(self.views)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Canvas (C, H, W) -> instances (V, C, h, w)."""
        return torch.stack([v.view(z) for v in self.views])

    def average(self, xs: torch.Tensor) -> torch.Tensor:
        """Instances (V, C, h, w) -> canvas: every instance mapped back, overlaps averaged (weighted)."""
        acc = xs.new_zeros(self.canvas)
        for i, (v, x) in enumerate(zip(self.views, xs)):
            if self.weights is not None:
                x = x * self.weights[i].to(x.device, x.dtype)
            if isinstance(v, Window):
                v.accumulate(acc, x)
            else:
                acc += v.inverse_view(x)
        return acc / self.count.to(acc.device, acc.dtype)

    def looks(self, z: torch.Tensor) -> torch.Tensor:
        """Canvas -> what each view's viewer sees (V, C, h, w): the view itself, or a component's look."""
        return torch.stack([v.look(z) if isinstance(v, Component) else v.view(z) for v in self.views])

    def project(self, xs: torch.Tensor) -> torch.Tensor:
        """Average to the canvas and map forward again: the nearest set of instances that agree."""
        return self.forward(self.average(xs))


def coverage(views: list, hw: tuple[int, int], weights: list | None = None) -> torch.Tensor:
    """How many views see each canvas pixel, shape (1, H, W): 1 for each bijection, the overlap for windows; with
    weights, the sum of the views' weights there."""
    count = torch.zeros(1, *hw)
    for i, v in enumerate(views):
        one = (torch.ones(1, v.height, v.width) if isinstance(v, Window) else torch.ones(1, *hw)) \
            if weights is None else weights[i].float().cpu()
        if isinstance(v, Window):
            v.accumulate(count, one)
        elif isinstance(v, Component):  # a factorization's parts sum to one image: each counts its share
            count += v.share * one
        else:
            count += v.inverse_view(one) if weights is not None else one
    return count


# ---------------------------------------------------------------- animation frames

def frame(v: View, x: torch.Tensor, t: float, background: float = 1.0) -> torch.Tensor:
    """x (C, H, W) part way (t in [0, 1]) into view v, by its kind's `frame` (VIEWS): turning views turn, negate
    fades through grey, every other permutation moves each pixel on a straight line to its place (later pixels drawn
    on top), identity and flip stay still until t = 1."""
    if t <= 0:
        return x
    if t >= 1 and not isinstance(v, Component):  # a component's view is the image: its frames show the look
        return v.view(x)
    kind = VIEWS.get(v.name)
    return x if kind is None else kind.frame(v, x, t, background)


def still(v: View, x: torch.Tensor, t: float, background: float) -> torch.Tensor:
    return x


def fade(v: View, x: torch.Tensor, t: float, background: float) -> torch.Tensor:
    """Negate: through grey (0) to -x."""
    return (1 - 2 * t) * x


def turn(v: View, x: torch.Tensor, t: float, background: float) -> torch.Tensor:
    """The whole picture turns by t times the view's angle."""
    return rotate_image(x, v.angle * t)


def turn_disc(v: View, x: torch.Tensor, t: float, background: float) -> torch.Tensor:
    """The inscribed disc turns by t times the view's angle, the corners stay."""
    h, w = x.shape[-2:]
    i = (2 * torch.arange(h) - (h - 1)).view(-1, 1)
    j = (2 * torch.arange(w) - (w - 1)).view(1, -1)
    return torch.where(i ** 2 + j ** 2 < min(h, w) ** 2, turn(v, x, t, background), x)


def move(v: View, x: torch.Tensor, t: float, background: float) -> torch.Tensor:
    """Each pixel of a permutation on a straight line from where it is to its place, later pixels on top."""
    h, w = x.shape[-2:]
    perm = v.indices(h, w)[0]
    dest = torch.arange(h * w)
    pos = lambda p: torch.stack([p // w, p % w]).double()
    here = ((1 - t) * pos(perm) + t * pos(dest)).round().long()
    out = x.new_full(x.shape, background).flatten(-2)
    out[..., here[0] * w + here[1]] = x.flatten(-2)[..., perm]
    return out.view(x.shape)


def zoom(v: View, x: torch.Tensor, t: float, background: float) -> torch.Tensor:
    """Hybrid images: the picture shrinks (walking away from it) to 1/12 of its size, centred on the background,
    as Visual Anagrams' hybrid animations."""
    h, w = x.shape[-2:]
    f = 1 + 11 * min(max(t, 0.0), 1.0)
    nh, nw = max(1, round(h / f)), max(1, round(w / f))
    small = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    out = x.new_full(x.shape, background)
    top, left = (h - nh) // 2, (w - nw) // 2
    out[..., top:top + nh, left:left + nw] = small
    return out


def desaturate(v: View, x: torch.Tensor, t: float, background: float) -> torch.Tensor:
    """Grayscale / colour: the colour fades out to the grey picture."""
    grey = x.mean(-3, keepdim=True).expand_as(x)
    return grey + (1 - min(max(t, 0.0), 1.0)) * (x - grey)


def shake(v: View, x: torch.Tensor, t: float, background: float) -> torch.Tensor:
    """Motion blur: the picture shakes along the blur's diagonal (a triangular wave), as the eye sees a moving
    picture blurred."""
    h = x.shape[-2]
    amp = max(1, round(h * 29 / 512))
    offset = round(amp * 2 / math.pi * math.asin(math.sin(2 * math.pi * 2.5 * t)))  # 2.5 periods over t
    out = x.new_full(x.shape, background)
    src = x[..., max(0, -offset):h - max(0, offset), max(0, -offset):x.shape[-1] - max(0, offset)]
    out[..., max(0, offset):max(0, offset) + src.shape[-2], max(0, offset):max(0, offset) + src.shape[-1]] = src
    return out


def rotate_image(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Bilinear turn of (C, H, W) clockwise about its centre (for pictures only; the views themselves are exact)."""
    a = math.radians(degrees)
    # affine_grid maps output to input coordinates: the inverse (counter-clockwise) turn
    theta = torch.tensor([[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta[None], [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None], grid, align_corners=False, padding_mode="border")[0]


# ---------------------------------------------------------------- the registry

Frame = Callable[[View, torch.Tensor, float, float], torch.Tensor]  # (view, picture, t, background) -> picture


@dataclass(frozen=True)
class ViewKind:
    """One entry of VIEWS: how to build the view (name, height, width, options), how an animation shows it part
    way (`frame`), whether it needs a square image (its instance would not have the canvas's shape otherwise),
    and its help line."""
    make: Callable[[str, int, int, ViewOptions], View]
    frame: Frame
    description: str
    square_only: bool = False
    factor: str | None = None   # factorized views: the factorization (FACTORS) whose component this is
    pixel_only: bool = False    # defined on RGB pixels only (a latent's channels are not colours)
    latent: bool = False  # means the same on a latent grid (cells move whole): latent models (SD, SDXL, SD3, Flux) take it


def _same(cls: type) -> Callable[[str, int, int, ViewOptions], View]:
    return lambda name, height, width, o: cls()


def _quarters(k: int) -> Callable[[str, int, int, ViewOptions], View]:
    return lambda name, height, width, o: Rotate(k, name)


def _permutation(perm: Callable[[int, int, ViewOptions], torch.Tensor],
                 angle: Callable[[ViewOptions], float] = lambda o: 0.0) -> Callable[[str, int, int, ViewOptions], View]:
    """A Permute view whose permutation is built on the canvas's own grid (its base)."""
    return lambda name, height, width, o: Permute(name, perm(height, width, o), (height, width), angle(o))


VIEWS: dict[str, ViewKind] = {
    "identity": ViewKind(_same(Identity), still, "the image as it is"),
    "flip": ViewKind(_same(Flip), still, "upside down"),
    "rotate_cw": ViewKind(_quarters(1), turn, "a quarter turn clockwise", square_only=True),
    "rotate_ccw": ViewKind(_quarters(3), turn, "a quarter turn counter-clockwise", square_only=True),
    "rotate_180": ViewKind(_quarters(2), turn, "a half turn"),
    "negate": ViewKind(_same(Negate), fade, "the colours negated"),
    "skew": ViewKind(_permutation(lambda h, w, o: skew_perm(h, w, o.skew)), move,
                     "columns slid by --skew rows each, wrapping"),
    "patch_permute": ViewKind(_permutation(lambda h, w, o: patch_perm(h, w, o.patches, o.seed)), move,
                              "square patches shuffled"),
    "pixel_permute": ViewKind(_permutation(lambda h, w, o: pixel_perm(h, w, o.seed)), move, "pixels shuffled"),
    "jigsaw": ViewKind(_permutation(lambda h, w, o: jigsaw_perm(h, w, o.pieces, o.seed)), move,
                       "interlocking puzzle pieces shuffled"),
    "inner_rotate": ViewKind(_permutation(lambda h, w, o: inner_rotate_perm(h, w, o.inner_angle),
                                          lambda o: o.inner_angle), turn_disc, "the inscribed disc turned"),
    "square_hinge": ViewKind(_permutation(lambda h, w, o: square_hinge_perm(h, w, o.squares), lambda o: 90.0), move,
                             "squares each turned a quarter, neighbours opposite ways", square_only=True),
    # factorized views (Factorized Diffusion): whole sets only (FACTORS), components summing to the image
    "low_pass": ViewKind(_component("hybrid"), zoom, "hybrid image: the Gaussian low-pass (seen from afar)",
                         factor="hybrid"),
    "high_pass": ViewKind(_component("hybrid"), zoom, "hybrid image: the rest, high frequencies (seen close up)",
                          factor="hybrid"),
    "triple_low": ViewKind(_component("triple"), zoom, "triple hybrid: the lowest band", factor="triple"),
    "triple_mid": ViewKind(_component("triple"), zoom, "triple hybrid: the middle band", factor="triple"),
    "triple_high": ViewKind(_component("triple"), zoom, "triple hybrid: the highest band", factor="triple"),
    "grayscale": ViewKind(_component("colour"), desaturate, "colour hybrid: the grey image (channel mean)",
                          factor="colour", pixel_only=True),
    "color": ViewKind(_component("colour"), desaturate, "colour hybrid: the colour (image minus its grey)",
                      factor="colour", pixel_only=True),
    "motion_blur": ViewKind(_component("motion"), shake, "motion hybrid: the diagonally motion-blurred image",
                            factor="motion"),
    "motion_rest": ViewKind(_component("motion"), shake, "motion hybrid: the rest (image minus its motion blur)",
                            factor="motion"),
    "scale_small": ViewKind(_component("scale"), zoom, "scale hybrid: the image at 1/--scale-factor the size",
                            factor="scale"),
    "scale_rest": ViewKind(_component("scale"), zoom, "scale hybrid: the rest (the detail a small copy loses)",
                           factor="scale"),
}
SQUARE_ONLY = having(VIEWS, lambda k: k.square_only)  # their instance would not have the canvas's shape
FACTORIZED = having(VIEWS, lambda k: k.factor is not None)
BIJECTIONS = having(VIEWS, lambda k: k.factor is None)  # exact inverse_view(view(x)) == x
PIXEL_ONLY = having(VIEWS, lambda k: k.pixel_only)


# Views that move whole cells keep their meaning on a VAE's latent grid (a flipped or turned latent decodes to
# about the flipped or turned image, a permutation of latent-cell blocks to the same permutation of pixel blocks);
# negate (a latent's negative is no image's negative), skew and inner_rotate (they cut through cells along lines
# the VAE's 8 px cells do not follow) have none there.
for _name in ("identity", "flip", "rotate_cw", "rotate_ccw", "rotate_180", "patch_permute", "pixel_permute", "jigsaw",
              "square_hinge"):
    VIEWS[_name] = dataclasses.replace(VIEWS[_name], latent=True)


def describe() -> str:
    """VIEWS with their help lines, for the --views help."""
    return registries.describe(VIEWS)
