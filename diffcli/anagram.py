"""diffcli anagram: visual anagrams with DeepFloyd IF by synchronized diffusion (003 task 2, Visual Anagrams).

One canvas image, one view per prompt (`views.make_view`); each view sees its own prompt (one conditioning
row per view) and `sync.synchronized` makes them agree. Stage I (64 px) then stage II (x4, conditioned on the
noised upsampled stage-I canvas as IF does, every view seeing its view of it) run the same synchronized DDIM.
Writes one PNG per view named by its prompt (the 003 ambiguous_images layout), and nothing else, into OUT (the
grader opens every entry with PIL); beside it, `OUT.animations/` holds a GIF and a strip of the canvas turning
into each view, and `OUT.run.json` the run record.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .backends import pipelines
from .shared.errors import DiffcliError
from .shared.devices import PerSampleRandn
from .shared.records import beside, run_record_path, write_run_json
from .shared.files import read_json_option
from .shared.names import check_file_names, safe_name, unique_stems
from .shared.images import save_gif, save_grid, save_image
from .shared.dist import Dist
from .shared.tasks import Task, run_tasks
from .shared.limits import BATCH_MAX, FRAMES_MAX, SCALE_MAX, SIDE_MAX, STEPS_MAX, check_image_size, count
from .shared.fields import check_fields, opt, redefault
from .runner import Command, RunContext, generating
from .options import (FlowOptions, GuidanceOptions, SamplingOptions, apply_flow_options, default_cfg,
                      check_guidance, check_particles, check_pipeline_steps,
                      check_sampling, cost_of, guidance_of, record as options_record, seg_layers)
from .core.sync import CASES, NOISES, rows_of, sample_views
from .data.prompt_files import key_line, resolve_prompts_file
from .core.views import PIXEL_ONLY, VIEWS, ViewOptions, ViewSet, check_factorized, frame, make_view

DEFAULT_MODEL = "DeepFloyd/IF-I-M-v1.0"
DEFAULT_SR_MODEL = "DeepFloyd/IF-II-M-v1.0"
ANIMATIONS_BESIDE = ".animations"  # OUT.animations/ next to OUT: the graded folder holds only the view images


DEFAULT_CFG = 10.0  # --cfg's default (003, IF); guidance-distilled models (Flux dev/schnell): 1, no CFG


@dataclass(kw_only=True)
class AnagramConfig(GuidanceOptions, SamplingOptions, FlowOptions):
    prompts: list[str] = opt(None, argument=True, factory=list, panel="input", cli_default=None,
                             cli_type=Optional[list[str]],
                             help="One prompt per view, in the order of --views.")
    views: list[str] = opt(None, "--views", factory=lambda: ["identity", "rotate_cw"], panel="input", cli_default=None,
                           cli_type=Optional[list[str]],
                           help=f"Views, one per prompt (default: identity rotate_cw): {', '.join(VIEWS)}. '--views "
                                "identity rotate_cw', '--views identity,rotate_cw' and repeating --views all work.")
    prompts_file: str | None = opt(None, "--prompts-file", panel="input",
                                   help="003 ambiguous_image_prompts.json (canonical_prompt, instance_prompt per "
                                        "entry): runs every pair; 'assignment' = the shipped 003 set.")
    model: str = opt(DEFAULT_MODEL, "--model", panel="model",
                     help="DeepFloyd IF stage I pipeline, or a latent one (SD 1.x/2.x, SDXL, SD3, Flux: views on its "
                          "latent grid, no stage II): a local folder or a hub id in the cache.")
    sr_model: str | None = opt(DEFAULT_SR_MODEL, "--sr-model", panel="model", cli_type=str,  # None: stage I only
                               to_config=lambda name: None if name.lower() == "none" else name,
                               help="DeepFloyd IF stage II pipeline, or 'none' for stage I images only.")
    # stage I px; default the UNet's sample size (64)
    height: int | None = opt(None, panel="sampling", check="count", high=SIDE_MAX,
                             help="Stage I height in px (default: the UNet's, 64); stage II is x4.")
    width: int | None = opt(None, panel="sampling", check="count", high=SIDE_MAX,
                            help="Stage I width in px (default: the height).")
    sampler: str | None = redefault(SamplingOptions, "sampler", "euler")  # on the scheduler's sigmas: DDIM (003), both stages
    steps: int | None = redefault(SamplingOptions, "steps", 30)
    cfg: float | None = redefault(GuidanceOptions, "cfg", None)  # None: DEFAULT_CFG; 1 (off) on guidance-distilled Flux
    sr_steps: int = opt(30, "--sr-steps", panel="sampling", check="count", high=STEPS_MAX, help="Stage II DDIM steps.")
    sr_cfg: float = opt(10.0, "--sr-cfg", panel="guidance", check="finite", high=SCALE_MAX, help="Stage II CFG scale.")
    noise_level: int = opt(50, "--noise-level", panel="sampling", check="count", low=0, high=STEPS_MAX,
                           help="Stage II: noise added to the upsampled stage-I image (timestep of IF's image-noising "
                                "scheduler).")
    negative_prompt: str | None = opt(None, "--negative-prompt", panel="input",
                                      help="Prompt of the unconditional CFG branch (default: empty).")
    seed: int = opt(0, panel="sampling", check="seed", help="Seed of the canvas noise.")
    sync: str = opt("x0", panel="sampling", choices=tuple(CASES),
                    help="What the views agree on each step: x0 (SyncTweedies), eps, xt, or none (unsynchronized).")
    noise: str = opt("canvas", panel="sampling", choices=tuple(NOISES),
                     help="Initial noise: canvas (one draw seen through every view) or views (one draw per view).")
    view_batch: int = opt(8, "--view-batch", panel="sampling", check="count", high=BATCH_MAX,
                          help="Views per network batch (x2 with CFG).")
    view_seed: int = opt(0, "--view-seed", panel="input", check="seed",
                         help="Seed of the permutation views (patch_permute, pixel_permute, jigsaw).")
    patches: int = opt(8, panel="input", check="count", high=SIDE_MAX, help="patch_permute: patches per side.")
    pieces: int = opt(4, panel="input", check="count", high=SIDE_MAX, help="jigsaw: pieces per side.")
    squares: int = opt(2, panel="input", check="count", high=SIDE_MAX, help="square_hinge: squares per side.")
    skew: float = opt(0.5, panel="input", check="finite", low=-SIDE_MAX, high=SIDE_MAX,
                      help="skew: rows of shift per column.")
    inner_angle: float = opt(90.0, "--inner-angle", panel="input", check="finite", low=-math.inf,
                             help="inner_rotate: degrees the central disc turns clockwise.")
    hybrid_sigma: float = opt(2.0, "--hybrid-sigma", panel="input", check="finite", above=True, high=SIDE_MAX,
                              help="low_pass/high_pass: std (stage-I px) of the Gaussian splitting the image.")
    triple_sigmas: list[float] = opt(None, "--triple-sigmas", factory=lambda: [1.0, 2.0], panel="input",
                                     cli_type=Optional[str], cli_default=None,
                                     to_config=lambda text: parse_sigmas(text),
                                     help="triple_*: the two Gaussians' std (stage-I px), fine,coarse (default 1,2).")
    motion_size: int = opt(7, "--motion-size", panel="input", check="count", high=SIDE_MAX,
                           help="motion_blur/motion_rest: length (stage-I px) of the diagonal motion blur.")
    scale_factor: int = opt(4, "--scale-factor", panel="input", check="count", high=SIDE_MAX,
                            help="scale_small/scale_rest: the small copy is the image shrunk by this factor.")
    frames: int = opt(12, panel="output", check="count", high=FRAMES_MAX, help="Animation frames per transition.")
    dtype: str | None = opt(None, panel="model", help="fp32, fp16 or bf16 (default: fp16 on CUDA, else fp32).")

    def view_options(self) -> ViewOptions:
        return ViewOptions(seed=self.view_seed, patches=self.patches, pieces=self.pieces, squares=self.squares,
                           skew=self.skew, inner_angle=self.inner_angle, hybrid_sigma=self.hybrid_sigma,
                           triple_sigmas=tuple(self.triple_sigmas), motion_size=self.motion_size,
                           scale_factor=self.scale_factor)


def parse_sigmas(text: str | None) -> list[float]:
    if text is None:
        return [1.0, 2.0]
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise DiffcliError(f"--triple-sigmas expects two positive numbers 'fine,coarse' like 1,2, got {text!r}")
    return values


@dataclass
class Job:
    name: str            # stem of the animation files
    prompts: list[str]   # one per view
    files: list[str] = field(default_factory=list)  # one PNG per view, set by `name_jobs`


# ---------------------------------------------------------------- input

def read_pairs(path: str) -> list[Job]:
    """003's ambiguous_image_prompts.json: {key: {canonical_prompt, instance_prompt}}; the prompt fields count."""
    data = read_json_option(path, "--prompts-file", "prompts file")
    if not isinstance(data, dict) or not data:
        raise DiffcliError(f"--prompts-file {path}: expected a JSON object "
                           "{key: {canonical_prompt, instance_prompt}}")
    jobs = []
    for key, rec in data.items():
        fields = ("canonical_prompt", "instance_prompt")
        if not isinstance(rec, dict) or not all(isinstance(rec.get(f), str) and rec[f].strip() for f in fields):
            raise DiffcliError(f"--prompts-file {path}: entry {key!r}{key_line(path, key)} needs string fields "
                               "canonical_prompt and instance_prompt")
        jobs.append(Job(safe_name(key), [rec[f] for f in fields]))
    return jobs


def validate(cfg: AnagramConfig) -> list[Job]:
    """Everything checkable before a model is loaded; returns the prompt sets to run."""
    if cfg.ag_model is not None:
        raise DiffcliError("--ag-model: autoguidance runs in sample, seg and pg; anagram does not take it yet")
    unknown = [v for v in cfg.views if v not in VIEWS]
    if unknown:
        raise DiffcliError(f"unknown view(s) {', '.join(unknown)}; choose from {', '.join(VIEWS)}")
    if len(cfg.views) < 1:
        raise DiffcliError("--views needs at least one view")
    check_factorized(cfg.views)
    check_fields(cfg, ["hybrid_sigma", "motion_size", "scale_factor"])
    if len(cfg.triple_sigmas) != 2 or not all(math.isfinite(v) and v > 0 for v in cfg.triple_sigmas):
        raise DiffcliError(f"--triple-sigmas expects two positive numbers, got {cfg.triple_sigmas}")
    for name in ("height", "width"):
        v = getattr(cfg, name)
        if v is not None and (v < 8 or v % 8):
            raise DiffcliError(f"--{name} {v}: must be a positive multiple of 8 px")
    for name in ("sr_steps", "view_batch", "frames", "patches", "pieces", "squares"):
        if getattr(cfg, name) < 1:
            raise DiffcliError(f"--{name.replace('_', '-')} must be >= 1")
    check_fields(cfg, ["height", "width", "patches", "pieces", "squares"])  # the upper limits
    if cfg.height or cfg.width:
        check_image_size(cfg.height or cfg.width, cfg.width or cfg.height)
    # noise_level: and below the stage II scheduler's steps (`load`)
    check_fields(cfg, ["sr_steps", "view_batch", "frames", "noise_level", "seed", "view_seed"])
    check_sampling(cfg, pipeline=True)
    check_guidance(cfg, views=True)
    check_particles(cfg, 1, pipeline=True, what="the number of canvases a prompt set (anagram draws one)")
    check_fields(cfg, ["sr_cfg", "skew", "inner_angle", "sync", "noise"])
    if cfg.prompts and cfg.prompts_file:
        raise DiffcliError("give prompts or --prompts-file, not both")
    if cfg.prompts_file:
        jobs = read_pairs(resolve_prompts_file(cfg.prompts_file, "ambiguous_image_prompts.json"))
    elif cfg.prompts:
        if any(not p.strip() for p in cfg.prompts):
            raise DiffcliError("a prompt is empty")
        jobs = [Job("-".join(safe_name(p, 60) for p in cfg.prompts), list(cfg.prompts))]
    else:
        raise DiffcliError('give one prompt per view: diffcli anagram "an oil painting of a horse" '
                           '"an oil painting of a snowy mountain village" --views identity rotate_cw')
    for job in jobs:
        if len(job.prompts) != len(cfg.views):
            shown = ", ".join(repr(p) for p in job.prompts[:6])
            raise DiffcliError(f"{len(job.prompts)} prompt(s) ({shown}) for {len(cfg.views)} view(s) "
                               f"({' '.join(cfg.views)}): give one prompt per view; views are {', '.join(VIEWS)}")
    return name_jobs(jobs)


def name_jobs(jobs: list[Job]) -> list[Job]:
    """File names under the one naming rule (`shared.names.unique_stems`), over all prompt sets: every view image is
    named by its prompt and the animations by the set's key (or its prompts); a name an earlier one already takes
    (equal prompts, 'a/cat' and 'a cat', keys 'a/b' and 'a b') gets `-2`, `-3`, ..., so nothing is overwritten."""
    names = unique_stems([j.name for j in jobs], lambda i, stem: animation_files(Job(stem, [])))
    views = iter(unique_stems([p for j in jobs for p in j.prompts], lambda i, stem: [f"{stem}.png"]))
    for job, name in zip(jobs, names):
        job.name, job.files = name, [f"{next(views)}.png" for _ in job.prompts]
    return jobs


def build_views(cfg: AnagramConfig, height: int, width: int) -> list:
    return [make_view(v, height, width, cfg.view_options()) for v in cfg.views]


# ---------------------------------------------------------------- one synchronized stage

def synced_sample(family, base, cond: dict[str, Any], uncond: dict[str, Any], scale: float, views: ViewSet,
                  sigmas: torch.Tensor, rng: PerSampleRandn, cfg: AnagramConfig, on_step=None) -> torch.Tensor:
    """Final instance stack (V, C, H, W) of one synchronized run of one stage (our x = x0 + sigma n form): every
    view runs the guidance stack (CFG at `scale`, SEG with `--blur`) on its own prompt's rows."""
    guidance = guidance_of(cfg, scale)
    make = lambda a, b: guidance.denoiser(base, rows_of(cond, a, b), rows_of(uncond, a, b), sigmas,  # noqa: E731
                                          limit=family.limit)
    with guidance.installed(family.attention):
        state = family.state_dtype(sigmas.device)
        return sample_views(make, views, sigmas, lambda shape: rng.randn(shape)[0].to(state), views.canvas,
                            sampler=cfg.sampler, case=cfg.sync, noise=cfg.noise, view_batch=cfg.view_batch,
                            knobs=cfg.knobs(), callback=on_step, start_scale=family.start_scale(sigmas[0]))


def images_of(views: ViewSet, w: torch.Tensor, sigma_last, family, case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(canvas image (3, H, W), one image per view (V, 3, H, W)) in [-1, 1]: synchronized views are views of
    the canvas; unsynchronized ones are each their own sample."""
    rows = family.decode(w, sigma_last)
    canvas = views.average(rows)
    return canvas, (rows if case == "none" else views.looks(canvas))


@torch.no_grad()
def generate(pipe, sr_pipe, job: Job, cfg: AnagramConfig, size: tuple[int, int], device: torch.device,
             on_step=None) -> dict[str, torch.Tensor]:
    """Stage I (and II): {'canvas': (3, H, W), 'views': (V, 3, H, W), 'stage1': (3, h, w)} in [-1, 1] on the CPU."""
    height, width = size
    rng = PerSampleRandn([cfg.seed], device)
    cond, uncond = pipe.encode_prompts(job.prompts, cfg.negative_prompt, height, width, device)
    sigmas = pipe.sigmas(cfg.steps, device, cfg.schedule or "scheduler")
    if not pipe.pixel_space:  # latent models: the views act on the latent grid, each view's latent is decoded
        latent = pipe.latent_shape(height, width)
        views = ViewSet(build_views(cfg, latent[1], latent[2]), latent)
        w = synced_sample(pipe, pipe.denoiser(), cond, uncond, default_cfg(pipe, cfg.cfg, DEFAULT_CFG), views,
                          sigmas, rng, cfg, on_step)
        z = views.average(w)
        per_view = pipe.decode(w if cfg.sync == "none" else views.forward(z), sigmas[-1])
        canvas = pipe.decode(z[None], sigmas[-1])[0]
        return {"stage1": canvas, "canvas": canvas, "views": per_view}
    views = ViewSet(build_views(cfg, height, width), (3, height, width))
    w = synced_sample(pipe, pipe.denoiser(), cond, uncond, default_cfg(pipe, cfg.cfg, DEFAULT_CFG), views,
                          sigmas, rng, cfg, on_step)
    canvas, per_view = images_of(views, w, sigmas[-1], pipe, cfg.sync)
    result = {"stage1": canvas, "canvas": canvas, "views": per_view}
    if sr_pipe is None:
        return result

    # stage II: the same views on the larger canvas (permutations act on blocks), T5 embeddings reused
    scale = sr_pipe.upscale(pipe)
    big = (3, height * scale, width * scale)
    views2 = ViewSet(views.views, big)
    noise = rng.randn(big)[0].to(device)
    if cfg.sync == "none":  # each view is upsampled from its own stage-I sample
        up, labels = sr_pipe.condition(per_view.to(device), big[1], big[2], cfg.noise_level, views2.forward(noise))
    else:  # every view sees its view of the one upsampled canvas (Visual Anagrams views the whole UNet input)
        up, labels = sr_pipe.condition(canvas[None].to(device), big[1], big[2], cfg.noise_level, noise[None])
        up, labels = views2.forward(up[0]), labels.expand(len(views))
    cond2, uncond2 = ({**c, "image": up, "class_labels": labels} for c in (cond, uncond))
    sigmas2 = sr_pipe.sigmas(cfg.sr_steps, device, cfg.schedule or "scheduler")
    w2 = synced_sample(sr_pipe, sr_pipe.denoiser(), cond2, uncond2, cfg.sr_cfg, views2, sigmas2, rng, cfg,
                       on_step)
    canvas2, per_view2 = images_of(views2, w2, sigmas2[-1], sr_pipe, cfg.sync)
    return {"stage1": canvas, "canvas": canvas2, "views": per_view2}


def animation(views: list, canvas: torch.Tensor, frames: int) -> list[torch.Tensor]:
    """The canvas turning into each (non-identity) view and back: frames per transition, holding at the ends."""
    out = [canvas] * 3
    for v in views:
        if v.name == "identity":
            continue
        go = [frame(v, canvas, k / frames) for k in range(1, frames + 1)]
        out += go + [go[-1]] * 3 + go[::-1] + [canvas] * 3
    return out


# ---------------------------------------------------------------- the command

def load(cfg: AnagramConfig, device: torch.device, dtype: torch.dtype):
    """(stage I, stage II or None) as families (`family.Family`)."""
    pipe = pipelines.load_family(cfg.model, device, dtype, kind="DeepFloyd IF stage I", offload=cfg.offload)
    apply_flow_options(pipe, cfg)
    if not pipe.pixel_space:  # SD 1.x/2.x, SDXL, SD3, Flux: views on the latent grid, no stage II
        bad = [v for v in cfg.views if not VIEWS[v].latent]
        if bad:
            raise DiffcliError(f"--views {' '.join(bad)}: no meaning on a {pipe.kind}'s latent grid; latent models "
                               f"take {', '.join(k for k, v in VIEWS.items() if v.latent)}")
        check_pipeline_steps(pipe.pipe, cfg.steps, cfg.schedule)
        return pipe, None
    if pipe.name != "if" or pipe.stage != 1:
        raise DiffcliError(f"--model {cfg.model!r} is a {pipe.kind}; anagram needs a DeepFloyd IF stage I "
                           "pipeline (IFPipeline) or a latent one (SD 1.x/2.x, SDXL, SD3, Flux)")
    sr_pipe = None
    if cfg.sr_model:
        sr_pipe = pipelines.load_family(cfg.sr_model, device, dtype, kind="DeepFloyd IF stage II", text_encoder=None)
        if sr_pipe.name != "if" or sr_pipe.stage != 2:
            raise DiffcliError(f"--sr-model {cfg.sr_model!r} is a {sr_pipe.kind}; it needs a DeepFloyd IF "
                               "stage II pipeline (IFSuperResolutionPipeline), or pass --sr-model none")
        sr_pipe.upscale(pipe)
        check_pipeline_steps(sr_pipe.pipe, cfg.sr_steps, cfg.schedule, "sr_steps")
        noising = getattr(getattr(sr_pipe.pipe, "image_noising_scheduler", None), "config", None)
        if isinstance(getattr(noising, "num_train_timesteps", None), int):
            count("noise_level", cfg.noise_level, 0, noising.num_train_timesteps - 1)
    check_pipeline_steps(pipe.pipe, cfg.steps, cfg.schedule)
    pixel_only = [v for v in cfg.views if v in PIXEL_ONLY]
    if pixel_only and not pipe.pixel_space:
        raise DiffcliError(f"view(s) {' '.join(pixel_only)} split RGB colours: they need a pixel model (DeepFloyd IF), "
                           f"not a {pipe.kind}")
    return pipe, sr_pipe


def view_files(job, views: list[str]) -> list[str]:
    """One PNG per view named by its prompt (the 003 layout; names as `name_jobs` gave them)."""
    return list(job.files) or [f"{stem}.png" for stem in unique_stems(job.prompts)]


def animation_files(job) -> list[str]:
    """The GIF and the strip of one prompt set, in OUT.animations/."""
    return [f"{job.name}.gif", f"{job.name}_strip.png"]


def outputs(job, views: list[str], out: Path, anim: Path) -> list[Path]:
    """Every file one prompt set writes: its view images in OUT, its animations in OUT.animations beside it."""
    return [out / f for f in view_files(job, views)] + [anim / f for f in animation_files(job)]


def run(cfg: AnagramConfig, out: Path, overwrite: bool, device_name: str | None,
        options: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    jobs = validate(cfg)
    names = [f for job in jobs for f in view_files(job, cfg.views) + animation_files(job)]
    check_file_names(out, names)  # a name too long fails now, not after the sampling
    with Dist(device_name) as dist:
        return _run(cfg, jobs, out, overwrite, resume, dist, options)


def _run(cfg: AnagramConfig, jobs: list, out: Path, overwrite: bool, resume: bool, dist: Dist,
         options: dict[str, Any]) -> dict[str, Any]:
    """Prompt pairs are jobs: torchrun ranks take every world-th one, --resume skips those already written."""
    device = dist.device
    dtype = pipelines.pipeline_dtype(cfg.dtype, device, cfg.model)
    record_file, anim = run_record_path(out, COMMAND.record_beside), beside(out, ANIMATIONS_BESIDE)  # OUT holds only the views
    if cfg.height or cfg.width:  # bad view/size pairs fail before loading
        build_views(cfg, cfg.height or cfg.width, cfg.width or cfg.height)
    pipe, sr_pipe = load(cfg, device, dtype)
    cfg = replace(cfg, cfg=default_cfg(pipe, cfg.cfg, DEFAULT_CFG),
                  sr_model=cfg.sr_model if pipe.pixel_space else None)  # latent models have no stage II
    for family in (pipe, *([sr_pipe] if sr_pipe is not None else [])):
        seg_layers(family.attention, cfg, "--layers")
    default = pipe.native_size()
    size = (cfg.height or cfg.width or default, cfg.width or cfg.height or default)
    pipe.check_size(*size, ("--height", "--width"))
    if sr_pipe is not None:  # stage II draws the canvas x its scale
        scale = sr_pipe.upscale(pipe)
        check_image_size(size[0] * scale, size[1] * scale,
                         (f"stage II's height (--height x {scale})", f"stage II's width (--width x {scale})"))
    build_views(cfg, *size)
    if not pipe.pixel_space:  # the views are built on the latent grid too: a bad one fails now
        latent = pipe.latent_shape(*size)
        build_views(cfg, latent[1], latent[2])
    record = {**options_record(cfg), **options}
    out = dist.begin(out, overwrite, resume, "anagram", record, record_path=record_file, beside_folders=[anim],
                     model=cfg.model, sr_model=cfg.sr_model)

    def draw(mine: list[Task], advance) -> Iterator[tuple]:
        for task in mine:
            job = task.item
            result = generate(pipe, sr_pipe, job, cfg, size, device, lambda info: advance(1))
            names = view_files(job, cfg.views)
            yield from ((out / name, save_image, image, {"prompt": prompt, "view": k})
                        for k, (name, image, prompt) in enumerate(zip(names, result["views"], job.prompts)))
            gif, strip_png = (anim / f for f in animation_files(job))
            yield gif, save_gif, animation(build_views(cfg, *size), result["canvas"], cfg.frames)
            strip = [frame(v, result["canvas"], t) for v in build_views(cfg, *size) if v.name != "identity"
                     for t in (0, 0.25, 0.5, 0.75, 1)] or [result["canvas"]]
            yield strip_png, save_grid, torch.stack(strip), 5

    files = [f for job in jobs for f in view_files(job, cfg.views)]
    per_job = cfg.steps + (cfg.sr_steps if sr_pipe is not None else 0)
    done = run_tasks(dist, [Task(job, tuple(outputs(job, cfg.views, out, anim))) for job in jobs], draw,
                     resume=resume, label="anagram", work=lambda task: per_job, finish=lambda done: write_run_json(
                         out, "anagram", record, device, record_path=record_file, status="complete", model=cfg.model,
                         sr_model=cfg.sr_model, world_size=dist.world, size=list(size), jobs=[asdict(j) for j in jobs],
                         files=files, animations=anim.name,
                         cost=cost_of(cfg, cfg.cfg, cfg.sampler, cfg.steps, views=len(cfg.views))))
    return {"out": str(out), "run_record": str(record_file), "animations": str(anim), "images": len(files),
            "pairs": len(jobs), "skipped": done.skipped, "main": dist.main}


def build(values: dict[str, Any]) -> AnagramConfig:
    """The command line's values -> the config. Click gives an option one value, so in `--views identity
    rotate_cw` the second name lands among the prompts: a bare view name there is taken as a view (a prompt is
    never just a view's name); views may also be comma-separated."""
    prompts, views = values.pop("prompts"), values.pop("views")
    names = [v for spec in views or [] for v in spec.replace(",", " ").split()]
    names += [p for p in prompts or [] if p in VIEWS]
    return AnagramConfig(**values, prompts=[p for p in prompts or [] if p not in VIEWS],
                         views=names or ["identity", "rotate_cw"])


def main(cfg: AnagramConfig, ctx: RunContext) -> dict[str, Any]:
    """`diffcli anagram`: run every prompt set and say what was written."""
    result = run(cfg, ctx.out, ctx.overwrite, ctx.device, ctx.options(), resume=ctx.resume)
    if result["main"]:
        skipped = f" ({result['skipped']} already there)" if ctx.resume else ""
        ctx.echo(f"wrote {result['images']} view image(s) of {result['pairs']} anagram(s){skipped} to {result['out']}, "
                 f"their animations to {result['out']}.animations and the run record to {result['out']}.run.json")
    return result


COMMAND = Command(
    "anagram", AnagramConfig, validate, main, build=build,
    context=generating("diffcli-out/anagram",
                       "Continue an interrupted run in --out (same options): prompts whose files all exist are "
                       "skipped.",
                       "Output folder: only the view images (the 003 ambiguous_images layout, gradable as written); "
                       "OUT.run.json and OUT.animations/ go beside it."),
    record_beside=True,
    scores=("clip", "fid", "kid"), clip_app="ambiguous_images",
    help="""Visual anagrams: one image that shows each prompt under its view, by synchronized DeepFloyd IF
    (pixel views) or a latent model (SD, SDXL, SD3, Flux: views on the latent grid).

    Example: diffcli anagram "an oil painting of a horse" "an oil painting of a snowy mountain village" --views identity rotate_cw --out ambiguous_images

    Example: diffcli anagram --prompts-file assignment --out ambiguous_images && diffcli eval ambiguous_images --app ambiguous_images
    """)
