"""Moving-digit sequences (the 001 seed's synthetic sets) and their metrics, as tensor functions.

A sequence sample is C context frames, the next frame, and what the generator knows about that next
frame: every future it allows (rendered, with its pixel shift from the last context frame and its
probability). The metrics read those generator facts, never a learned judge.

- moving-mnist: a digit moving with constant velocity (each component in [-step, step]), bouncing off the
  borders; one true future (the context must show >= 2 frames to reveal the velocity).
- circle-jumping: the digit sits at the centre, jumps to one of K points on a circle of radius `step` and
  back (the 001 seed's back-and-forth); the last context frame is at the centre, so the next frame is one
  of K equally likely jumps.
- horizontal: the digit arrives at the centre from a random side, `step` pixels a frame; the next frame
  moves left with probability p_left, right otherwise.

Item i uses MNIST digit i (resized to half the frame) and a generator seeded by (seed, i), so a dataset
index is all it takes to regenerate a context and its true futures.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..shared.errors import DiffcliError
from ..shared.images import save_figure, to_model_range

SEQUENCE_DIGITS = "sequence.digits"  # a next-frame model file's digit tiles, uint8 (M, s, s), of its sequences 0..M-1
CARRIED_DIGITS = 1000                # how many a model file carries (256 KB for 16-px digits)

KINDS = ("moving-mnist", "circle-jumping", "horizontal")


@dataclass(frozen=True)
class SequenceSpec:
    kind: str
    frame_size: int = 32
    context_frames: int = 2
    step_size: int = 4
    directions: int = 4   # circle-jumping: K points on the circle
    p_left: float = 0.5   # horizontal: probability of moving left
    seed: int = 0
    p_change: float = 0.0  # moving-mnist: probability that the velocity is redrawn before each move (0: constant)
    num_digits: int = 1    # moving-mnist: 1, or 2 digits moving independently (sequence i: digits i and i + 1)

    @property
    def digit_size(self) -> int:
        return self.frame_size // 2

    @property
    def span(self) -> int:
        """Positions of the digit's top-left corner run over 0..span on each axis."""
        return self.frame_size - self.digit_size

    def record(self) -> dict[str, Any]:
        return asdict(self)


def circle_shifts(k: int, step: int) -> torch.Tensor:
    """(K, 2) integer (dy, dx) shifts at angles 2 pi j / K on a circle of radius step; angle 0 = right,
    counter-clockwise as seen on screen (y points down)."""
    angle = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    return torch.stack([-(step * angle.sin()), step * angle.cos()], 1).round().long()


def check_spec(spec: SequenceSpec) -> None:
    """Every way the options can fail to describe a sequence set, as one-line errors."""
    if spec.kind not in KINDS:
        raise DiffcliError(f"unknown sequence dataset {spec.kind!r}; choose one of {', '.join(KINDS)}")
    if spec.frame_size < 8:
        raise DiffcliError(f"frame_size must be >= 8, got {spec.frame_size}")
    if spec.context_frames < 1:
        raise DiffcliError(f"context_frames must be >= 1, got {spec.context_frames}")
    if spec.step_size < 1:
        raise DiffcliError(f"step_size must be >= 1 pixel, got {spec.step_size}")
    if spec.directions < 1:
        raise DiffcliError(f"directions must be >= 1, got {spec.directions}")
    if not (math.isfinite(spec.p_left) and 0.0 <= spec.p_left <= 1.0):
        raise DiffcliError(f"p_left is a probability and must be in [0, 1], got {spec.p_left}")
    if not (math.isfinite(spec.p_change) and 0.0 <= spec.p_change <= 1.0):
        raise DiffcliError(f"p_change is a probability and must be in [0, 1], got {spec.p_change}")
    if spec.num_digits not in (1, 2):
        raise DiffcliError(f"num_digits must be 1 or 2, got {spec.num_digits}")
    if spec.num_digits == 2 and spec.p_change > 0:
        raise DiffcliError("p_change with num_digits 2 would make every pair of moves a future (thousands); "
                           "use one of the two")
    room = spec.span // 2  # pixels between the centred digit and the border
    digit = f"a {spec.digit_size}-px digit in a {spec.frame_size}-px frame has {room} px of room on each side"
    if spec.kind == "moving-mnist":
        if spec.context_frames < 2:
            raise DiffcliError("moving-mnist needs context_frames >= 2 (one frame shows no velocity)")
        if spec.step_size > spec.span:
            raise DiffcliError(f"step_size {spec.step_size} exceeds the {spec.span} px a digit can travel in a "
                               f"{spec.frame_size}-px frame")
    elif spec.kind == "circle-jumping":
        if spec.step_size > room:
            raise DiffcliError(f"step_size {spec.step_size} leaves the frame: {digit}")
        shifts = circle_shifts(spec.directions, spec.step_size)
        if len(torch.unique(shifts, dim=0)) < spec.directions:
            raise DiffcliError(f"{spec.directions} directions at step_size {spec.step_size} collide once rounded to "
                               f"whole pixels; use a larger step_size or fewer directions")
    else:
        need = spec.step_size * max(spec.context_frames - 1, 1)
        if need > room:
            raise DiffcliError(f"step_size {spec.step_size} x {spec.context_frames} context frames needs {need} px: "
                               f"{digit}")


# ---------------------------------------------------------------- generators

@dataclass
class Track:
    """Where the digit is: (C, 2) context positions, the (K, 2) allowed next positions (probability > 0),
    their probabilities, and which one the sequence took. Positions are the digit's top-left (y, x)."""
    context: torch.Tensor
    futures: torch.Tensor
    probs: torch.Tensor
    choice: int

    @property
    def shifts(self) -> torch.Tensor:
        return self.futures - self.context[-1]


def _bounce(pos: torch.Tensor, vel: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One constant-velocity step, reflected at 0 and span (|vel| <= span, so one reflection suffices)."""
    p, v = pos + vel, vel.clone()
    low, high = p < 0, p > span
    p = torch.where(low, -p, torch.where(high, 2 * span - p, p))
    v[low | high] *= -1
    return p, v


def velocities(step: int) -> torch.Tensor:
    """(M, 2) the moving-mnist velocities: every non-zero (vy, vx) in [-step, step]^2, in row-major order."""
    r = torch.arange(-step, step + 1)
    v = torch.cartesian_prod(r, r)
    return v[(v != 0).any(1)]


def _moving_track(spec: SequenceSpec, g: torch.Generator) -> Track:
    """One moving-mnist digit: a uniform start and velocity, bouncing off the borders; with p_change > 0 the
    velocity is redrawn (uniformly, possibly the same) with that probability before every move after the first,
    so the next frame has every velocity's landing place as a future: (1 - p) + p/M for the current velocity,
    p/M for each other one (M velocities; landing places that coincide after a bounce merge)."""
    c, span = spec.context_frames, spec.span
    all_v = velocities(spec.step_size)
    draw_velocity = lambda: all_v[int(torch.randint(0, len(all_v), (1,), generator=g))]  # noqa: E731 (uniform)
    pos = torch.randint(0, span + 1, (2,), generator=g)
    vel = draw_velocity()
    track = [pos]
    for t in range(c):
        if t == c - 1:
            before = vel  # the velocity the next move keeps unless it is redrawn
        if t and spec.p_change and float(torch.rand(1, generator=g)) < spec.p_change:
            vel = draw_velocity()
        pos, vel = _bounce(pos, vel, span)
        track.append(pos)
    if not spec.p_change:
        return Track(torch.stack(track[:c]), track[c][None], torch.ones(1), 0)
    landing = torch.stack([_bounce(track[c - 1], v, span)[0] for v in all_v])
    probs = torch.full((len(all_v),), spec.p_change / len(all_v), dtype=torch.float64)
    probs[(all_v == before).all(1)] += 1 - spec.p_change
    futures, where = torch.unique(landing, dim=0, return_inverse=True)
    merged = torch.zeros(len(futures), dtype=torch.float64).index_add_(0, where, probs)
    keep = merged > 0
    futures, merged = futures[keep], merged[keep]
    choice = int(((futures == track[c]).all(1)).nonzero()[0])
    return Track(torch.stack(track[:c]), futures, merged.float(), choice)


def draw_tracks(spec: SequenceSpec, index: int) -> list[Track]:
    """The motion of each digit of sequence `index` (moving-mnist may have two), a pure function of (spec, index)."""
    if spec.kind != "moving-mnist":
        return [draw_track(spec, index)]
    g = torch.Generator().manual_seed(spec.seed * 1_000_003 + index)
    return [_moving_track(spec, g) for _ in range(spec.num_digits)]


def draw_track(spec: SequenceSpec, index: int) -> Track:
    """The motion of sequence `index` (its first digit's): a pure function of (spec, index)."""
    g = torch.Generator().manual_seed(spec.seed * 1_000_003 + index)
    c, span, step = spec.context_frames, spec.span, spec.step_size
    centre = torch.tensor([span // 2, span // 2])
    if spec.kind == "moving-mnist":
        return _moving_track(spec, g)
    if spec.kind == "circle-jumping":
        shifts = circle_shifts(spec.directions, step)
        jumps = torch.randint(0, spec.directions, (c,), generator=g)
        # back and forth, ending at the centre: frame c-1-t is out on the circle for odd t
        ctx = torch.stack([centre + shifts[jumps[t]] if (c - 1 - t) % 2 else centre for t in range(c)])
        choice = int(torch.randint(0, spec.directions, (1,), generator=g))
        return Track(ctx, centre + shifts, torch.full((spec.directions,), 1 / spec.directions), choice)
    side = 1 if float(torch.rand(1, generator=g)) < 0.5 else -1  # which side the digit comes from
    ctx = torch.stack([centre + torch.tensor([0, side * step * (c - 1 - t)]) for t in range(c)])
    left = float(torch.rand(1, generator=g)) < spec.p_left
    futures = centre + torch.tensor([[0, -step], [0, step]])
    probs = torch.tensor([spec.p_left, 1 - spec.p_left])
    keep = probs > 0
    choice = int(torch.cumsum(keep.long(), 0)[0 if left else 1]) - 1
    return Track(ctx, futures[keep], probs[keep], choice)


def render(digit: torch.Tensor, positions: torch.Tensor, frame_size: int) -> torch.Tensor:
    """(d, d) digit pasted at each (y, x) of (T, 2) positions -> (T, 1, S, S), same dtype as the digit."""
    d = digit.shape[-1]
    frames = digit.new_zeros((len(positions), 1, frame_size, frame_size))
    for t, (y, x) in enumerate(positions.tolist()):
        frames[t, 0, y:y + d, x:x + d] = digit
    return frames


def digit_tiles(images: torch.Tensor, size: int) -> torch.Tensor:
    """MNIST uint8 (N, 1, 28, 28) -> (N, size, size) uint8 (antialiased resize)."""
    if size == images.shape[-1]:
        return images[:, 0].clone()
    small = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return small.round().clamp(0, 255).to(torch.uint8)[:, 0]


@dataclass
class SequenceItem:
    context: torch.Tensor   # (C, S, S) like the digit (uint8 from MNIST)
    target: torch.Tensor    # (1, S, S) the next frame this sequence took
    futures: torch.Tensor   # (K, 1, S, S) every next frame the generator allows
    shifts: torch.Tensor    # (K, 2) (dy, dx) of each future from the last context frame
    probs: torch.Tensor     # (K,)
    choice: int


def tiles_of(digits: torch.Tensor, index: int, num_digits: int = 1) -> torch.Tensor:
    """(num_digits, s, s): the digit tiles of sequence `index`, digits index, index + 1 (wrapping at the set's end)."""
    return torch.stack([digits[(index + k) % len(digits)] for k in range(num_digits)])


def _paste(tiles: torch.Tensor, positions: list[torch.Tensor], size: int) -> torch.Tensor:
    """Every digit at its positions ((T, 2) each), overlaps taking the brighter pixel -> (T, 1, S, S)."""
    frames = [render(tile, pos, size) for tile, pos in zip(tiles, positions)]
    out = frames[0]
    for f in frames[1:]:
        out = torch.maximum(out, f)
    return out


def make_item(spec: SequenceSpec, digit: torch.Tensor, index: int) -> SequenceItem:
    """Sequence `index` with its truth: `digit` is its tile (s, s), or its tiles (num_digits, s, s) (`tiles_of`).
    With two digits the futures are every pair of the digits' futures (probabilities multiplied) and the shifts
    are those of the frame's ink centroid."""
    tiles = digit if digit.ndim == 3 else digit[None]
    tracks = draw_tracks(spec, index)
    if len(tracks) == 1:
        track = tracks[0]
        futures = render(tiles[0], track.futures, spec.frame_size)
        return SequenceItem(render(tiles[0], track.context, spec.frame_size)[:, 0], futures[track.choice],
                            futures, track.shifts, track.probs, track.choice)
    a, b = tracks
    ctx = _paste(tiles, [a.context, b.context], spec.frame_size)[:, 0]
    pairs = [(i, j) for i in range(len(a.futures)) for j in range(len(b.futures))]
    futures = torch.cat([_paste(tiles, [a.futures[i][None], b.futures[j][None]], spec.frame_size)
                         for i, j in pairs])
    probs = torch.stack([a.probs[i] * b.probs[j] for i, j in pairs])
    choice = pairs.index((a.choice, b.choice))
    shifts = centroid(ink(futures[:, 0]).double()) - centroid(ink(ctx[-1]).double())
    return SequenceItem(ctx, futures[choice], futures, shifts, probs, choice)


def make_dataset(spec: SequenceSpec, digits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence per digit: (N, C, S, S) contexts and (N, 1, S, S) next frames, uint8."""
    check_spec(spec)
    ctx, nxt = [], []
    for i in range(len(digits)):
        tracks = draw_tracks(spec, i)
        paths = [torch.cat([t.context, t.futures[t.choice][None]]) for t in tracks]
        frames = _paste(tiles_of(digits, i, spec.num_digits), paths, spec.frame_size)
        ctx.append(frames[:-1, 0])
        nxt.append(frames[-1])
    return torch.stack(ctx), torch.stack(nxt)


# ---------------------------------------------------------------- metrics (frames as ink in [0, 1])

def ink(x: torch.Tensor) -> torch.Tensor:
    """uint8 frames or model-range [-1, 1] frames -> float ink in [0, 1]."""
    if x.dtype == torch.uint8:
        return x.float() / 255
    return ((x.float() + 1) / 2).clamp(0, 1)


def centroid(frames: torch.Tensor) -> torch.Tensor:
    """(..., H, W) ink -> (..., 2) ink-weighted (y, x); an empty frame gives its centre."""
    h, w = frames.shape[-2:]
    ys = torch.arange(h, dtype=frames.dtype, device=frames.device)
    xs = torch.arange(w, dtype=frames.dtype, device=frames.device)
    mass = frames.sum((-2, -1))
    safe = mass.clamp(min=1e-8)
    cy = (frames.sum(-1) * ys).sum(-1) / safe
    cx = (frames.sum(-2) * xs).sum(-1) / safe
    empty = mass < 1e-8
    return torch.stack([torch.where(empty, torch.full_like(cy, (h - 1) / 2), cy),
                        torch.where(empty, torch.full_like(cx, (w - 1) / 2), cx)], -1)


def iou(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """IoU of the ink masks (ink > threshold) over the last two dims; two empty masks count as 1."""
    a, b = a > threshold, b > threshold
    inter = (a & b).sum((-2, -1)).float()
    union = (a | b).sum((-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def match_tolerance(shifts: torch.Tensor) -> float:
    """Half the smallest gap between the allowed shifts and 'not moving': closer than this to a shift
    means the digit moved that way, and no sample can be close to two."""
    pts = torch.cat([shifts.double(), shifts.new_zeros(1, 2).double()])
    d = torch.cdist(pts, pts)
    return 0.5 * float(d[~torch.eye(len(pts), dtype=torch.bool)].min())


def sequence_metrics(samples: torch.Tensor, last_context: torch.Tensor, futures: torch.Tensor,
                     shifts: torch.Tensor) -> dict[str, Any]:
    """The 001 seed's metrics of n samples of one context, all from the generator's true futures.

    samples (N, 1, H, W) and futures (K, 1, H, W) and last_context (H, W) as ink in [0, 1]; shifts (K, 2).
    - l2: root-mean-square pixel difference (ink) to the nearest true future, mean over samples;
    - iou: IoU of the ink masks (> 0.5) with that nearest future, mean over samples;
    - directional_accuracy: share of samples whose digit moved by an allowed shift (its ink centroid moved
      within `match_tolerance` of it);
    - modes_found: distinct true futures reached by those samples, of modes_possible = K.
    """
    s, f = samples[:, 0].double(), futures[:, 0].double()
    rmse = (s[:, None] - f[None]).pow(2).mean((-2, -1)).sqrt()  # (N, K)
    l2, nearest = rmse.min(1)
    ious = iou(s, f[nearest])
    moved = centroid(s) - centroid(last_context.double())
    dist = torch.cdist(moved, shifts.double())
    dmin, landed = dist.min(1)
    ok = dmin < match_tolerance(shifts)
    landed = torch.where(ok, landed, torch.full_like(landed, -1))
    return {"n": len(s), "modes_possible": len(f), "modes_found": int(landed[ok].unique().numel()),
            "directional_accuracy": float(ok.double().mean()), "l2": float(l2.mean()), "iou": float(ious.mean()),
            "landed": [int((landed == k).sum()) for k in range(len(f))], "moved": moved.tolist()}


def moved_by(samples: torch.Tensor, item: SequenceItem) -> torch.Tensor:
    """(N, 2) (dy, dx) the digit moved from the last context frame to each model-range sample (ink centroid)."""
    return centroid(ink(samples)[:, 0].double()) - centroid(ink(item.context[-1]).double())


def pairwise_rmse(samples: torch.Tensor) -> float:
    """Mean RMSE (ink) between the samples of one context: their spread, with no truth needed."""
    flat = samples.flatten(1).double()
    if len(flat) < 2:
        return 0.0
    return float((torch.pdist(flat) / flat.shape[1] ** 0.5).mean())


def mean_metrics(per_context: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over contexts (modes as a mean count) plus the share of contexts with every future found."""
    keys = ("modes_found", "modes_possible", "directional_accuracy", "l2", "iou")
    out: dict[str, Any] = {k: sum(m[k] for m in per_context) / len(per_context) for k in keys}
    out["all_modes_found"] = sum(m["modes_found"] == m["modes_possible"] for m in per_context) / len(per_context)
    out["contexts"] = len(per_context)
    return out


# ---------------------------------------------------------------- pictures (tensors in [-1, 1])

def strip(rows: list[list[torch.Tensor]], pad: int = 2, gap: int = 6) -> torch.Tensor:
    """Rows of segments (each (n, C, H, W)) -> one (C, H', W') picture: frames `pad` apart, segments
    `gap` apart (e.g. context | samples | true futures), short rows padded white on the right."""
    def segment(frames: torch.Tensor) -> torch.Tensor:
        n, c, h, w = frames.shape
        out = frames.new_ones((c, h, n * (w + pad) - pad))
        for i in range(n):
            out[..., i * (w + pad): i * (w + pad) + w] = frames[i]
        return out

    lines = []
    for row in rows:
        parts = [segment(s) for s in row if len(s)]
        sep = parts[0].new_ones((parts[0].shape[0], parts[0].shape[1], gap))
        lines.append(torch.cat([p for part in parts for p in (part, sep)][:-1], -1))
    width = max(line.shape[-1] for line in lines) + 2 * pad
    c, h = lines[0].shape[:2]
    out = lines[0].new_ones((c, len(lines) * (h + pad) + pad, width))
    for r, line in enumerate(lines):
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad:pad + line.shape[-1]] = line
    return out


def landing_map(moved: torch.Tensor, shifts: torch.Tensor, radius: int, cell: int = 8) -> torch.Tensor:
    """Heatmap of where samples land: a (2r+1)^2 grid of shifts (x right, y down, centre = no move), cell
    brightness = share of samples whose digit moved there; true futures outlined red, 'no move' blue.
    Returns (3, H, W) in [-1, 1]."""
    size = 2 * radius + 1
    counts = torch.zeros(size, size)
    if len(moved):
        idx = moved.round().long().clamp(-radius, radius) + radius
        counts.index_put_((idx[:, 0], idx[:, 1]), torch.ones(len(idx)), accumulate=True)
        counts = counts / counts.max()
    img = counts[None].repeat(3, 1, 1).repeat_interleave(cell, 1).repeat_interleave(cell, 2) * 0.9
    edge = torch.ones(cell, cell, dtype=torch.bool)
    edge[1:-1, 1:-1] = False

    def outline(y: int, x: int, colour: tuple[float, float, float]) -> None:
        box = img[:, (y + radius) * cell:(y + radius + 1) * cell, (x + radius) * cell:(x + radius + 1) * cell]
        box[:, edge] = torch.tensor(colour)[:, None]

    outline(0, 0, (0.2, 0.4, 1.0))
    for y, x in shifts.clamp(-radius, radius).tolist():
        outline(y, x, (1.0, 0.1, 0.1))
    return img * 2 - 1


def plot_landing(path: Path, moved: dict[str, torch.Tensor], shifts: torch.Tensor) -> bool:
    """Scatter of the digit shifts of each sample set (e.g. plain vs PG) over the true futures, with
    matplotlib; returns whether a plot was written."""
    try:  # deferred: matplotlib is slow to import and only pictures need it
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    gen = torch.Generator().manual_seed(0)  # a little jitter so identical shifts stay visible
    for (name, pts), marker in zip(moved.items(), "o^sv"):
        jit = pts + 0.08 * torch.randn(pts.shape, generator=gen)
        ax.scatter(jit[:, 1], jit[:, 0], s=18, alpha=0.6, marker=marker, label=f"{name} ({len(pts)})")
    ax.scatter(shifts[:, 1], shifts[:, 0], s=160, marker="x", c="red", label="true futures")
    ax.scatter([0], [0], s=80, marker="+", c="blue", label="no move")
    ax.invert_yaxis()
    ax.set_aspect("equal")
    ax.set_xlabel("dx (px)")
    ax.set_ylabel("dy (px, down)")
    ax.set_title("where the next-frame digit lands")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(path, fig, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- contexts (what a next-frame model is given)

def spec_from_record(record: dict[str, Any]) -> SequenceSpec:
    """The SequenceSpec a dataset's (or a model's) `sequence` record was made from."""
    keys = SequenceSpec.__dataclass_fields__
    return SequenceSpec(**{k: v for k, v in record.items() if k in keys})


@dataclass
class Context:
    frames: torch.Tensor            # (C, S, S) in [-1, 1]
    source: str                     # "index 3" or the file path
    index: int | None = None
    item: SequenceItem | None = None  # the generator's truth, known for dataset indices


def context_metrics(samples: torch.Tensor, ctx: Context) -> dict[str, Any] | None:
    """sequence_metrics of model-range samples for a context with known truth (None for files)."""
    if ctx.item is None:
        return None
    it = ctx.item
    return sequence_metrics(ink(samples), ink(it.context[-1]), ink(it.futures), it.shifts)


def context_row(ctx: Context, samples: torch.Tensor) -> list[torch.Tensor]:
    """One strip row: context frames | samples | true futures (when known), all (n, 1, H, W) in [-1, 1]."""
    row = [ctx.frames[:, None], samples]
    if ctx.item is not None:
        row.append(to_model_range(ctx.item.futures))
    return row


def context_picture(frames: torch.Tensor) -> torch.Tensor:
    """(C_ctx, H, W) context frames -> the (1, H, C_ctx * W) strip of context.png, an unpadded strip readable
    again as a context file (`contexts.read_context`)."""
    return frames.permute(1, 0, 2).reshape(1, frames.shape[1], -1)


def landing_radius(meta: dict[str, Any]) -> int:
    return 2 * int(meta.get("sequence", {}).get("step_size", 4))
