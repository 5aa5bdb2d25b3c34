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
from .core.guidance import PG, REGIONS, Autoguide, Guidance, Seg
from .core.particles import DIGIT_KERNELS, KERNELS, PG_GRADS, PIPELINE_KERNELS, KernelGrad, describe as describe_kernels
from .core.query_blur import SPEC_FORMS, Blur, parse_blur
from .core.samplers import SAMPLERS, SCHEDULES, SamplerKnobs, describe as describe_samplers, describe_schedules
from .shared.errors import DiffcliError
from .shared.fields import check_fields, opt
from .shared.limits import RHO_MAX, SCALE_MAX, STEPS_MAX, count

DEFAULT_BLUR = "gaussian_-1_9999999"  # the official SEG default: infinite blur (the query's spatial mean)
DEFAULT_SEG_SCALE = 3.0               # the official SEG default, used when a blur is given without a scale
DEFAULT_AG_SCALE = 2.0                # autoguidance's w when --ag-model is given without --ag-scale (edm2: 2 - 3)


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
    # SEG's guidance interval (sigma_end, sigma_start]; --sigma-start/--sigma-end: the names before the one scheme
    sigma_start: float = opt(math.inf, "--seg-sigma-max", "--sigma-start", panel="guidance", check="finite",
                             allow_inf=True, help="SEG's interval: perturb only at noise levels sigma <= this.")
    sigma_end: float = opt(0.0, "--seg-sigma-min", "--sigma-end", panel="guidance", check="finite",
                           help="SEG's interval: perturb only at noise levels sigma > this.")
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
                              help="PG's interval: PG acts only at noise levels sigma > this.")
    pg_sigma_max: float = opt(math.inf, "--pg-sigma-max", panel="guidance", check="finite", allow_inf=True,
                              help="PG's interval: PG acts only at noise levels sigma <= this.")
    cfg_sigma_min: float = opt(0.0, "--cfg-sigma-min", panel="guidance", check="finite",
                               help="CFG's interval (Kynkaeaeniemi et al. 2024): CFG acts only at sigma > this; "
                                    "elsewhere the conditional pass alone.")
    cfg_sigma_max: float = opt(math.inf, "--cfg-sigma-max", panel="guidance", check="finite", allow_inf=True,
                               help="CFG's interval: CFG acts only at noise levels sigma <= this.")
    # autoguidance (Karras et al. 2024): D_guide + w (D_main - D_guide), the guide a weaker model of the same data
    ag_model: str | None = opt(None, "--ag-model", panel="guidance",
                               help="Autoguidance: the guide, a smaller or shorter-trained model with the same "
                                    "conditioning: a diffcli EDM checkpoint (file, run folder, RUN@STEP, a shipped "
                                    "name such as mnist-edm-guide) for digit models; a sibling pipeline with the same "
                                    "latent space and text encoder for pipelines. Costs one guide pass a network pass.")
    ag_scale: float | None = opt(None, "--ag-scale", panel="guidance", check="finite", high=SCALE_MAX,
                                 help=f"Autoguidance: w in D_guide + w (D_main - D_guide); 1 = off (default "
                                      f"{DEFAULT_AG_SCALE:g} with --ag-model).")
    ag_sigma_min: float = opt(0.0, "--ag-sigma-min", panel="guidance", check="finite",
                              help="Autoguidance's interval: it acts only at noise levels sigma > this.")
    ag_sigma_max: float = opt(math.inf, "--ag-sigma-max", panel="guidance", check="finite", allow_inf=True,
                              help="Autoguidance's interval: it acts only at noise levels sigma <= this.")

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

    @property
    def ag_strength(self) -> float:
        """Autoguidance's w; 1 (off) without --ag-model."""
        if self.ag_model is None:
            return 1.0
        return DEFAULT_AG_SCALE if self.ag_scale is None else self.ag_scale

    @property
    def ag_on(self) -> bool:
        return self.ag_strength != 1.0


# the options of guidance intervals and autoguidance: a run record holds them only where they are set, so records of
# runs without them read as they did before these options existed
RECORDED_WHEN_SET = {"cfg_sigma_min": 0.0, "cfg_sigma_max": math.inf, "ag_model": None, "ag_scale": None,
                     "ag_sigma_min": 0.0, "ag_sigma_max": math.inf}


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
                              help="ddim: 0 deterministic (default), 1 ancestral; euler_ancestral: default 1.")
    sampler: str | None = opt(None, "--sampler", panel="sampling", help=f"{describe_samplers()}.")
    steps: int | None = opt(None, "--steps", panel="sampling", check="count", low=1, high=STEPS_MAX,
                            help="Sampling steps (heun: 2*steps-1 network evaluations).")
    # pipelines: scheduler (its own timesteps, the default) or karras
    schedule: str | None = opt(None, "--schedule", panel="sampling", choices=tuple(SCHEDULES),
                               help=f"Pipelines: the noise levels. {describe_schedules()}.")
    rho: float = opt(7.0, "--rho", panel="sampling", check="finite", above=True, high=RHO_MAX,
                     help="Karras schedule exponent.")


def check_guidance(opts: GuidanceOptions, *, many_blurs: bool = False) -> list[Blur]:
    """Validate the guidance settings; returns the parsed SEG blurs (empty when SEG is off).

    Only `diffcli seg` runs one pass per blur (`many_blurs`); elsewhere one blur is one setting.
    """
    check_fields(opts, ["cfg", "seg_scale", "pg_factor", "sigma_start", "sigma_end", "pg_sigma_min", "pg_sigma_max",
                        "cfg_sigma_min", "cfg_sigma_max", "ag_scale", "ag_sigma_min", "ag_sigma_max"])
    if opts.sigma_end > opts.sigma_start:
        raise DiffcliError(f"need --sigma-end <= --sigma-start (SEG's interval --seg-sigma-min, --seg-sigma-max; got "
                           f"{opts.sigma_end} and {opts.sigma_start})")
    for term in ("pg", "cfg", "ag"):
        lo, hi = getattr(opts, f"{term}_sigma_min"), getattr(opts, f"{term}_sigma_max")
        if lo > hi:
            raise DiffcliError(f"need --{term}-sigma-min <= --{term}-sigma-max (got {lo} and {hi})")
    if opts.ag_scale is not None and opts.ag_model is None:
        raise DiffcliError("--ag-scale needs --ag-model (the guide network)")
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
    """A config as run.json stores it: infinities (no limit) as null, so the file is strict JSON; the interval and
    autoguidance options only where set (`RECORDED_WHEN_SET`)."""
    return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(config).items()
            if not (k in RECORDED_WHEN_SET and v == RECORDED_WHEN_SET[k])}


def check_sampling(opts: SamplingOptions, pipeline: bool | None = None) -> None:
    """Validate the sampler settings; `pipeline` False refuses the pipeline-only schedule choice."""
    if opts.sampler is not None and opts.sampler not in SAMPLERS:
        raise DiffcliError(f"unknown --sampler {opts.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    check_fields(opts, ["steps", "schedule"])
    if pipeline is False and opts.schedule is not None and SCHEDULES[opts.schedule].pipeline_only:
        raise DiffcliError(f"--schedule {opts.schedule} needs a diffusers pipeline; diffcli models sample on Karras sigmas")
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


def ag_of(opts: GuidanceOptions, guide: tuple[Any, torch.nn.Module | None] | None) -> Autoguide | None:
    """The autoguidance of a command's options with its loaded guide (denoiser, the module holding its attention
    layers); None when off (no --ag-model, or --ag-scale 1)."""
    if guide is None or not opts.ag_on:
        return None
    return Autoguide(guide[0], opts.ag_strength, opts.ag_sigma_min, opts.ag_sigma_max, guide[1])


def pipeline_guide(opts: GuidanceOptions, family: Any, device: torch.device,
                   dtype: torch.dtype | None = None) -> tuple[Any, torch.nn.Module] | None:
    """Autoguidance's guide for a pipeline command (--ag-model: a sibling pipeline, `pipelines.load_guide`) as
    `guidance_of` takes it: (its denoiser, the module holding its attention layers); None when AG is off. Commands
    call it before writing anything."""
    if opts.ag_model is None or not opts.ag_on:
        return None
    from .backends.pipelines import load_guide
    guide = load_guide(opts.ag_model, family, device, dtype)
    return guide.denoiser(), guide.attention


def guidance_of(opts: GuidanceOptions, cfg: float, blur: Blur | None = None,
                kernel: tuple[KernelGrad, bool] | None = None, sigma_data: float = 0.5, classes: int = 0,
                guide: tuple[Any, torch.nn.Module | None] | None = None) -> Guidance:
    """The one place a command's options become its guidance terms: CFG at scale `cfg` (the command's default
    already applied) on its interval, SEG (`seg_of`) with `blur`, default the options' one blur, PG (`pg_of`) with
    its `kernel`, and autoguidance (`ag_of`) with the `guide` the command loaded. Every generating command and
    `drawing` build their guidance here."""
    if blur is None and opts.seg_on:
        blur = check_guidance(opts)[0]
    return Guidance(cfg, seg_of(opts, blur), pg_of(opts, kernel, sigma_data, classes), ag_of(opts, guide),
                    (opts.cfg_sigma_min, opts.cfg_sigma_max))
