"""diffcli sample: draw images from a diffcli EDM checkpoint with any sampler, optional CFG and a denoising strip."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .common import (DiffcliError, PerSampleRandn, begin_output, load_images, pick_dtype, save_grid, save_image,
                     write_run_json)
from .dist import Dist
from .guidance import classifier_free
from .nets import load_model
from .sampling import SAMPLERS, get_sigmas_karras, nfe, run_sampler

SHIPPED_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "mnist-edm.safetensors"


@dataclass
class SampleConfig:
    checkpoint: str = str(SHIPPED_CHECKPOINT)
    n: int = 16
    labels: str | None = None
    cfg: float | None = None
    sampler: str = "heun"
    steps: int = 18
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    s_churn: float = 40.0
    s_tmin: float = 0.05
    s_tmax: float = 50.0
    s_noise: float = 1.003
    eta: float = 0.0
    seed: int = 0
    batch_size: int = 64
    dtype: str | None = None
    strip: bool = False
    nrow: int | None = None


def parse_labels(spec: str | None, num_classes: int, n: int) -> list[int] | None:
    """`0,3,7` or `all` -> the label of each of the n samples (cycled); None for unconditional models."""
    if num_classes == 0:
        if spec:
            raise DiffcliError("--labels given but the model is unconditional")
        return None
    if spec is None or spec.strip() == "all":
        base = list(range(num_classes))
    else:
        try:
            base = [int(t) for t in spec.split(",") if t.strip()]
        except ValueError:
            raise DiffcliError(f"--labels expects comma-separated integers or 'all', got {spec!r}") from None
        bad = [y for y in base if not 0 <= y < num_classes]
        if bad or not base:
            raise DiffcliError(f"labels {bad or spec!r} outside the model's classes 0..{num_classes - 1}")
    return [base[i % len(base)] for i in range(n)]


def validate(cfg: SampleConfig) -> None:
    if cfg.n < 1:
        raise DiffcliError("--n must be >= 1")
    if cfg.steps < 1:
        raise DiffcliError("--steps must be >= 1")
    if cfg.batch_size < 1:
        raise DiffcliError("--batch-size must be >= 1")
    if cfg.sampler not in SAMPLERS:
        raise DiffcliError(f"unknown sampler {cfg.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    for name in ("cfg", "s_churn", "s_noise", "eta", "rho"):
        v = getattr(cfg, name)
        if v is not None and (not math.isfinite(v) or v < 0):
            raise DiffcliError(f"--{name.replace('_', '-')} must be a finite number >= 0")
    if cfg.sigma_min is not None and cfg.sigma_max is not None and not 0 < cfg.sigma_min < cfg.sigma_max:
        raise DiffcliError("need 0 < --sigma-min < --sigma-max")


def check_against_model(cfg: SampleConfig, meta: dict[str, Any]) -> list[int] | None:
    """Labels and --cfg must fit the model's classes; returns each sample's label."""
    labels = parse_labels(cfg.labels, meta["num_classes"], cfg.n)
    if cfg.cfg is not None and meta["num_classes"] == 0:
        raise DiffcliError("--cfg needs a class-conditional model; this one is unconditional")
    return labels


def sample_batches(model, meta: dict[str, Any], cfg: SampleConfig, device: torch.device,
                   indices: Sequence[int] | None = None, on_step: Callable[[int], None] | None = None,
                   wrap: Callable | None = None) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """Yields (sample indices, images (B,C,H,W) in [-1,1], x0_hat strip or None) per batch of `cfg.batch_size`.

    Sample i uses seed cfg.seed + i for its initial and its per-step noise, so it does not depend on batching,
    on which other indices are drawn (resume, ranks) or on their order. The strip comes with the batch that
    holds index 0. `wrap` turns each batch's (CFG) denoiser into another one, e.g. particle guidance.
    """
    labels = check_against_model(cfg, meta)
    scale = 1.0 if cfg.cfg is None else cfg.cfg
    sigmas = get_sigmas_karras(cfg.steps, cfg.sigma_min or meta["sigma_min"], cfg.sigma_max or meta["sigma_max"],
                               cfg.rho, device=device)
    shape = (meta["channels"], meta["image_size"], meta["image_size"])
    indices = list(range(cfg.n)) if indices is None else list(indices)
    for start in range(0, len(indices), cfg.batch_size):
        idx = indices[start:start + cfg.batch_size]
        rng = PerSampleRandn([cfg.seed + i for i in idx], device)
        x = rng.randn(shape) * sigmas[0]
        if labels is None:
            denoiser = model
        else:
            y = torch.tensor([labels[i] for i in idx], device=device)
            denoiser = classifier_free(model, scale, {"class_labels": y},
                                       {"class_labels": torch.full_like(y, model.null_label)})
        if wrap is not None:
            denoiser = wrap(denoiser)
        frames: list[torch.Tensor] = []
        keep = cfg.strip and 0 in idx

        def callback(info: dict[str, Any]) -> None:
            if keep:
                frames.append(info["denoised"][:8].clamp(-1, 1).cpu())
            if on_step:
                on_step(len(idx))

        x = run_sampler(cfg.sampler, denoiser, x, sigmas, callback=callback, noise=rng, eta=cfg.eta,
                        s_churn=cfg.s_churn, s_tmin=cfg.s_tmin, s_tmax=cfg.s_tmax, s_noise=cfg.s_noise)
        images = x.clamp(-1, 1).cpu()
        # rows: samples; columns: x0_hat after each step, then the final image
        yield idx, images, (torch.stack(frames + [images[:8]], dim=1) if keep else None)


def sample_images(model, meta: dict[str, Any], cfg: SampleConfig, device: torch.device,
                  on_step: Callable[[int], None] | None = None, wrap: Callable | None = None,
                  ) -> tuple[torch.Tensor, list[int] | None, torch.Tensor | None]:
    """All n samples (N,C,H,W in [-1,1]) in memory, their labels, and the strip if asked."""
    images, strip = [], None
    for _, batch, batch_strip in sample_batches(model, meta, cfg, device, on_step=on_step, wrap=wrap):
        images.append(batch)
        strip = batch_strip if batch_strip is not None else strip
    return torch.cat(images), check_against_model(cfg, meta), strip


GRID_MAX = 256  # a grid of 50k FID samples helps nobody; the first 256 show the model


def run(cfg: SampleConfig, out: Path, overwrite: bool, device_name: str | None, options: dict[str, Any],
        resume: bool = False) -> dict:
    validate(cfg)
    dist = Dist(device_name)
    try:
        return _run(cfg, out, overwrite, resume, dist, options)
    finally:
        dist.close()


def _run(cfg: SampleConfig, out: Path, overwrite: bool, resume: bool, dist: Dist, options: dict[str, Any]) -> dict:
    """One rank's share of the samples (every world-th index); rank 0 writes the merged grid and run.json."""
    device = dist.device
    dtype = pick_dtype(cfg.dtype or "fp32", device)
    model, meta = load_model(cfg.checkpoint, device)
    model.net.to(dtype)
    labels = check_against_model(cfg, meta)  # fail before touching the output folder
    record = {**asdict(cfg), **options}
    names = sample_names(cfg.n, labels, cfg.seed)

    def begin() -> Path:
        folder = begin_output(out, overwrite, resume, record)
        if not (folder / "run.json").exists() or not resume:
            write_run_json(folder, "sample", record, device, status="running", model=meta)
        return folder

    dist.main_first(begin)
    pending = [i for i in range(cfg.n) if not (resume and (out / names[i]).is_file())]
    todo = dist.shard(pending)
    from rich.progress import Progress
    with Progress(transient=True, disable=not dist.main) as progress:
        task = progress.add_task("sampling", total=len(todo) * cfg.steps)
        for idx, images, strip in sample_batches(model, meta, cfg, device, todo,
                                                 on_step=lambda k: progress.advance(task, k)):
            for i, img in zip(idx, images):
                save_image(out / names[i], img)
            if strip is not None:
                save_grid(out / "strip.png", strip.flatten(0, 1), nrow=strip.shape[1])
    dist.barrier()
    if dist.main:
        nrow = cfg.nrow or (meta["num_classes"] if labels is not None and cfg.labels in (None, "all") else None)
        save_grid(out / "grid.png", load_images([out / f for f in names[:GRID_MAX]]), nrow=nrow)
        write_run_json(out, "sample", record, device, status="complete", model=meta, world_size=dist.world,
                       nfe_per_sample=nfe(cfg.sampler, cfg.steps) * (2 if cfg.cfg not in (None, 0.0, 1.0) else 1),
                       samples=samples_record(names, labels, cfg.seed))
    return {"out": str(out), "n": cfg.n, "skipped": cfg.n - len(pending), "main": dist.main}


def sample_names(n: int, labels: list[int] | None, seed: int) -> list[str]:
    """File name of sample i: index, seed and label, so a folder explains itself and --resume can skip it."""
    return [f"{i:05d}-seed{seed + i}" + (f"-label{labels[i]}" if labels is not None else "") + ".png"
            for i in range(n)]


def write_samples(out: Path, images: torch.Tensor, labels: list[int] | None, seed: int,
                  nrow: int | None = None) -> list[str]:
    """One PNG per sample named by index, seed and label, plus grid.png; returns the file names."""
    files = sample_names(len(images), labels, seed)
    for name, img in zip(files, images):
        save_image(out / name, img)
    save_grid(out / "grid.png", images[:GRID_MAX], nrow=nrow)
    return files


def samples_record(files: list[str], labels: list[int] | None, seed: int) -> list[dict[str, Any]]:
    """The run.json `samples` list `diffcli eval --digits` reads the labels from."""
    return [{"file": f, "seed": seed + i, "label": labels[i] if labels else None} for i, f in enumerate(files)]
