"""diffcli pg: particle guidance (Corso et al. 2023), a batch sampled jointly with a repulsive kernel term.

PG is `guidance.particle_guidance` wrapped around the usual denoiser (CFG included), run by any sampler
of `diffcli.sampling`; this module only picks the kernel, the model family and the outputs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .common import (DiffcliError, PerSampleRandn, pick_device, pick_dtype, prepare_out_dir, save_grid,
                     write_json, write_run_json)
from .guidance import classifier_free, particle_guidance
from .particles import KERNELS, KernelGrad, classifier_features, feature_grad, rbf_grad
from .sampling import SAMPLERS, nfe, run_sampler


@dataclass
class PGConfig:
    checkpoint: str | None = None
    prompt: str | None = None
    model: str | None = None  # a Stable Diffusion pipeline (folder or hub id) instead of a diffcli checkpoint
    n: int = 8
    pg_factor: float = 1.7
    kernel: str = "rbf"
    pg_sigma_min: float = 0.0
    pg_sigma_max: float = math.inf
    labels: str | None = None
    cfg: float | None = None
    negative_prompt: str | None = None
    sampler: str = "heun"
    steps: int | None = None
    s_churn: float = 40.0
    s_tmin: float = 0.05
    s_tmax: float = 50.0
    s_noise: float = 1.003
    eta: float = 0.0
    seed: int = 0
    height: int | None = None
    width: int | None = None
    dtype: str | None = None
    classifier: str | None = None
    compare: bool = False


DEFAULT_STEPS = {"digits": 18, "pipeline": 50}
DEFAULT_CFG = {"digits": 1.0, "pipeline": 7.5}


def validate(cfg: PGConfig) -> None:
    """Everything checkable before a model is loaded or a file written."""
    if cfg.model is None and cfg.prompt is not None:
        raise DiffcliError("a prompt needs --model (a Stable Diffusion pipeline folder or hub id)")
    if cfg.model is not None and not cfg.prompt:
        raise DiffcliError("--model needs a prompt: diffcli pg \"a photo of a dog\" --model PATH")
    if cfg.model is not None and cfg.checkpoint is not None:
        raise DiffcliError("--checkpoint (a diffcli model) and --model (a pipeline) exclude each other")
    if not math.isfinite(cfg.pg_factor) or cfg.pg_factor < 0:
        raise DiffcliError(f"--pg-factor must be a finite number >= 0 (0 = plain sampling), got {cfg.pg_factor}")
    if cfg.n < 2 and (cfg.pg_factor > 0 or cfg.compare):
        raise DiffcliError(f"PG needs a batch: particles repel each other, so --n must be >= 2 (got {cfg.n})")
    if cfg.n < 1:
        raise DiffcliError("--n must be >= 1")
    if cfg.kernel not in KERNELS:
        raise DiffcliError(f"unknown kernel {cfg.kernel!r}; choose one of {', '.join(KERNELS)}")
    if cfg.model is not None and cfg.kernel != "rbf":
        raise DiffcliError(f"--kernel {cfg.kernel} is for digit models; pipelines use rbf (on the latent)")
    if cfg.model is not None and cfg.labels is not None:
        raise DiffcliError("--labels is for class-conditional diffcli models; a pipeline takes a prompt")
    if cfg.sampler not in SAMPLERS:
        raise DiffcliError(f"unknown sampler {cfg.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if cfg.steps is not None and cfg.steps < 1:
        raise DiffcliError("--steps must be >= 1")
    if not 0 <= cfg.pg_sigma_min <= cfg.pg_sigma_max:
        raise DiffcliError("need 0 <= --pg-sigma-min <= --pg-sigma-max")
    for name in ("cfg", "s_churn", "s_noise", "eta"):
        v = getattr(cfg, name)
        if v is not None and (not math.isfinite(v) or v < 0):
            raise DiffcliError(f"--{name.replace('_', '-')} must be a finite number >= 0")
    for name in ("height", "width"):
        v = getattr(cfg, name)
        if v is not None and (v < 8 or v % 8):
            raise DiffcliError(f"--{name} must be a positive multiple of 8")


def family(cfg: PGConfig) -> str:
    return "pipeline" if cfg.model is not None else "digits"


# ---------------------------------------------------------------- the guided denoiser

def make_kernel(name: str, classifier: torch.nn.Module | None = None) -> tuple[KernelGrad, bool]:
    """(kernel gradient, whether it reads x0_hat). rbf reads the sample x itself (pixels or latent)."""
    if name == "rbf":
        return rbf_grad, False
    if classifier is None:
        raise DiffcliError("--kernel classifier needs the digit classifier")
    return feature_grad(classifier_features(classifier)), True


def guided(denoiser, cfg: PGConfig, factor: float, kernel: tuple[KernelGrad, bool]):
    grad, on_denoised = kernel
    return particle_guidance(denoiser, factor, grad, cfg.pg_sigma_min, cfg.pg_sigma_max, on_denoised=on_denoised)


# ---------------------------------------------------------------- digit models

def digit_scale(cfg: PGConfig, meta: dict[str, Any]) -> float | None:
    """CFG scale for `diffcli sample`'s path: no --labels on a conditional model = the unconditional pass
    (scale 0, the null label), the setting where PG's extra modes show."""
    if cfg.labels is None:
        if cfg.cfg is not None:
            raise DiffcliError("--cfg needs --labels on a class-conditional model (no labels = unconditional)")
        return 0.0 if meta["num_classes"] else None
    return DEFAULT_CFG["digits"] if cfg.cfg is None else cfg.cfg


def sample_digits(model, meta: dict[str, Any], cfg: PGConfig, factor: float, kernel: tuple[KernelGrad, bool],
                  device: torch.device, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """All n samples as ONE batch (the particle set), (N, C, H, W) in [-1, 1]; sample i uses seed + i.

    This is `diffcli sample`'s path with the batch's denoiser wrapped in PG.
    """
    from .sample import SampleConfig, sample_images
    scfg = SampleConfig(n=cfg.n, labels=cfg.labels, cfg=digit_scale(cfg, meta), sampler=cfg.sampler,
                        steps=cfg.steps or DEFAULT_STEPS["digits"], s_churn=cfg.s_churn, s_tmin=cfg.s_tmin,
                        s_tmax=cfg.s_tmax, s_noise=cfg.s_noise, eta=cfg.eta, seed=cfg.seed, batch_size=cfg.n)
    images, _, _ = sample_images(model, meta, scfg, device, on_step=on_step,
                                 wrap=lambda denoiser: guided(denoiser, cfg, factor, kernel))
    return images


def digit_metrics(files: list[str], labels: list[int] | None, classifier, device: torch.device) -> dict[str, Any]:
    """The numbers `diffcli eval --digits` reports, read back from the written PNGs."""
    from .eval import classify, digit_record, load_digits
    logits, feats = classify(classifier, load_digits(files), 64, device)
    return digit_record(logits, feats, labels)


# ---------------------------------------------------------------- Stable Diffusion pipelines

@torch.no_grad()
def sample_pipeline(pipe, cfg: PGConfig, factor: float, device: torch.device,
                    on_step: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N,3,H,W) in [-1,1], final latents): DDIM sigmas, CFG, PG on the latent, VAE decode."""
    from . import pipelines
    from .denoisers import ve_to_vp
    sigmas = pipelines.sigmas(pipe, cfg.steps or DEFAULT_STEPS["pipeline"], device)
    height, width = pipeline_size(pipe, cfg)
    cond, uncond = pipelines.encode_prompts(pipe, [cfg.prompt] * cfg.n, cfg.negative_prompt, height, width, device)
    denoiser = classifier_free(pipelines.denoiser(pipe), DEFAULT_CFG["pipeline"] if cfg.cfg is None else cfg.cfg,
                               cond, uncond)
    rng = PerSampleRandn([cfg.seed + i for i in range(cfg.n)], device)
    x = pipelines.initial_latents(rng, pipelines.latent_shape(pipe, height, width), sigmas[0])
    x = run_sampler(cfg.sampler, guided(denoiser, cfg, factor, make_kernel("rbf")), x, sigmas,
                    callback=(lambda info: on_step(1)) if on_step else None, noise=rng, eta=cfg.eta,
                    s_churn=cfg.s_churn, s_tmin=cfg.s_tmin, s_tmax=cfg.s_tmax, s_noise=cfg.s_noise)
    return pipelines.decode(pipe, x, sigmas[-1]), ve_to_vp(x, sigmas[-1]).float().cpu()


def pipeline_size(pipe, cfg: PGConfig) -> tuple[int, int]:
    from . import pipelines
    size = pipelines.default_size(pipe)
    height, width = cfg.height or size, cfg.width or size
    pipelines.check_size(pipe, height, width)
    return height, width


def latent_metrics(latents: torch.Tensor) -> dict[str, Any]:
    """Diversity of a pipeline batch in its latent space (no class judge there)."""
    from .eval import mean_pairwise_cosine
    flat = latents.flatten(1).double()
    return {"n": len(flat), "mean_similarity": float(mean_pairwise_cosine(flat)),
            "mean_pairwise_distance": float(torch.pdist(flat).mean())}


# ---------------------------------------------------------------- outputs

def metric_lines(plain: dict[str, Any], pg: dict[str, Any], factor: float) -> list[str]:
    rows = [("modes discovered", "modes_discovered", "{}"), ("mean in-batch similarity", "mean_similarity", "{:.4f}"),
            ("mean pairwise latent distance", "mean_pairwise_distance", "{:.3f}"), ("class accuracy", "accuracy", "{:.3f}")]
    lines = [f"{'':32s}{'plain':>10s}{f'pg {factor:g}':>10s}"]
    for title, key, fmt in rows:
        if plain.get(key) is not None:
            lines.append(f"{title:32s}{fmt.format(plain[key]):>10s}{fmt.format(pg[key]):>10s}")
    return lines


# ---------------------------------------------------------------- the command

def run(cfg: PGConfig, out: Path, overwrite: bool, device_name: str | None, options: dict[str, Any]) -> dict[str, Any]:
    validate(cfg)
    device = pick_device(device_name)
    dtype = pick_dtype(cfg.dtype or "fp32", device)
    kind = family(cfg)
    classifier = None
    if kind == "pipeline":
        from .pipelines import load_pipeline
        pipe = load_pipeline(cfg.model, device, dtype)
        pipeline_size(pipe, cfg)  # fail before touching the output folder
        labels, meta = None, {"kind": type(pipe).__name__, "model": cfg.model}
        draw = lambda factor, step: sample_pipeline(pipe, cfg, factor, device, step)
        nfe_each = nfe(cfg.sampler, cfg.steps or DEFAULT_STEPS["pipeline"])
    else:
        from .nets import load_model
        from .sample import SHIPPED_CHECKPOINT, parse_labels
        model, meta = load_model(cfg.checkpoint or SHIPPED_CHECKPOINT, device)
        model.net.to(dtype)
        digit_scale(cfg, meta)
        labels = None if cfg.labels is None else parse_labels(cfg.labels, meta["num_classes"], cfg.n)
        if cfg.kernel == "classifier" or cfg.compare:
            from .classifier import SHIPPED_CLASSIFIER, load_classifier
            classifier = load_classifier(cfg.classifier or SHIPPED_CLASSIFIER, device)
        kernel = make_kernel(cfg.kernel, classifier)
        draw = lambda factor, step: (sample_digits(model, meta, cfg, factor, kernel, device, step), None)
        nfe_each = nfe(cfg.sampler, cfg.steps or DEFAULT_STEPS["digits"])
    out = prepare_out_dir(out, overwrite)

    from .eval import progress_bar
    from .sample import samples_record, write_samples
    steps = cfg.steps or DEFAULT_STEPS[kind]
    runs = [("plain", 0.0)] if cfg.compare else []
    results: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    with progress_bar("sampling", steps * (len(runs) + 1)) as advance:
        for name, factor in runs + [("pg", cfg.pg_factor)]:
            results[name] = draw(factor, lambda k: advance(1))

    record = {**asdict(cfg), **options, "pg_sigma_max": None if math.isinf(cfg.pg_sigma_max) else cfg.pg_sigma_max}
    folders = {"pg": out, "plain": out / "plain"}
    metrics: dict[str, dict[str, Any]] = {}
    for name, (images, latents) in results.items():
        folder = folders[name]
        folder.mkdir(exist_ok=True)
        files = write_samples(folder, images, labels, cfg.seed)
        factor = cfg.pg_factor if name == "pg" else 0.0
        write_run_json(folder, "pg", {**record, "pg_factor": factor}, device, model=meta,
                       nfe_per_sample=nfe_each * (2 if cfg.cfg not in (None, 0.0, 1.0) else 1),
                       samples=samples_record(files, labels, cfg.seed))
        if cfg.compare:
            metrics[name] = (latent_metrics(latents) if latents is not None
                             else digit_metrics([str(folder / f) for f in files], labels, classifier, device))
    result: dict[str, Any] = {"out": str(out), "n": cfg.n, "lines": []}
    if cfg.compare:
        # one picture: the plain batch on top, the same seeds with PG below
        save_grid(out / "compare.png", torch.cat([results["plain"][0], results["pg"][0]]), nrow=cfg.n)
        write_json(out / "compare.json", {"pg_factor": cfg.pg_factor, "kernel": cfg.kernel, "seed": cfg.seed,
                                          "n": cfg.n, "plain": metrics["plain"], "pg": metrics["pg"]})
        result["lines"] = metric_lines(metrics["plain"], metrics["pg"], cfg.pg_factor)
    return result
