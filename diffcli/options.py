"""The settings every generating command shares, written once: guidance (CFG, SEG, PG) and sampling.

Each group is a dataclass whose field names are the Python API's keyword arguments; each field declares its
command-line option once (`opt`: flags, help, range, choices, help panel; `seg_scale` is `--seg-scale`, `blurs` is
`--blur`). A command's config inherits the groups and may change a default with `redefault` (seg: SEG on at scale
3; pg: PG factor 1.7). `check_guidance` / `check_sampling` validate them before any model is loaded or any file is
written: the declared ranges (`check_fields`), then the rules across fields, the option's name and range in the
message.

The guidance stack, in the order every command applies it (see `guidance.stack`):

    CFG and SEG (uncond, cond, perturbed passes as ONE network batch)
      -> the scheduler's limits on x0_hat (IF: dynamic thresholding)
      -> PG (a repulsion across the batch of particles)
      -> view synchronization (panorama, anagram)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .core import attention
from .core.guidance import PG, REGIONS, Guidance, Seg
from .core.particles import DIGIT_KERNELS, KERNELS, PG_GRADS, PIPELINE_KERNELS, KernelGrad, describe as describe_kernels
from .core.query_blur import SPEC_FORMS, Blur, parse_blur
from .core.samplers import ETA_DEFAULTS, SAMPLERS, SCHEDULES, SamplerKnobs, describe as describe_samplers, describe_schedules
from .shared.errors import DiffcliError
from .shared.fields import check_fields, opt
from .shared.limits import RHO_MAX, SCALE_MAX, STEPS_MAX, count

DEFAULT_BLUR = "gaussian_-1_9999999"  # the official SEG default: infinite blur (the query's spatial mean)
DEFAULT_SEG_SCALE = 3.0               # the official SEG default, used when a blur is given without a scale


def split_list(values: list[str] | None) -> list[str]:
    """Repeated options and comma lists alike: ['down,up', 'mid'] -> ['down', 'up', 'mid'], order kept, no repeats."""
    return list(dict.fromkeys(v.strip() for value in values or [] for v in value.split(",") if v.strip()))


@dataclass(kw_only=True)
class GuidanceOptions:
    """CFG, SEG and PG settings, stacked on one denoiser (module docstring)."""
    # CFG scale w in D_u + w (D_c - D_u); None: the command's default
    cfg: float | None = opt(None, "--cfg", "--guidance", panel="guidance", check="finite", high=SCALE_MAX,
                            help="CFG scale w: D_u + w (D_c - D_u); 1 = conditional only, 0 = unconditional (with SEG "
                                 "on, 0 or 1 = SEG without CFG, as the official SEG code). Same as the 002 seed's alpha.")
    # s in + s (D_c - D_seg); None: 3 if a blur is given, else SEG off
    seg_scale: float | None = opt(None, "--seg-scale", panel="guidance", check="finite", high=SCALE_MAX,
                                  help="SEG: s in D_c + s (D_c - D_seg); 0 = off (default: 3 when --blur is given, "
                                       "else off).")
    # SEG query blur specs; None: infinite blur when SEG is on
    blurs: list[str] | None = opt(None, "--blur", panel="guidance",
                                  help=f"SEG query blur: {SPEC_FORMS}. Turns SEG on (default infinite blur).")
    layers: list[str] = opt(None, "--layers", factory=lambda: ["mid"], panel="guidance",
                            help="SEG: self-attention layers to perturb: down, mid, up, or indexed d4, m0, u1 "
                                 "(repeatable or comma-separated).")
    regions: list[str] = opt(None, "--regions", factory=lambda: [",".join(REGIONS)], panel="guidance",
                             help="SEG: thirds of the steps that run the perturbed pass (begin = noisiest).")
    # SEG acts only at sigma <= sigma_start and sigma >= sigma_end
    sigma_start: float = opt(math.inf, "--sigma-start", panel="guidance", check="finite", allow_inf=True,
                             help="SEG: perturb only at noise levels sigma <= this.")
    sigma_end: float = opt(0.0, "--sigma-end", panel="guidance", check="finite",
                           help="SEG: perturb only at noise levels sigma >= this.")
    pg_factor: float = opt(0.0, "--pg-factor", panel="guidance", check="finite", high=SCALE_MAX,
                           help="PG: lambda in dx/dsigma = (x - D)/sigma + lambda sigma grad_x sum_j k(x_i, x_j) over "
                                "the batch; > 0 repels, 0 = off.")
    kernel: str = opt("rbf", "--kernel", panel="guidance", choices=tuple(KERNELS),
                      help=f"PG kernel. {describe_kernels()}.")
    # kernels on x0_hat: through the network (exact) or c_skip I (skip)
    pg_grad: str = opt("exact", "--pg-grad", panel="guidance", choices=tuple(PG_GRADS),
                       help="PG kernels on x0_hat (x0, classifier, clip): exact = the gradient through the network "
                            "(one backward pass a step), skip = EDM's c_skip(sigma) I (no backward pass, nearly "
                            "nothing at high sigma).")
    pg_bandwidth: float = opt(1.0, "--pg-bandwidth", panel="guidance", check="finite", above=True, high=SCALE_MAX,
                              help="PG: kernel bandwidth as a multiple of the median heuristic (< 1: only near "
                                   "neighbours repel).")
    pg_sigma_min: float = opt(0.0, "--pg-sigma-min", panel="guidance", check="finite",
                              help="PG acts only at noise levels sigma >= this.")
    pg_sigma_max: float = opt(math.inf, "--pg-sigma-max", panel="guidance", check="finite", allow_inf=True,
                              help="PG acts only at noise levels sigma <= this.")

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


def _knob(name: str, **meta: Any) -> Any:
    """A sampler knob of core.samplers.SamplerKnobs, at its default there, declared for the command line."""
    return opt(SamplerKnobs.__dataclass_fields__[name].default, f"--{name.replace('_', '-')}", panel="sampling",
               check="finite", **meta)


@dataclass(kw_only=True)
class SamplingOptions(SamplerKnobs):
    """Which sampler, how many steps, on which noise schedule (None: the command's or the model's default)."""
    s_churn: float = _knob("s_churn", high=SCALE_MAX, help="stochastic_heun: EDM S_churn.")
    s_tmin: float = _knob("s_tmin", high=SCALE_MAX, help="stochastic_heun: EDM S_tmin.")
    s_tmax: float = _knob("s_tmax", allow_inf=True, help="stochastic_heun: EDM S_tmax.")
    s_noise: float = _knob("s_noise", high=SCALE_MAX, help="stochastic_heun: noise scale S_noise (euler_ancestral keeps 1).")
    eta: float | None = _knob("eta", high=SCALE_MAX,
                              help="Noise of the ancestral/SDE samplers, each at its own default when not given: "
                                   + ", ".join(f"{k} {v:g}" for k, v in ETA_DEFAULTS.items()) + ".")
    sampler: str | None = opt(None, "--sampler", panel="sampling", help=f"{describe_samplers()}.")
    steps: int | None = opt(None, "--steps", panel="sampling", check="count", low=1, high=STEPS_MAX,
                            help="Sampling steps (heun, dpm_2, dpmpp_sde, the 2S/2 ancestral: 2*steps-1 network "
                                 "evaluations; dpm_adaptive picks its own).")
    # default: a pipeline's own timesteps ("scheduler"), karras on diffcli models
    schedule: str | None = opt(None, "--schedule", panel="sampling", choices=tuple(SCHEDULES),
                               help=f"The noise levels (default: a pipeline's own, karras on diffcli models). "
                                    f"{describe_schedules()}.")
    rho: float = opt(7.0, "--rho", panel="sampling", check="finite", above=True, high=RHO_MAX,
                     help="Exponent of the karras (and polyexponential) schedule.")


def check_guidance(opts: GuidanceOptions, *, many_blurs: bool = False) -> list[Blur]:
    """Validate the guidance settings; returns the parsed SEG blurs (empty when SEG is off).

    Only `diffcli seg` runs one pass per blur (`many_blurs`); elsewhere one blur is one setting.
    """
    check_fields(opts, ["cfg", "seg_scale", "pg_factor", "sigma_start", "sigma_end", "pg_sigma_min", "pg_sigma_max"])
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
    check_fields(opts, ["kernel", "pg_grad", "pg_bandwidth"])
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
    check_fields(opts, ["steps", "schedule"])
    if pipeline is False and opts.schedule is not None and SCHEDULES[opts.schedule].pipeline_only:
        raise DiffcliError(f"--schedule {opts.schedule} needs a diffusers pipeline (its scheduler or a published table); "
                           "diffcli models take the others (default karras)")
    check_fields(opts, ["s_churn", "s_noise", "eta", "s_tmin", "s_tmax", "rho"])


def check_pipeline_steps(pipe: Any, steps: int, schedule: str | None, name: str = "steps") -> None:
    """A pipeline's own (DDIM) timesteps exist only up to its scheduler's training steps (Karras sigmas have no
    such limit)."""
    table = getattr(getattr(getattr(pipe, "scheduler", None), "config", None), "num_train_timesteps", None)
    if (schedule or "scheduler") == "scheduler" and isinstance(table, int):
        count(name, steps, 1, table)


def group_fields(*groups: type) -> list[str]:
    """Field names of option groups, in declaration order."""
    return [f.name for g in groups for f in fields(g)]


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
    already applied), SEG (`seg_of`) with `blur`, default the options' one blur, and PG (`pg_of`) with its
    `kernel`. Every generating command and `drawing` build their guidance here."""
    if blur is None and opts.seg_on:
        blur = check_guidance(opts)[0]
    return Guidance(cfg, seg_of(opts, blur), pg_of(opts, kernel, sigma_data, classes))
