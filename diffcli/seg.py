"""diffcli seg: Smoothed Energy Guidance (Hong 2024) on Stable Diffusion 1.x/2.x and SDXL, with the 000 seed's blurs.

SEG is `guidance.smoothed_energy` over the pipeline's denoiser, run by our Euler (= DDIM) sampler on the
scheduler's sigmas; the blurs live in `query_blur.py`, the processor in `attention.py`. This module chooses the guided
steps (regions, sigma window), names and writes the outputs.
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import attention, pipelines
from .query_blur import Blur, parse_blur
from .common import (DiffcliError, PerSampleRandn, atomic_path, load_images, pick_dtype, progress_bar, safe_name,
                     save_grid, save_image, write_json, write_run_json)
from .dist import Dist
from .guidance import smoothed_energy
from .samplers import sample_euler

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_BLUR = "gaussian_-1_9999999"  # the official default: infinite blur
REGIONS = ("begin", "mid", "end")
METRIC_FIELDS = ("blur", "prompt", "step", "sigma", "layer", "role", "blurred", "l2", "laplacian_var", "edge_entropy")


@dataclass
class SegConfig:
    prompts: list[str]
    model: str = DEFAULT_MODEL
    seg_scale: float = 3.0
    guidance: float = 5.0
    blurs: list[str] = field(default_factory=lambda: [DEFAULT_BLUR])
    layers: list[str] = field(default_factory=lambda: ["mid"])
    regions: list[str] = field(default_factory=lambda: list(REGIONS))
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    steps: int = 50
    seed: int = 0
    n: int = 1
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    dtype: str | None = None
    metrics: bool = False
    track_block: str = "mid"


def split_list(values: list[str]) -> list[str]:
    """Repeated options and comma lists alike: ['down,up', 'mid'] -> ['down', 'up', 'mid'], order kept, no repeats."""
    return list(dict.fromkeys(v.strip() for value in values for v in value.split(",") if v.strip()))


def validate(cfg: SegConfig) -> list[Blur]:
    """Everything checkable before a model is loaded or a file written; returns the parsed blurs."""
    if not cfg.prompts or not all(p.strip() for p in cfg.prompts):
        raise DiffcliError('give a prompt (diffcli seg "a cat") or --prompts-file FILE')
    if cfg.steps < 1:
        raise DiffcliError(f"--steps must be >= 1, got {cfg.steps}")
    if cfg.n < 1:
        raise DiffcliError(f"--n must be >= 1, got {cfg.n}")
    for name in ("seg_scale", "guidance"):
        v = getattr(cfg, name)
        if not math.isfinite(v) or v < 0:
            raise DiffcliError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    regions = split_list(cfg.regions)
    if not regions or any(r not in REGIONS for r in regions):
        raise DiffcliError(f"--regions {','.join(cfg.regions)!r}: choose any of {','.join(REGIONS)} "
                           "(thirds of the steps, begin = noisiest)")
    if not 0 <= cfg.sigma_end <= cfg.sigma_start:
        raise DiffcliError(f"need 0 <= --sigma-end <= --sigma-start (got {cfg.sigma_end} and {cfg.sigma_start})")
    if not split_list(cfg.layers):
        raise DiffcliError("--layers needs at least one of down, mid, up or an indexed layer (d4, m0, u1)")
    for name in ("height", "width"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise DiffcliError(f"--{name} must be a positive number of pixels, got {v}")
    blurs = [parse_blur(spec) for spec in split_list(cfg.blurs)]
    if not blurs:
        raise DiffcliError(f"--blur needs a spec, e.g. {DEFAULT_BLUR}")
    return blurs


# ---------------------------------------------------------------- which steps are guided

def region(step: int, steps: int) -> str:
    """begin / mid / end third of the denoising steps (begin = noisiest)."""
    return REGIONS[min(2, 3 * step // steps)]


def guided_steps(sigmas: torch.Tensor, regions: list[str], sigma_start: float = math.inf,
                 sigma_end: float = 0.0) -> list[bool]:
    """Per step: does it run the perturbed pass? Inside the chosen regions AND the noise window [end, start]."""
    levels = sigmas[:-1].tolist()
    return [region(i, len(levels)) in regions and sigma_end <= s <= sigma_start for i, s in enumerate(levels)]


def step_index(sigmas: torch.Tensor, sigma: torch.Tensor | float) -> int:
    """The step whose noise level `sigma` is (the sampler passes the schedule's own values)."""
    s = float(torch.as_tensor(sigma).flatten()[0])
    levels = sigmas[:-1].tolist()
    return min(range(len(levels)), key=lambda i: abs(levels[i] - s))


def blur_schedule(blur: Blur, sigmas: torch.Tensor, guided: list[bool]) -> Callable[[torch.Tensor], Blur | None]:
    """sigma -> the blur of that step (EMA's alpha ramps over all the steps), or None on unguided steps."""
    last = max(len(guided) - 1, 1)

    def at(sigma: torch.Tensor) -> Blur | None:
        i = step_index(sigmas, sigma)
        return blur.at(i / last) if guided[i] else None

    return at


# ---------------------------------------------------------------- sampling

@torch.no_grad()
def sample(pipe, cond: dict[str, Any], uncond: dict[str, Any], seeds: list[int], cfg: SegConfig, blur: Blur,
           state: attention.SegState, sigmas: torch.Tensor, guided: list[bool], device: torch.device,
           callback=None) -> torch.Tensor:
    """One batch of images (N, 3, H, W) in [-1, 1] for one prompt's encodings; sample i starts from seeds[i]."""
    height, width = size(pipe, cfg)
    model = smoothed_energy(pipelines.denoiser(pipe), cfg.seg_scale, cfg.guidance, cond, uncond, state,
                            blur_schedule(blur, sigmas, guided))
    rng = PerSampleRandn(seeds, device)
    x = pipelines.initial_latents(rng, pipelines.latent_shape(pipe, height, width), sigmas[0])
    x = sample_euler(model, x, sigmas, callback=callback)
    return pipelines.decode(pipe, x, sigmas[-1])


def size(pipe, cfg: SegConfig) -> tuple[int, int]:
    default = pipelines.default_size(pipe)
    height, width = cfg.height or default, cfg.width or default
    pipelines.check_size(pipe, height, width)
    return height, width


def image_stems(prompts: list[str]) -> list[str]:
    """safe_name of each prompt; prompts that clean to the same name ('a/b', 'a b') get -2, -3 ... suffixes."""
    stems: list[str] = []
    for prompt in prompts:
        stem, k = safe_name(prompt), 2
        while stem in stems:
            stem, k = f"{safe_name(prompt)}-{k}", k + 1
        stems.append(stem)
    return stems


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
    with Dist(device_name) as dist:
        if cfg.metrics and (resume or dist.world > 1):
            raise DiffcliError("--metrics records one uninterrupted single-process run; drop --resume/torchrun or "
                               "--metrics")
        return _run(cfg, blurs, out, overwrite, resume, dist, options)


def _run(cfg: SegConfig, blurs: list[Blur], out: Path, overwrite: bool, resume: bool, dist: Dist,
         options: dict[str, Any]) -> dict[str, Any]:
    """Prompts are jobs: torchrun ranks take every world-th one, --resume skips those whose images all exist;
    rank 0 then reads the images back for the grid and writes run.json."""
    device = dist.device
    dtype = pick_dtype(cfg.dtype, device)
    pipe = pipelines.load_pipeline(cfg.model, device, dtype)
    if pipelines.family(pipe) == "if":
        raise DiffcliError(f"{cfg.model!r} is a pixel-space (DeepFloyd IF) pipeline; seg runs latent SD 1.x/2.x "
                           "and SDXL models")
    height, width = size(pipe, cfg)
    perturbed = attention.resolve_layers(pipe.unet, split_list(cfg.layers))
    tracked = attention.resolve_layers(pipe.unet, [cfg.track_block], "--track-block") if cfg.metrics else []
    record = {**asdict(cfg), **options, "sigma_start": None if math.isinf(cfg.sigma_start) else cfg.sigma_start}
    out = dist.begin(out, overwrite, resume, "seg", record)  # nothing is written before this line

    sigmas = pipelines.sigmas(pipe, cfg.steps, device)
    guided = guided_steps(sigmas, split_list(cfg.regions), cfg.sigma_start, cfg.sigma_end)
    seeds = [cfg.seed + i for i in range(cfg.n)]
    folders = {b.spec: out if len(blurs) == 1 else out / safe_name(b.spec) for b in blurs}
    jobs = list(zip(cfg.prompts, image_stems(cfg.prompts)))
    names = lambda stem, blur: [folders[blur.spec] / f"{stem}_seed{seed}.png" for seed in seeds]  # noqa: E731
    remaining = [j for j in jobs if not (resume and all(f.is_file() for b in blurs for f in names(j[1], b)))]
    mine = dist.shard(remaining)
    state, recorder = attention.SegState(), ([] if cfg.metrics else None)
    metrics: dict[str, list[dict[str, Any]]] = {b.spec: [] for b in blurs}
    with attention.installed(pipe.unet, state, perturbed, tracked, recorder), \
            progress_bar("seg", cfg.steps * len(blurs) * len(mine), disable=not dist.main) as advance:
        for prompt, stem in mine:
            cond, uncond = pipelines.encode_prompts(pipe, [prompt] * cfg.n, cfg.negative_prompt, height, width,
                                                    device)
            for blur in blurs:  # same prompt encodings and seeds for every blur
                batch = sample(pipe, cond, uncond, seeds, cfg, blur, state, sigmas, guided, device,
                               callback=lambda info: advance(1))
                for image, path in zip(batch, names(stem, blur)):
                    save_image(path, image)
                if recorder is not None:
                    metrics[blur.spec] += [{"blur": blur.spec, "prompt": prompt, "step": step_index(sigmas, r["sigma"]),
                                            **r} for r in recorder]
                    recorder.clear()
    dist.barrier()
    files = {b.spec: [str(f.relative_to(out)) for _, stem in jobs for f in names(stem, b)] for b in blurs}
    if dist.main:
        stacked = [load_images(out / f for f in files[b.spec][:GRID_MAX]) for b in blurs]
        if len(blurs) == 1:
            save_grid(out / "grid.png", stacked[0], nrow=cfg.n)
        else:  # side by side: one row per (prompt, seed), one column per blur
            save_grid(out / "grid.png", torch.stack(stacked, 1).flatten(0, 1), nrow=len(blurs))
        if cfg.metrics:
            for b in blurs:
                write_metrics(folders[b.spec], metrics[b.spec])
        write_run_json(out, "seg", record, device, status="complete", world_size=dist.world,
                       model={"kind": type(pipe).__name__, "model": cfg.model}, height=height, width=width,
                       perturbed_layers=perturbed, tracked_layers=tracked,
                       guided_steps=[i for i, g in enumerate(guided) if g],
                       blurs={b.spec: str(folders[b.spec].relative_to(out)) for b in blurs}, images=files)
    return {"out": str(out), "images": sum(len(f) for f in files.values()), "blurs": len(blurs),
            "skipped": len(jobs) - len(remaining), "main": dist.main}


GRID_MAX = 256  # images per blur column in grid.png
