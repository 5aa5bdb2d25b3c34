"""Text-to-image runs on diffusers pipelines (SD 1.x/2.x, SDXL, SD3, Flux): the library under `diffcli seg` and
`diffcli sample --model PIPE`.

One run: prompts are tasks (`shared.tasks.run_tasks`: torchrun ranks, --resume), each prompt's --n images one
network batch sampled under the run's guidance (`options.guidance_of`: CFG or its rule, SEG per blur, PAG, PG),
written as PROMPT_seedS.png (one subfolder per blur when there are several), grid.png and run.json with the cost.
The commands differ only in their defaults (seg: SEG on; sample: SEG off) and in what they name the run.
"""
from __future__ import annotations

import contextlib
import csv
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from .core import attention
from .backends import pipelines
from .backends.family import Family
from .shared.errors import DiffcliError
from .shared.devices import PerSampleRandn
from .shared.files import atomic_path, clear_temp_files, write_json
from .shared.names import safe_name, unique_stems
from .shared.images import load_images, save_grid, save_image
from .shared.records import write_run_json
from .shared.dist import Dist
from .shared.tasks import Done, Task, run_tasks
from .core.guidance import Guidance, guided_steps, step_index
from .shared.limits import BATCH_MAX, N_MAX, SIDE_MAX, check_image_size
from .shared.fields import check_fields, opt
from .options import (FlowOptions, GuidanceOptions, SamplingOptions, apply_flow_options, check_guidance,
                      check_particles, check_pipeline_steps, check_sampling, cost_of, default_cfg as resolve_cfg, guidance_of, pipeline_guide,
                      record as options_record, split_list)
from .core.query_blur import Blur
from .core.samplers import run_sampler

METRIC_FIELDS = ("blur", "prompt", "step", "sigma", "layer", "role", "blurred", "l2", "laplacian_var", "edge_entropy")


@dataclass(kw_only=True)
class PipelineRun(GuidanceOptions, SamplingOptions, FlowOptions):
    """What a text-to-image run reads besides the guidance and sampling groups (seg's SegConfig carries these fields
    under the same names, with their command-line declarations; `diffcli sample --model` builds one)."""
    prompts: list[str]
    model: str
    n: int = opt(1, "--n", check="count", high=BATCH_MAX, help="Images per prompt (one batch).")
    seed: int = opt(0, check="seed", per="n", help="Image i of each prompt uses seed + i.")
    height: int | None = opt(None, check="count", high=SIDE_MAX, help="Image height.")
    width: int | None = opt(None, check="count", high=SIDE_MAX, help="Image width.")
    negative_prompt: str | None = None
    dtype: str | None = None
    metrics: bool = False
    track_block: str = "mid"


def check_prompts(cfg, many_blurs: bool = False) -> list[Blur | None]:
    """Everything checkable before a model is loaded or a file written; returns the parsed blurs ([None]: SEG off)."""
    if not cfg.prompts or not all(p.strip() for p in cfg.prompts):
        raise DiffcliError('give a prompt ("a cat") or --prompts-file FILE')
    check_fields(cfg, ["n", "seed"])
    check_sampling(cfg, pipeline=True)
    blurs = check_guidance(cfg, many_blurs=many_blurs)
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


@torch.no_grad()
def sample(pipe, cond: dict[str, Any], uncond: dict[str, Any], seeds: list[int], cfg, guidance: Guidance,
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


def size(family: Family, cfg) -> tuple[int, int]:
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


def planned_files(cfg, blurs: list[Blur]) -> list[str]:
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

def run_prompts(cfg, blurs: list[Blur | None], out: Path, overwrite: bool, resume: bool, dist: Dist,
                options: dict[str, Any], command: str = "seg", default_cfg: float = 5.0) -> dict[str, Any]:
    """Prompts are tasks: torchrun ranks take every world-th one, --resume skips those whose images all exist;
    rank 0 then reads the images back for the grid and writes run.json."""
    device = dist.device
    dtype = pipelines.pipeline_dtype(cfg.dtype, device, cfg.model)
    family = pipelines.load_family(cfg.model, device, dtype, offload=cfg.offload)
    apply_flow_options(family, cfg)
    cfg = replace(cfg, cfg=resolve_cfg(family, cfg.cfg, default_cfg))
    if family.pixel_space:
        raise DiffcliError(f"{cfg.model!r} is a pixel-space (DeepFloyd IF) pipeline; {command} runs latent SD "
                           "1.x/2.x, SDXL, SD3 and Flux models")
    height, width = size(family, cfg)
    check_image_size(height, width)
    check_pipeline_steps(family.pipe, cfg.steps, cfg.schedule)
    family.check_memory(cfg.n, height, width, dtype, device, "a prompt's images (one network batch)", "lower --n")
    perturbed = family.layers(split_list(cfg.layers), "--layers") if blurs[0] is not None else []
    identity = family.layers(cfg.pag_layer_names(), "--pag-layers" if cfg.pag_layers is not None else "--layers") \
        if cfg.pag_on else []
    if cfg.metrics and not family.tracks_metrics:
        raise DiffcliError(f"--metrics tracks UNet attention blocks; a {family.kind} has no such tracking yet")
    tracked = family.layers([cfg.track_block], "--track-block") if cfg.metrics else []
    guide = pipeline_guide(cfg, family, device, dtype)  # autoguidance's sibling pipeline: its layers perturbed alike
    guide_perturbed = attention.resolve_layers(guide[1], split_list(cfg.layers), "--layers") \
        if guide is not None and perturbed else []
    guide_identity = attention.resolve_layers(guide[1], cfg.pag_layer_names(), "--pag-layers") \
        if guide is not None and identity else []
    record = {**options_record(cfg), **options}
    out = dist.begin(out, overwrite, resume, command, record)  # nothing is written before this line

    sigmas = family.sigmas(cfg.steps, device, cfg.schedule or "scheduler")
    guided = guided_steps(sigmas, split_list(cfg.regions), cfg.sigma_start, cfg.sigma_end) if perturbed else []
    seeds = [cfg.seed + i for i in range(cfg.n)]
    kernel = pipelines.pipeline_kernel(family, cfg)
    guides = {spec_of(b): guidance_of(cfg, cfg.cfg, b, kernel, family.sigma_data, guide=guide) for b in blurs}
    state = attention.SegState()
    for g in guides.values():  # one set of processors serves every blur (and PAG)
        for term in (g.seg, g.pag):
            if term is not None:
                term.state = state
    folders = {spec_of(b): out if len(blurs) == 1 else out / blur_folder(b) for b in blurs}
    if resume and len(blurs) > 1:  # the per-blur folders are ours too: clear their killed writers' temp files
        dist.main_first(lambda: clear_temp_files(*folders.values()))
    names = lambda stem, blur: [folders[spec_of(blur)] / f"{stem}_seed{seed}.png" for seed in seeds]  # noqa: E731
    tasks = [Task((prompt, stem), tuple(f for b in blurs for f in names(stem, b)))
            for prompt, stem in zip(cfg.prompts, image_stems(cfg.prompts))]
    recorder = [] if cfg.metrics else None
    metrics: dict[str, list[dict[str, Any]]] = {spec_of(b): [] for b in blurs}

    def draw(mine: list[Task], advance) -> Iterator[tuple]:
        if hasattr(family, "encode_all"):  # flow transformers: encode this rank's prompts, free the text encoders
            family.encode_all([[t.item[0]] * cfg.n for t in mine], cfg.negative_prompt, height, width, device)
        for task in mine:
            prompt, stem = task.item
            cond, uncond = family.encode_prompts([prompt] * cfg.n, cfg.negative_prompt, height, width, device)
            for blur in blurs:  # same prompt encodings and seeds for every blur
                batch = sample(family, cond, uncond, seeds, cfg, guides[spec_of(blur)], sigmas, device,
                               callback=lambda info: advance(1))
                yield from ((path, save_image, image, {"index": i, "seed": seed, "prompt": prompt,
                                                       "blur": spec_of(blur)})
                            for i, (image, path, seed) in enumerate(zip(batch, names(stem, blur), seeds)))
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
        write_run_json(out, command, record, device, status="complete", world_size=dist.world,
                       model={"kind": family.kind, "model": cfg.model}, height=height, width=width,
                       perturbed_layers=perturbed, pag_layers=identity, tracked_layers=tracked,
                       cost=cost_of(cfg, cfg.cfg, cfg.sampler, cfg.steps),
                       guided_steps=[i for i, g in enumerate(guided) if g],
                       blurs={spec_of(b): str(folders[spec_of(b)].relative_to(out)) for b in blurs}, images=files)

    with attention.installed(family.attention, state, perturbed, tracked, recorder, identity=identity,
                             factory=family.seg_processor), \
            attention.installed(guide[1], state, guide_perturbed, identity=guide_identity) \
            if guide_perturbed or guide_identity else contextlib.nullcontext():
        done = run_tasks(dist, tasks, draw, resume=resume, label=command, work=lambda task: cfg.steps * len(blurs),
                         finish=finish)
    return {"out": str(out), "images": sum(len(f) for f in files.values()), "blurs": len(blurs),
            "skipped": done.skipped, "main": dist.main}


GRID_MAX = 256  # images per blur column in grid.png


def spec_of(blur: Blur | None) -> str:
    """A blur's spec, or 'none' for the SEG-off run (seg_scale 0)."""
    return "none" if blur is None else blur.spec


