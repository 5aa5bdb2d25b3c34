"""The settings every generating command shares, written once: guidance (CFG, SEG, PG) and sampling.

Each group is a dataclass whose field names are both the Python API's keyword arguments and the command-line
options (`seg_scale` is `--seg-scale`, `blurs` is `--blur`). A command's config inherits the groups and may
change a default (seg: SEG on at scale 3; pg: PG factor 1.7). `check_guidance` / `check_sampling` validate them
before any model is loaded or any file is written, with the option's name and its range in the message.

The guidance stack, in the order every command applies it (see `guidance.stack`):

    CFG and SEG (uncond, cond, perturbed passes as ONE network batch)
      -> the scheduler's limits on x0_hat (IF: dynamic thresholding)
      -> PG (a repulsion across the batch of particles)
      -> view synchronization (panorama, anagram)
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .common import DiffcliError, check_memory
from .particles import DIGIT_KERNELS, KERNELS, PG_GRADS, PIPELINE_KERNELS
from .query_blur import Blur, parse_blur
from .samplers import SAMPLERS, SCHEDULES, SamplerKnobs

DEFAULT_BLUR = "gaussian_-1_9999999"  # the official SEG default: infinite blur (the query's spatial mean)
DEFAULT_SEG_SCALE = 3.0               # the official SEG default, used when a blur is given without a scale
REGIONS = ("begin", "mid", "end")


def split_list(values: list[str] | None) -> list[str]:
    """Repeated options and comma lists alike: ['down,up', 'mid'] -> ['down', 'up', 'mid'], order kept, no repeats."""
    return list(dict.fromkeys(v.strip() for value in values or [] for v in value.split(",") if v.strip()))


@dataclass(kw_only=True)
class GuidanceOptions:
    """CFG, SEG and PG settings, stacked on one denoiser (module docstring)."""
    cfg: float | None = None                  # CFG scale w in D_u + w (D_c - D_u); None: the command's default
    seg_scale: float | None = None            # s in + s (D_c - D_seg); None: 3 if a blur is given, else SEG off
    blurs: list[str] | None = None            # SEG query blur specs; None: infinite blur when SEG is on
    layers: list[str] = field(default_factory=lambda: ["mid"])
    regions: list[str] = field(default_factory=lambda: [",".join(REGIONS)])
    sigma_start: float = math.inf             # SEG acts only at sigma <= sigma_start ...
    sigma_end: float = 0.0                    # ... and sigma >= sigma_end
    pg_factor: float = 0.0                    # particle guidance lambda; 0 = off
    kernel: str = "rbf"
    pg_grad: str = "exact"                    # kernels on x0_hat: through the network (exact) or c_skip I (skip)
    pg_bandwidth: float = 1.0                 # times the median-heuristic kernel bandwidth
    pg_sigma_min: float = 0.0
    pg_sigma_max: float = math.inf

    @property
    def seg_on(self) -> bool:
        return self.seg_strength > 0

    @property
    def seg_strength(self) -> float:
        if self.seg_scale is not None:
            return self.seg_scale
        return DEFAULT_SEG_SCALE if self.blurs else 0.0

    def blur_specs(self) -> list[str]:
        return split_list(self.blurs) or [DEFAULT_BLUR]


@dataclass(kw_only=True)
class SamplingOptions(SamplerKnobs):
    """Which sampler, how many steps, on which noise schedule (None: the command's or the model's default)."""
    sampler: str | None = None
    steps: int | None = None
    schedule: str | None = None   # pipelines: scheduler (its own timesteps, the default) or karras
    rho: float = 7.0


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


def check_guidance(opts: GuidanceOptions, *, many_blurs: bool = False) -> list[Blur]:
    """Validate the guidance settings; returns the parsed SEG blurs (empty when SEG is off).

    Only `diffcli seg` runs one pass per blur (`many_blurs`); elsewhere one blur is one setting.
    """
    for name in ("cfg", "seg_scale", "pg_factor"):
        finite(name, getattr(opts, name), high=SCALE_MAX)
    finite("sigma_start", opts.sigma_start, allow_inf=True)
    finite("sigma_end", opts.sigma_end)
    finite("pg_sigma_min", opts.pg_sigma_min)
    finite("pg_sigma_max", opts.pg_sigma_max, allow_inf=True)
    if opts.sigma_end > opts.sigma_start:
        raise DiffcliError(f"need --sigma-end <= --sigma-start (got {opts.sigma_end} and {opts.sigma_start})")
    if opts.pg_sigma_min > opts.pg_sigma_max:
        raise DiffcliError(f"need --pg-sigma-min <= --pg-sigma-max (got {opts.pg_sigma_min} and {opts.pg_sigma_max})")
    regions = split_list(opts.regions)
    if not regions or any(r not in REGIONS for r in regions):
        raise DiffcliError(f"--regions {','.join(opts.regions)!r}: choose any of {','.join(REGIONS)} "
                           "(thirds of the steps, begin = noisiest)")
    if not split_list(opts.layers):
        raise DiffcliError("--layers needs at least one of down, mid, up or an indexed layer (d4, m0, u1)")
    if opts.kernel not in KERNELS:
        raise DiffcliError(f"unknown --kernel {opts.kernel!r}; choose one of {', '.join(KERNELS)}")
    if opts.pg_grad not in PG_GRADS:
        raise DiffcliError(f"unknown --pg-grad {opts.pg_grad!r}; choose one of {', '.join(PG_GRADS)}")
    finite("pg_bandwidth", opts.pg_bandwidth, above=True, high=SCALE_MAX)
    blurs = [parse_blur(spec) for spec in opts.blur_specs()]
    if len(blurs) > 1 and not many_blurs:
        raise DiffcliError(f"{len(blurs)} --blur specs: this command runs one blur (diffcli seg runs one pass per blur)")
    return blurs if opts.seg_on else []


def check_particles(opts: GuidanceOptions, n: int, pipeline: bool, what: str = "--n") -> None:
    """PG needs a batch of particles; the classifier kernel a digit model, the clip kernel a pipeline."""
    if opts.pg_factor > 0 and n < 2:
        raise DiffcliError(f"PG needs a batch: particles repel each other, so {what} must be >= 2 (got {n}), "
                           "or --pg-factor 0")
    allowed = PIPELINE_KERNELS if pipeline else DIGIT_KERNELS
    if opts.pg_factor > 0 and opts.kernel not in allowed:
        raise DiffcliError(f"--kernel {opts.kernel} is for {'digit models' if pipeline else 'pipelines'}; "
                           f"{'pipelines' if pipeline else 'diffcli models'} take {', '.join(allowed)}")


def record(config: Any) -> dict[str, Any]:
    """A config as run.json stores it: infinities (no limit) as null, so the file is strict JSON."""
    return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(config).items()}


def check_sampling(opts: SamplingOptions, pipeline: bool | None = None) -> None:
    """Validate the sampler settings; `pipeline` False refuses the pipeline-only schedule choice."""
    if opts.sampler is not None and opts.sampler not in SAMPLERS:
        raise DiffcliError(f"unknown --sampler {opts.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    count("steps", opts.steps, 1, STEPS_MAX)
    if opts.schedule is not None and opts.schedule not in SCHEDULES:
        raise DiffcliError(f"unknown --schedule {opts.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if pipeline is False and opts.schedule == "scheduler":
        raise DiffcliError("--schedule scheduler needs a diffusers pipeline; diffcli models sample on Karras sigmas")
    for name in ("s_churn", "s_noise", "eta", "s_tmin"):
        finite(name, getattr(opts, name), high=SCALE_MAX)
    finite("s_tmax", opts.s_tmax, allow_inf=True)
    finite("rho", opts.rho, above=True, high=RHO_MAX)


def check_pipeline_steps(pipe: Any, steps: int, schedule: str | None, name: str = "steps") -> None:
    """A pipeline's own (DDIM) timesteps exist only up to its scheduler's training steps (Karras sigmas have no
    such limit)."""
    table = getattr(getattr(getattr(pipe, "scheduler", None), "config", None), "num_train_timesteps", None)
    if (schedule or "scheduler") == "scheduler" and isinstance(table, int):
        count(name, steps, 1, table)


def group_fields(*groups: type) -> list[str]:
    """Field names of option groups, in declaration order (the CLI adds one option per field)."""
    return [f.name for g in groups for f in fields(g)]


def default(config: type, name: str) -> Any:
    """A command config's default for one field (its own override, else its group's): the one place a default
    is written; the CLI reads it from here."""
    f = next(f for f in fields(config) if f.name == name)
    return f.default_factory() if f.default_factory is not MISSING else f.default


def defaults(config: type, names: list[str]) -> dict[str, Any]:
    return {name: default(config, name) for name in names}
