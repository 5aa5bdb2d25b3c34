"""Every bound on a number an option or a file may hold, and the one-line checks that name the option."""
from __future__ import annotations

import math
from typing import Any

from .errors import DiffcliError
from .memory import check_memory

# ---------------------------------------------------------------- limits: every bound on a number, in one place
#
# Generous for real work (SDXL at 1024x1024, 50k FID samples written batch by batch, 3072-px panoramas, runs of
# millions of training steps), far below what would exhaust a machine. Values beyond them are refused before a
# model loads or a file is written; within them, a batch whose tensors cannot fit the device is refused once the
# model is known (`check_batch_memory`), still before any output. docs/trust.md lists them.

SEED_MAX = 2**63 - 1            # seeds (and seed + i of sample i); torch.Generator.manual_seed takes < 2^64
TRAIN_SEED_MAX = 2**40 - 1      # train --seed / --data-seed: step (item) k draws from seed * 1000003 + k
STEPS_MAX = 10_000              # sampling steps of one run (10x DDPM's 1000)
TRAIN_STEPS_MAX = 100_000_000   # optimizer steps, and every step count of `train` (warm-up, intervals)
N_MAX = 1_000_000               # samples of one run: written batch by batch, so a matter of disk and time
BATCH_MAX = 65_536              # images in one network batch (--batch-size, --batch, --n where it is one batch)
SIDE_MAX = 65_536               # px, either side of one image (a 512 x 65536 panorama still fits PIXELS_MAX)
PIXELS_MAX = 2**26              # px of one image, generated or read (8192 x 8192; SDXL's 1024 x 1024 is 1 Mpx)
CHANNELS_MAX = 4_096            # width of a diffcli net's blocks (Stable Diffusion's widest is 1280)
LEVELS_MAX = 8                  # resolution levels of a diffcli net
LAYERS_MAX = 16                 # resnet layers per block of a diffcli net
CLASSES_MAX = 100_000           # classes of a diffcli model
CONTEXT_FRAMES_MAX = 64         # context frames of a next-frame model
SCALE_MAX = 1_000.0             # guidance scales: --cfg, --seg-scale, --pg-factor, --sr-cfg
SIGMA_LIMIT = 1e5               # noise levels --sigma-min / --sigma-max (EDM: 0.002 .. 80)
RHO_MAX = 1_000.0               # Karras schedule exponent (EDM: 7)
FRAMES_MAX = 240                # anagram animation frames per transition
PREVIEW_MAX = 1_000             # train --preview sequences
KID_SUBSETS_MAX = 10_000        # eval --kid-subsets (clean-fid: 100)
WORLD_MAX = 65_536              # torchrun processes (WORLD_SIZE; RANK and LOCAL_RANK below it)


def _flag(name: str) -> str:
    """'sigma_min' -> '--sigma-min'; anything that is not an identifier ('--steps', "the record's image_size") as is."""
    return "--" + name.replace("_", "-") if name.isidentifier() else name


def _shown(value: Any) -> str:
    """A value as a message shows it: floats as %g, ints as digits, the rest as repr, at most 40 characters."""
    text = f"{value:g}" if isinstance(value, float) else str(value) if isinstance(value, int) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(name: str, value: float | None, low: float = 0.0, allow_inf: bool = False, *, high: float = math.inf,
           above: bool = False) -> None:
    """One rule for real-valued options: a finite number >= low (> low with `above`) and <= high, the range named in
    the message (inf only where it means 'no limit'). None means 'not given' and passes."""
    if value is None:
        return
    try:  # an int too large for a float (10**400 in a JSON record) is no finite number either
        ok = _number(value) and not math.isnan(value) and (allow_inf or not math.isinf(value))
    except OverflowError:
        ok = False
    if ok and (value <= low if above else value < low):
        ok = False
    if ok and value > high and not (allow_inf and math.isinf(value)):
        ok = False
    if not ok:
        bounds = [f"{'>' if above else '>='} {low:g}" if math.isfinite(low) else "",
                  f"<= {high:g}" if math.isfinite(high) else ""]
        bound = " and ".join(b for b in bounds if b)
        raise DiffcliError(f"{_flag(name)} must be a {'' if allow_inf else 'finite '}number{' ' + bound if bound else ''}"
                           f", got {_shown(value)}")


def count(name: str, value: int | None, low: int = 1, high: int | None = None) -> None:
    """The integer counterpart of `finite`: an int in [low, high] (high None: no upper limit), the range named in the
    message. None means 'not given' and passes."""
    if value is None:
        return
    bound = f">= {low}" + (f" and <= {high}" if high is not None else "")
    if not isinstance(value, int) or isinstance(value, bool):
        raise DiffcliError(f"{_flag(name)} must be an integer {bound}, got {_shown(value)}")
    if value < low or (high is not None and value > high):
        raise DiffcliError(f"{_flag(name)} must be {bound}, got {_shown(value)}")


def seed(name: str, value: int, n: int = 1, high: int = SEED_MAX) -> None:
    """A seed for torch.Generator: an integer in [0, high], and seed + n - 1 too when item i of n uses seed + i."""
    count(name, value, 0, high)
    top = high - (max(n, 1) - 1)
    if value > top:
        raise DiffcliError(f"{_flag(name)} must be >= 0 and <= {top} for {n} items (item i uses seed + i, at most "
                           f"{high}), got {_shown(value)}")


def check_image_size(height: int, width: int, what: tuple[str, str] = ("--height", "--width")) -> None:
    """Pixels of one image: each side in [1, SIDE_MAX] and height x width <= PIXELS_MAX."""
    count(what[0], height, 1, SIDE_MAX)
    count(what[1], width, 1, SIDE_MAX)
    if height * width > PIXELS_MAX:
        raise DiffcliError(f"{what[0]} {height} x {what[1]} {width} = {height * width} px: an image may have at most "
                           f"{PIXELS_MAX} px (8192 x 8192)")


def check_batch_memory(batch: int, channels: int, height: int, width: int, dtype: Any, device: Any, what: str,
                       hint: str) -> None:
    """Refuse a network batch whose first activation alone (batch x channels x height x width of `dtype`, a lower
    bound of what the network needs) is larger than the device's memory."""
    import torch
    size = torch.empty((), dtype=dtype).element_size()
    need = batch * channels * height * width * size
    check_memory(need, device, f"{what} ({batch} x {channels} x {height} x {width} activations)", hint)
