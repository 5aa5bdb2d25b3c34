"""The settings every generating command shares, written once: guidance (CFG and its rules, SEG, PAG, PG) and
sampling.

Each group is a dataclass whose field names are the Python API's keyword arguments; each field declares its
command-line option once (`opt`: flags, help, range, choices, help panel; `seg_scale` is `--seg-scale`, `blurs` is
`--blur`). A command's config inherits the groups and may change a default with `redefault` (seg: SEG on at scale
3; pg: PG factor 1.7). `check_guidance` / `check_sampling` validate them before any model is loaded or any file is
written: the declared ranges (`check_fields`), then the rules across fields, the option's name and range in the
message.

The guidance stack, in the order every command applies it (see `guidance.stack`):

    CFG (or its rule: APG, CFG-Zero*), SEG and PAG (uncond, cond, seg, pag passes as ONE network batch)
      -> the scheduler's limits on x0_hat (IF: dynamic thresholding)
      -> PG (a repulsion across the batch of particles)
      -> view synchronization (panorama, anagram)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from .core import attention
from .core.guidance import PG, REGIONS, Apg, Autoguide, Guidance, Pag, Rule, Seg, ZeroStar
from .core.particles import DIGIT_KERNELS, KERNELS, PG_GRADS, PIPELINE_KERNELS, KernelGrad, describe as describe_kernels
from .core.query_blur import SPEC_FORMS, Blur, parse_blur
from .core.samplers import (CFG_PP, ETA_DEFAULTS, SAMPLERS, SCHEDULES, SamplerKnobs, describe as describe_samplers,
                            describe_schedules, nfe)
from .shared.errors import DiffcliError
from .shared.fields import check_fields, opt
from .shared.limits import BATCH_MAX, RHO_MAX, SCALE_MAX, STEPS_MAX, count

DEFAULT_BLUR = "gaussian_-1_9999999"  # the official SEG default: infinite blur (the query's spatial mean)
DEFAULT_SEG_SCALE = 3.0               # the official SEG default, used when a blur is given without a scale
CFG_RULES = ("cfg", "apg", "zero-star")  # how the CFG passes combine (guidance.Apg, guidance.ZeroStar)
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
                                 "on, 0 or 1 = SEG without CFG, as the official SEG code). Same as the 002 seed's alpha. Cost: 2 "
                                 "network rows per sample per evaluation, one batch (1 at w = 0 or 1).")
    # s in + s (D_c - D_seg); None: 3 if a blur is given, else SEG off
    seg_scale: float | None = opt(None, "--seg-scale", panel="guidance", check="finite", high=SCALE_MAX,
                                  help="SEG: s in D_c + s (D_c - D_seg); 0 = off (default: 3 when --blur is given, "
                                       "else off). Cost: one more row per sample on guided steps, same batch.")
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
    pag_scale: float = opt(0.0, "--pag-scale", panel="guidance", check="finite", high=SCALE_MAX,
                           help="PAG (perturbed-attention guidance): p in + p (D_c - D_pag), D_pag = the conditional "
                                "pass with identity self-attention (output = V) in --pag-layers; 0 = off. Cost: one "
                                "more network row per sample, in the same batch.")
    # None: the --layers list (so `--pag-scale 3 --layers up` works); a list: PAG's own layers, SEG keeps --layers
    pag_layers: list[str] | None = opt(None, "--pag-layers", panel="guidance",
                                       help="PAG: self-attention layers made identity, named as --layers (default: "
                                            "the --layers list). Give both to run SEG and PAG on different layers.")
    cfg_rule: str = opt("cfg", "--cfg-rule", panel="guidance", choices=CFG_RULES,
                        help="How the CFG passes combine: cfg = D_u + w (D_c - D_u); apg = adaptive projected "
                             "guidance (Sadat 2024) on x0_hat, D_c + (w - 1) (diff_orth + eta diff_par); zero-star = "
                             "CFG-Zero* (Fan 2025) on eps, the unconditional eps scaled by its optimal alpha, the "
                             "first --zero-init-steps at eps = 0. apg and zero-star run both passes (2 rows) at any w.")
    apg_eta: float | None = opt(None, "--apg-eta", panel="guidance", check="finite", high=1.0,
                                help="APG: weight of the update's part parallel to D_c (default 0: orthogonal only; "
                                     "1 with no threshold and momentum = CFG).")
    apg_norm_threshold: float | None = opt(None, "--apg-norm-threshold", panel="guidance", check="finite",
                                           high=SCALE_MAX,
                                           help="APG: cap on the per-sample norm of D_c - D_u (default 0 = no cap).")
    apg_momentum: float | None = opt(None, "--apg-momentum", panel="guidance", check="finite", low=-1.0, above=True,
                                     high=0.99,
                                     help="APG: momentum beta of the running D_c - D_u, kept per sample and per run, "
                                          "reset each run (default 0 = none; the paper uses -0.5).")
    zero_init_steps: int | None = opt(None, "--zero-init-steps", panel="guidance", check="count", low=0,
                                      high=STEPS_MAX,
                                      help="CFG-Zero*: the first steps whose eps is 0 (x kept; default 1).")
    pg_factor: float = opt(0.0, "--pg-factor", panel="guidance", check="finite", high=SCALE_MAX,
                           help="PG: lambda in dx/dsigma = (x - D)/sigma + lambda sigma grad_x sum_j k(x_i, x_j) over "
                                "the batch; > 0 repels, 0 = off. Cost: kernels on x0_hat with --pg-grad exact add a backward "
                                "pass per evaluation; --kernel posterior runs classes + 1 rows per sample.")
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
    pg_classes: int = opt(0, "--pg-classes", panel="guidance", check="count", low=0, high=BATCH_MAX,
                          help="PG --kernel posterior: after the window's first evaluation (every class), each particle "
                               "runs only the K classes that held most of its posterior mass at the previous one "
                               "(K + 1 network rows a particle instead of classes + 1); 0 = every class.")
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
    pag_sigma_min: float = opt(0.0, "--pag-sigma-min", panel="guidance", check="finite",
                               help="PAG's interval: the identity-attention pass runs only at noise levels sigma > this.")
    pag_sigma_max: float = opt(math.inf, "--pag-sigma-max", panel="guidance", check="finite", allow_inf=True,
                               help="PAG's interval: it runs only at noise levels sigma <= this.")
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
    def pag_on(self) -> bool:
        return self.pag_scale > 0

    def pag_layer_names(self) -> list[str]:
        return split_list(self.pag_layers) if self.pag_layers is not None else split_list(self.layers)

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
RECORDED_WHEN_SET = {"cfg_sigma_min": 0.0, "cfg_sigma_max": math.inf, "pag_sigma_min": 0.0, "pag_sigma_max": math.inf, "ag_model": None, "ag_scale": None,
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


def check_guidance(opts: GuidanceOptions, *, many_blurs: bool = False, views: bool = False) -> list[Blur]:
    """Validate the guidance settings; returns the parsed SEG blurs (empty when SEG is off).

    Only `diffcli seg` runs one pass per blur (`many_blurs`); elsewhere one blur is one setting. `views`: the
    command synchronizes views (panorama, anagram), which the CFG++ samplers do not take.
    """
    check_cfg_pp(opts, views)
    if isinstance(opts, FlowOptions):  # the flow-model options, checked up front with the guidance
        check_fields(opts, ["guidance_embed"])
    check_fields(opts, ["cfg", "seg_scale", "pag_scale", "cfg_rule", "apg_eta", "apg_norm_threshold", "apg_momentum",
                        "zero_init_steps", "pg_factor", "sigma_start", "sigma_end", "pg_sigma_min", "pg_sigma_max",
                        "cfg_sigma_min", "cfg_sigma_max", "pag_sigma_min", "pag_sigma_max", "ag_scale",
                        "ag_sigma_min", "ag_sigma_max"])
    for name, rule in (("apg_eta", "apg"), ("apg_norm_threshold", "apg"), ("apg_momentum", "apg"),
                       ("zero_init_steps", "zero-star")):
        if getattr(opts, name) is not None and opts.cfg_rule != rule:
            raise DiffcliError(f"--{name.replace('_', '-')} goes with --cfg-rule {rule} (got --cfg-rule {opts.cfg_rule})")
    if opts.pag_layers is not None and not split_list(opts.pag_layers):
        raise DiffcliError("--pag-layers needs at least one of down, mid, up or an indexed layer (d4, m0, u1)")
    if opts.sigma_end > opts.sigma_start:
        raise DiffcliError(f"need --sigma-end <= --sigma-start (SEG's interval --seg-sigma-min, --seg-sigma-max; got "
                           f"{opts.sigma_end} and {opts.sigma_start})")
    for term in ("pg", "cfg", "pag", "ag"):
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
    check_fields(opts, ["kernel", "pg_grad", "pg_bandwidth", "pg_classes"])
    if opts.pg_classes and opts.kernel != "posterior":
        raise DiffcliError(f"--pg-classes goes with --kernel posterior (got --kernel {opts.kernel})")
    blurs = [parse_blur(spec) for spec in opts.blur_specs()]
    if len(blurs) > 1 and not many_blurs:
        raise DiffcliError(f"{len(blurs)} --blur specs: this command runs one blur (diffcli seg runs one pass per blur)")
    return blurs if opts.seg_on else []


def check_cfg_pp(opts: GuidanceOptions, views: bool = False) -> None:
    """The CFG++ samplers (`samplers.CFG_PP`) renoise with the unconditional x0_hat of ONE CFG denoiser: the scale
    is the paper's lambda in [0, 1], no PG (its push would enter the renoising), no view synchronization."""
    sampler = getattr(opts, "sampler", None)
    if sampler not in CFG_PP:
        return
    if opts.cfg is not None and not 0.0 <= opts.cfg <= 1.0:
        raise DiffcliError(f"--sampler {sampler} takes a CFG scale in [0, 1] (CFG++'s lambda), got --cfg {opts.cfg:g}")
    if opts.pg_factor:
        raise DiffcliError(f"--sampler {sampler} renoises with the unconditional x0_hat and takes no PG (--pg-factor)")
    if views:
        raise DiffcliError(f"--sampler {sampler} needs one unconditional x0_hat per step; synchronized views have "
                           "one per view: choose another sampler")


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
    """A config as run.json stores it: infinities (no limit) as null, so the file is strict JSON. The interval and
    autoguidance options (`RECORDED_WHEN_SET`) and the flow-model options (`FlowOptions`) only where set, so the
    records of runs without them read as they did before these options existed."""
    unset = {**RECORDED_WHEN_SET, **{f.name: f.default for f in fields(FlowOptions)}}
    return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(config).items()
            if not (k in unset and v == unset[k])}


@dataclass(kw_only=True)
class FlowOptions:
    """The options of the flow-matching transformer families (SD3, Flux): ignored by UNet pipelines except where
    they refuse them (`apply_flow_options`)."""
    guidance_embed: float | None = opt(None, "--guidance-embed", panel="model", check="finite", high=SCALE_MAX,
                                       help="Flux dev: the distilled guidance value the network takes as an input "
                                            "(not CFG; default: the pipeline's, 3.5). Refused on models without one.")
    offload: bool = opt(False, "--offload", panel="model",
                        help="diffusers' model CPU offload: one model of the pipeline on the GPU at a time (slower, "
                             "far less GPU memory). On a CPU there is nothing to offload.")


def apply_flow_options(family: Any, opts: FlowOptions) -> None:
    """Hand --guidance-embed to the family (refused, one line, on a model with no guidance embedding)."""
    if opts.guidance_embed is not None:
        if not hasattr(family, "set_guidance_embed"):
            raise DiffcliError(f"--guidance-embed {opts.guidance_embed}: this {family.kind} has no distilled "
                               "guidance embedding (use --cfg for classifier-free guidance)")
        family.set_guidance_embed(opts.guidance_embed)


def default_cfg(family: Any, cfg: float | None, default: float) -> float:
    """The CFG scale a run uses: as given, else 1 (off) on guidance-distilled models (Flux dev, schnell: their
    guidance is the embedded value), else the command's `default`."""
    if cfg is not None:
        return cfg
    return 1.0 if getattr(family, "distilled", False) else default


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
    """The module paths SEG (and PAG) would perturb in `net` (a family's `attention`; [] with both off): commands
    call it before writing anything, so a model without such layers is refused in one line that names the valid
    ones."""
    paths = attention.resolve_layers(net, split_list(opts.layers), option) if opts.seg_on else []
    if opts.pag_on:
        flag = "--pag-layers" if opts.pag_layers is not None else option
        paths += [p for p in attention.resolve_layers(net, opts.pag_layer_names(), flag) if p not in paths]
    return paths


def pag_of(opts: GuidanceOptions) -> Pag | None:
    """The PAG of a command's options; None when --pag-scale is 0."""
    if not opts.pag_on:
        return None
    return Pag(opts.pag_scale, opts.pag_layer_names(), sigma_min=opts.pag_sigma_min, sigma_max=opts.pag_sigma_max)


def rule_of(opts: GuidanceOptions) -> Rule | None:
    """The CFG rule of a command's options (APG, CFG-Zero*), each option at its default where not given; None for
    plain CFG."""
    if opts.cfg_rule == "apg":
        return Apg(0.0 if opts.apg_eta is None else opts.apg_eta, opts.apg_norm_threshold or 0.0,
                   opts.apg_momentum or 0.0)
    if opts.cfg_rule == "zero-star":
        return ZeroStar(1 if opts.zero_init_steps is None else opts.zero_init_steps)
    return None


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
              sigma_data, classes if opts.kernel == "posterior" else 0, opts.pg_classes)


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
    its `kernel`, PAG (`pag_of`), the CFG rule (`rule_of`: APG, CFG-Zero*) and autoguidance (`ag_of`) with the
    `guide` the command loaded. Every generating command and `drawing` build their guidance here."""
    if blur is None and opts.seg_on:
        blur = check_guidance(opts)[0]
    return Guidance(cfg, seg_of(opts, blur), pg_of(opts, kernel, sigma_data, classes), pag_of(opts), rule_of(opts),
                    ag_of(opts, guide), (opts.cfg_sigma_min, opts.cfg_sigma_max))


def cost_of(opts: GuidanceOptions, cfg: float, sampler: str | None, steps: int | None, classes: int = 0,
            views: int = 1, evaluations: int | None = None) -> dict[str, Any]:
    """What a run's guidance costs, for run.json: network rows per sample of one evaluation on a guided step, by
    pass (CFG 2, CFG + SEG 3, + PAG 4; every pass of one network in ONE batch), evaluations per sample (the
    sampler's NFE times the `views` each image denoises at each step: panorama windows, anagram views), and their
    product. Steps outside SEG's regions or window, or outside PG's window, run fewer rows: the figures are the
    guided steps' (an upper bound). PG with an exact kernel gradient adds one backward pass per evaluation;
    autoguidance runs every row again on the guide network (`guide_rows_per_evaluation`)."""
    guidance = guidance_of(replace(opts, pg_factor=0.0, blurs=split_list(opts.blurs)[:1] or None), cfg)
    if opts.pg_factor and opts.kernel == "posterior" and classes:
        rows = {"classes": min(opts.pg_classes or classes, classes), "null": 1}
    else:
        rows = guidance.rows()
        if sampler in CFG_PP and "uncond" not in rows:
            rows = {"uncond": 1, **rows}  # CFG++ reads D_u whatever the scale
    if evaluations is None and sampler is not None and steps:
        count = nfe(sampler, steps)  # None: dpm_adaptive picks its own steps
        evaluations = None if count is None else count * views
    per_eval = sum(rows.values())
    guide = per_eval if opts.ag_on else 0
    return {"rows_per_evaluation": per_eval, "rows": rows, "evaluations_per_sample": evaluations,
            **({"guide_rows_per_evaluation": guide} if guide else {}),
            "rows_per_sample": None if evaluations is None else per_eval * evaluations,
            "backward_pass": bool(opts.pg_factor) and KERNELS[opts.kernel].backward and opts.pg_grad == "exact"}
