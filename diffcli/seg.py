"""diffcli seg: Smoothed Energy Guidance (Hong 2024) on Stable Diffusion 1.x/2.x and SDXL, with the 000 seed's blurs.

SEG is `guidance.stack` (CFG + SEG in one batch, optional PG) over the pipeline's denoiser, run by any sampler of
`diffcli.core.samplers` (default: Euler on the scheduler's sigmas = DDIM); the blurs live in `query_blur.py`, the
processor in `attention.py`, the guided steps in `guidance.py`. This module runs prompts and blurs, names and
writes the outputs.
"""
from __future__ import annotations

import contextlib
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .core import attention
from .backends import pipelines
from .backends.family import Family
from .shared.errors import DiffcliError
from .shared.devices import PerSampleRandn, pick_dtype
from .shared.files import atomic_path, clear_temp_files, write_json
from .shared.names import check_file_names, safe_name, unique_stems
from .shared.images import load_images, save_grid, save_image
from .shared.records import write_run_json
from .shared.dist import Dist
from .shared.tasks import Done, Task, run_tasks
from .core.guidance import Guidance, guided_steps, step_index
from .shared.limits import BATCH_MAX, N_MAX, SIDE_MAX, check_image_size
from .shared.fields import check_fields, opt, redefault
from .shared.names import read_prompts_file
from .runner import Command, RunContext, generating
from .options import (GuidanceOptions, SamplingOptions, check_guidance, check_particles, check_pipeline_steps,
                      pipeline_guide,
                      check_sampling, guidance_of, record as options_record, split_list)
from .core.query_blur import Blur
from .core.samplers import run_sampler

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
METRIC_FIELDS = ("blur", "prompt", "step", "sigma", "layer", "role", "blurred", "l2", "laplacian_var", "edge_entropy")


@dataclass(kw_only=True)
class SegConfig(GuidanceOptions, SamplingOptions):
    prompts: list[str]
    model: str = opt(DEFAULT_MODEL, "--model", panel="model",
                     help="SD 1.x/2.x or SDXL pipeline: a hub id in the cache or a local folder (save_pretrained "
                          "layout).")
    cfg: float | None = redefault(GuidanceOptions, "cfg", 5.0)  # the official SEG-SDXL default; 0 or 1 = SEG without CFG
    seg_scale: float | None = redefault(GuidanceOptions, "seg_scale", 3.0)
    sampler: str | None = redefault(SamplingOptions, "sampler", "euler")  # on the scheduler's sigmas: DDIM
    steps: int | None = redefault(SamplingOptions, "steps", 50)
    seed: int = opt(0, panel="sampling", check="seed", per="n", help="Image i of each prompt uses seed + i.")
    n: int = opt(1, "--n", panel="sampling", check="count", high=BATCH_MAX,  # a prompt's images are one network batch
                 help="Images per prompt (one batch).")
    height: int | None = opt(None, panel="sampling", check="count", high=SIDE_MAX,
                             help="Image height (default: the model's native size).")
    width: int | None = opt(None, panel="sampling", check="count", high=SIDE_MAX,
                            help="Image width (non-square allowed).")
    negative_prompt: str | None = opt(None, "--negative-prompt", panel="input",
                                      help="Prompt of the unconditional CFG branch (default: empty).")
    dtype: str | None = opt(None, panel="model", help="fp32, fp16 or bf16 (default: fp16 on CUDA, else fp32).")
    metrics: bool = opt(False, "--metrics", panel="output",
                        help="Write metrics.csv/json: per step, L2 of attention output - input, Laplacian variance, "
                             "Sobel edge entropy of --track-block.")
    track_block: str = opt("mid", "--track-block", panel="output",
                           help="Block (down, mid, up) or layer (d4, m0, u1) whose metrics --metrics logs.")


@dataclass(kw_only=True)
class SegPrompts:
    """The command line's prompts: one as the argument, or a file of them (SegConfig.prompts)."""
    prompt: str | None = opt(None, argument=True, panel="input", help="Text prompt (or --prompts-file).")
    prompts_file: Path | None = opt(None, "--prompts-file", panel="input",
                                    help="One prompt a line (blank lines and # comments skipped).")


def build(values: dict[str, Any]) -> SegConfig:
    """The command line's values -> the config: a prompt or --prompts-file, not both."""
    prompt, prompts_file = values.pop("prompt"), values.pop("prompts_file")
    if prompt is not None and prompts_file is not None:
        raise DiffcliError("give a prompt or --prompts-file, not both")
    prompts = read_prompts_file(prompts_file) if prompts_file is not None else ([prompt] if prompt is not None else [])
    return SegConfig(**values, prompts=prompts)


def validate(cfg: SegConfig) -> list[Blur]:
    """Everything checkable before a model is loaded or a file written; returns the parsed blurs."""
    if not cfg.prompts or not all(p.strip() for p in cfg.prompts):
        raise DiffcliError('give a prompt (diffcli seg "a cat") or --prompts-file FILE')
    check_fields(cfg, ["n", "seed"])
    check_sampling(cfg, pipeline=True)
    blurs = check_guidance(cfg, many_blurs=True)
    check_particles(cfg, cfg.n, pipeline=True)
    if cfg.pg_factor and cfg.kernel == "clip":
        raise DiffcliError("--kernel clip loads a CLIP model: use diffcli pg --model ... --kernel clip")
    check_fields(cfg, ["height", "width"])
    if cfg.height is not None and cfg.width is not None:
        check_image_size(cfg.height, cfg.width)
    images = len(cfg.prompts) * cfg.n * len(blurs or [None])
    if images > N_MAX:
        raise DiffcliError(f"{len(cfg.prompts)} prompt(s) x --n {cfg.n} x {len(blurs or [None])} blur(s) = {images} "
                           f"images; a run writes at most {N_MAX}")
    return blurs or [None]


# ---------------------------------------------------------------- sampling

@torch.no_grad()
def sample(pipe, cond: dict[str, Any], uncond: dict[str, Any], seeds: list[int], cfg: SegConfig, guidance: Guidance,
           sigmas: torch.Tensor, device: torch.device, callback=None) -> torch.Tensor:
    """One batch of images (N, 3, H, W) in [-1, 1] for one prompt's encodings under `guidance` (its terms
    installed by the caller); sample i starts from seeds[i]."""
    family = pipelines.pipeline_family(pipe)
    height, width = size(family, cfg)
    model = guidance.denoiser(family.denoiser(), cond, uncond, sigmas)
    rng = PerSampleRandn(seeds, device)
    x = family.initial_latents(rng, family.latent_shape(height, width), sigmas[0])
    x = run_sampler(cfg.sampler, model, x, sigmas, callback=callback, noise=rng, **cfg.knobs())
    return family.decode(x, sigmas[-1])


def size(family: Family, cfg: SegConfig) -> tuple[int, int]:
    default = family.native_size()
    height, width = cfg.height or default, cfg.width or default
    family.check_size(height, width, ("--height", "--width"))
    return height, width


def image_stems(prompts: list[str]) -> list[str]:
    """One file-name stem per prompt under diffcli's one naming rule (`shared.names.unique_stems`): prompts that clean to
    the same name ('a/b', 'a b', 'A b') get -2, -3 ... suffixes."""
    return unique_stems(prompts)


def blur_folder(blur: Blur | None) -> str:
    """The subfolder of one blur's images when a run has several."""
    return safe_name(spec_of(blur))


def planned_files(cfg: SegConfig, blurs: list[Blur]) -> list[str]:
    """The images a run writes, relative to OUT (checked for the file system's name limit before any work)."""
    folders = [""] if len(blurs) == 1 else [blur_folder(b) + "/" for b in blurs]
    return [f"{d}{stem}_seed{cfg.seed + i}.png" for d in folders for stem in image_stems(cfg.prompts)
            for i in range(cfg.n)]


def write_metrics(folder: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(folder / "metrics.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    write_json(folder / "metrics.json", rows, indent=1)


# ---------------------------------------------------------------- the command

def run(cfg: SegConfig, out: Path, overwrite: bool, device_name: str | None, options: dict[str, Any],
        resume: bool = False) -> dict[str, Any]:
    blurs = validate(cfg)
    check_file_names(out, planned_files(cfg, blurs))  # a name too long fails now, not after the sampling
    with Dist(device_name) as dist:
        if cfg.metrics and (resume or dist.world > 1):
            raise DiffcliError("--metrics records one uninterrupted single-process run; drop --resume/torchrun or "
                               "--metrics")
        return _run(cfg, blurs, out, overwrite, resume, dist, options)


def _run(cfg: SegConfig, blurs: list[Blur], out: Path, overwrite: bool, resume: bool, dist: Dist,
         options: dict[str, Any]) -> dict[str, Any]:
    """Prompts are tasks: torchrun ranks take every world-th one, --resume skips those whose images all exist;
    rank 0 then reads the images back for the grid and writes run.json."""
    device = dist.device
    dtype = pick_dtype(cfg.dtype, device)
    family = pipelines.load_family(cfg.model, device, dtype)
    if family.pixel_space:
        raise DiffcliError(f"{cfg.model!r} is a pixel-space (DeepFloyd IF) pipeline; seg runs latent SD 1.x/2.x "
                           "and SDXL models")
    height, width = size(family, cfg)
    check_image_size(height, width)
    check_pipeline_steps(family.pipe, cfg.steps, cfg.schedule)
    family.check_memory(cfg.n, height, width, dtype, device, "a prompt's images (one network batch)", "lower --n")
    perturbed = family.layers(split_list(cfg.layers), "--layers") if blurs[0] is not None else []
    tracked = family.layers([cfg.track_block], "--track-block") if cfg.metrics else []
    guide = pipeline_guide(cfg, family, device, dtype)
    guide_perturbed = attention.resolve_layers(guide[1], split_list(cfg.layers), "--layers") \
        if guide is not None and perturbed else []
    record = {**options_record(cfg), **options}
    out = dist.begin(out, overwrite, resume, "seg", record)  # nothing is written before this line

    sigmas = family.sigmas(cfg.steps, device, cfg.schedule or "scheduler")
    guided = guided_steps(sigmas, split_list(cfg.regions), cfg.sigma_start, cfg.sigma_end) if perturbed else []
    seeds = [cfg.seed + i for i in range(cfg.n)]
    kernel = pipelines.pipeline_kernel(family, cfg)
    guides = {spec_of(b): guidance_of(cfg, cfg.cfg, b, kernel, family.sigma_data, guide=guide) for b in blurs}
    state = next((g.seg.state for g in guides.values() if g.seg is not None), attention.SegState())
    for g in guides.values():
        if g.seg is not None:
            g.seg.state = state  # one set of processors serves every blur
    folders = {spec_of(b): out if len(blurs) == 1 else out / blur_folder(b) for b in blurs}
    if resume and len(blurs) > 1:  # the per-blur folders are ours too: clear their killed writers' temp files
        dist.main_first(lambda: clear_temp_files(*folders.values()))
    names = lambda stem, blur: [folders[spec_of(blur)] / f"{stem}_seed{seed}.png" for seed in seeds]  # noqa: E731
    tasks = [Task((prompt, stem), tuple(f for b in blurs for f in names(stem, b)))
            for prompt, stem in zip(cfg.prompts, image_stems(cfg.prompts))]
    recorder = [] if cfg.metrics else None
    metrics: dict[str, list[dict[str, Any]]] = {spec_of(b): [] for b in blurs}

    def draw(mine: list[Task], advance) -> Iterator[tuple]:
        for task in mine:
            prompt, stem = task.item
            cond, uncond = family.encode_prompts([prompt] * cfg.n, cfg.negative_prompt, height, width, device)
            for blur in blurs:  # same prompt encodings and seeds for every blur
                batch = sample(family, cond, uncond, seeds, cfg, guides[spec_of(blur)], sigmas, device,
                               callback=lambda info: advance(1))
                yield from ((path, save_image, image) for image, path in zip(batch, names(stem, blur)))
                if recorder is not None:
                    metrics[spec_of(blur)] += [{"blur": spec_of(blur), "prompt": prompt, "step": step_index(sigmas, r["sigma"]),
                                            **r} for r in recorder]
                    recorder.clear()

    files = {spec_of(b): [str(f.relative_to(out)) for task in tasks for f in names(task.item[1], b)] for b in blurs}

    def finish(done: Done) -> None:
        stacked = [load_images(out / f for f in files[spec_of(b)][:GRID_MAX]) for b in blurs]
        if len(blurs) == 1:
            save_grid(out / "grid.png", stacked[0], nrow=cfg.n)
        else:  # side by side: one row per (prompt, seed), one column per blur
            save_grid(out / "grid.png", torch.stack(stacked, 1).flatten(0, 1), nrow=len(blurs))
        if cfg.metrics:
            for b in blurs:
                write_metrics(folders[spec_of(b)], metrics[spec_of(b)])
        write_run_json(out, "seg", record, device, status="complete", world_size=dist.world,
                       model={"kind": family.kind, "model": cfg.model}, height=height, width=width,
                       perturbed_layers=perturbed, tracked_layers=tracked,
                       guided_steps=[i for i, g in enumerate(guided) if g],
                       blurs={spec_of(b): str(folders[spec_of(b)].relative_to(out)) for b in blurs}, images=files)

    with attention.installed(family.attention, state, perturbed, tracked, recorder), \
            attention.installed(guide[1], state, guide_perturbed) if guide_perturbed else contextlib.nullcontext():
        done = run_tasks(dist, tasks, draw, resume=resume, label="seg", work=lambda task: cfg.steps * len(blurs),
                         finish=finish)
    return {"out": str(out), "images": sum(len(f) for f in files.values()), "blurs": len(blurs),
            "skipped": done.skipped, "main": dist.main}


GRID_MAX = 256  # images per blur column in grid.png


def spec_of(blur: Blur | None) -> str:
    """A blur's spec, or 'none' for the SEG-off run (seg_scale 0)."""
    return "none" if blur is None else blur.spec


def main(cfg: SegConfig, ctx: RunContext) -> dict[str, Any]:
    """`diffcli seg`: run every prompt and blur and say what was written."""
    result = run(cfg, ctx.out, ctx.overwrite, ctx.device, ctx.options(), resume=ctx.resume)
    if result["main"]:
        skipped = f" ({result['skipped']} prompt(s) already there)" if ctx.resume else ""
        ctx.echo(f"wrote {result['images']} images ({result['blurs']} blur{'s' if result['blurs'] > 1 else ''})"
                 f"{skipped}, grid.png and run.json to {result['out']}")
    return result


COMMAND = Command(
    "seg", SegConfig, validate, main, build=build, cli=SegPrompts,
    notes=lambda values: {"prompts_file": str(values["prompts_file"]) if values["prompts_file"] else None},
    context=generating("diffcli-out/seg",
                       "Continue an interrupted run in --out (same options): prompts whose images all exist are "
                       "skipped."),
    scores=("fid", "kid"),
    help="""Smoothed Energy Guidance (SEG) on Stable Diffusion 1.x/2.x and SDXL, with gaussian, box and EMA query blurs.

    Example: diffcli seg "a cat" --blur gaussian_-1_10 --blur interpolatedBoxBlur_5_0.5 --out seg-cats

    Example: diffcli seg --prompts-file prompts.txt --model ./sd-v1-5 --guidance 7.5 --regions begin --n 4
    """)
