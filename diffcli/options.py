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

import torch

from .core import attention
from .core.guidance import PG, REGIONS, Guidance, Seg
from .core.particles import DIGIT_KERNELS, KERNELS, PG_GRADS, PIPELINE_KERNELS, KernelGrad
from .core.query_blur import Blur, parse_blur
from .core.samplers import SAMPLERS, SCHEDULES, SamplerKnobs
from .shared.errors import DiffcliError
from .shared.limits import RHO_MAX, SCALE_MAX, STEPS_MAX, count, finite

DEFAULT_BLUR = "gaussian_-1_9999999"  # the official SEG default: infinite blur (the query's spatial mean)
DEFAULT_SEG_SCALE = 3.0               # the official SEG default, used when a blur is given without a scale


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
    if pipeline is False and opts.schedule is not None and SCHEDULES[opts.schedule].pipeline_only:
        raise DiffcliError(f"--schedule {opts.schedule} needs a diffusers pipeline; diffcli models sample on Karras sigmas")
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


# ---------------------------------------------------------------- options -> guidance terms

def seg_layers(net: torch.nn.Module, opts: GuidanceOptions, option: str = "layers") -> list[str]:
    """The module paths SEG would perturb in `net` (a family's `attention`; [] with SEG off): commands call it
    before writing anything, so a model without such layers is refused in one line that names the valid ones."""
    return attention.resolve_layers(net, split_list(opts.layers), option) if opts.seg_on else []


def seg_of(opts: GuidanceOptions, blur: Blur | None) -> Seg | None:
    """The SEG of a command's options for one parsed blur; None when SEG is off."""
    if blur is None or not opts.seg_on:
        return None
    return Seg(opts.seg_strength, blur, split_list(opts.layers), split_list(opts.regions), opts.sigma_start,
               opts.sigma_end)


def pg_of(opts: GuidanceOptions, kernel: tuple[KernelGrad, bool] | None, sigma_data: float = 0.5,
          classes: int = 0) -> PG | None:
    """The PG of a command's options with its kernel (particles.make_kernel); None when the factor is 0.
    `sigma_data`: the data's std in the space the sampler runs in (0.5 for digit models; 1 for scaled latents).
    `classes`: the model's class count, used by --kernel posterior (sample.check_posterior_kernel)."""
    if not opts.pg_factor or kernel is None:
        return None
    grad, on_denoised = kernel
    return PG(opts.pg_factor, grad, on_denoised, opts.pg_sigma_min, opts.pg_sigma_max, opts.pg_grad == "exact",
              sigma_data, classes if opts.kernel == "posterior" else 0)


def guidance_of(opts: GuidanceOptions, cfg: float, blur: Blur | None = None,
                kernel: tuple[KernelGrad, bool] | None = None, sigma_data: float = 0.5, classes: int = 0) -> Guidance:
    """The one place a command's options become its guidance terms: CFG at scale `cfg` (the command's default
    already applied), SEG with one parsed `blur` (`seg_of`), PG with its `kernel` (`pg_of`)."""
    return Guidance(cfg, seg_of(opts, blur), pg_of(opts, kernel, sigma_data, classes))
