"""diffcli pg: particle guidance (Corso et al. 2023), a batch sampled jointly with a repulsive kernel term.

PG is `guidance.particle_guidance` wrapped around the usual denoiser (CFG included), run by any sampler
of `diffcli.core.samplers`; this module only picks the kernel, the model family and the outputs.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .shared.errors import DiffcliError
from .shared.devices import PerSampleRandn, pick_dtype
from .shared.dist import Dist
from .shared.files import write_json
from .shared.tasks import Done, Task, run_tasks
from .shared.records import write_run_json
from .shared.checkpoints import load_checkpoint, save_checkpoint
from .shared.images import save_figure, save_grid, save_image
from .shared.shipped import SHIPPED_MODEL
from .backends import pipelines
from .data import sequences as sq
from .backends.classifier import SHIPPED_CLASSIFIER, classify, load_classifier, load_digits
from .core.denoisers import ve_to_vp
from .core.metrics import digit_record, mean_pairwise_cosine, pca_2d
from .shared.limits import BATCH_MAX, SIDE_MAX, check_image_size, seed as check_seed
from .shared.fields import check_fields, opt, redefault
from .runner import Command, RunContext, generating
from .options import (FlowOptions, GuidanceOptions, SamplingOptions, apply_flow_options, default_cfg,
                      check_guidance, check_particles, check_pipeline_steps, check_sampling, cost_of, group_fields, guidance_of, pipeline_guide, record as options_record, seg_layers)
from .core.particles import KernelGrad
from .drawing import (GRID_MAX, DrawOptions, digit_kernel, load_guide, model_contexts, parse_labels, sample_images,
                      sample_names, samples_record, sequence_pictures)
from .core.samplers import nfe, nfe_record, run_sampler


@dataclass(kw_only=True)
class PGConfig(GuidanceOptions, SamplingOptions, FlowOptions):
    checkpoint: str | None = opt(None, panel="input", cli_type=Optional[Path], to_config=lambda v: None if v is None else str(v),
                                 help="A diffcli model file, a run folder (its latest model), or RUN@STEP (a snapshot "
                                      "of --snapshot-every); default: the shipped MNIST model.")
    prompt: str | None = opt(None, argument=True, panel="input",
                             help="Text prompt; with --model, sample a Stable Diffusion pipeline instead of a digit "
                                  "model.")
    # a Stable Diffusion pipeline (folder or hub id) instead of a diffcli checkpoint
    model: str | None = opt(None, "--model", panel="model",
                            help="SD 1.x/2.x, SDXL, SD3 or Flux pipeline: a local folder (save_pretrained layout) or a hub id in "
                                 "the cache.")
    n: int = opt(8, "--n", panel="sampling", check="count", high=BATCH_MAX,  # the particles are one network batch
                 help="Batch size = number of particles sampled jointly (>= 2 with PG on).")
    pg_factor: float = redefault(GuidanceOptions, "pg_factor", 1.7)
    labels: str | None = opt(None, panel="input",
                             help="Class of each sample, cycled: '0,3,7' or 'all' (default: unconditional).")
    negative_prompt: str | None = opt(None, "--negative-prompt", panel="input",
                                      help="Pipelines: the prompt of the unconditional CFG branch (default: empty).")
    sampler: str | None = redefault(SamplingOptions, "sampler", "heun")
    steps: int | None = redefault(SamplingOptions, "steps", None)   # 18 for digits, 50 for pipelines
    seed: int = opt(0, panel="sampling", check="seed", per="n",
                    help="Sample i uses seed + i (initial noise and sampler noise).")
    height: int | None = opt(None, panel="sampling", check="count", high=SIDE_MAX,
                             help="Pipelines: image height (default: the UNet's sample size x 8).")
    width: int | None = opt(None, panel="sampling", check="count", high=SIDE_MAX, help="Pipelines: image width.")
    dtype: str | None = opt(None, panel="model", help="Network precision: fp32 (default), fp16 or bf16 (GPU).")
    classifier: str | None = opt(None, "--classifier", panel="model",
                                 help="Digit classifier for --kernel classifier and --compare (default: the shipped "
                                      "one).")
    compare: bool = opt(False, "--compare", panel="output",
                        help="Also sample the same seeds without PG (in OUT/plain) and report diversity side by side: "
                             "compare.png, compare.json.")
    # --kernel clip (pipelines): open_clip model and weights, as diffcli eval
    clip_model: str = opt("ViT-B-32", "--clip-model", panel="model",
                          help="Pipelines, --kernel clip: open_clip model name or a JSON model config file (as "
                               "diffcli eval).")
    clip_pretrained: str = opt("openai", "--clip-pretrained", panel="model",
                               help="Pipelines, --kernel clip: open_clip pretrained tag or a local weights file "
                                    "(safetensors or a state dict).")
    # next-frame models: dataset indices (3, 0,4,7 or 0:10) or a context file
    context: str | None = opt(None, "--context", panel="input",
                              help="Next-frame models: sequences of the model's dataset to continue, one particle set "
                                   "of --n each: an index (3), a list (0,4,7) or a range (0:10); or one context file "
                                   "(PNG of the frames side by side, .pt/.safetensors). --compare then reports modes "
                                   "found, L2/IoU to the nearest true future and directional accuracy.")
    data_root: str | None = opt(None, "--data-root", panel="input",
                                help="With --context indices: where the model's MNIST digits are (default: the digits "
                                     "its model file carries, else the folder recorded at training).")


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
    check_fields(cfg, ["n", "seed", "height", "width"])
    check_sampling(cfg, pipeline=cfg.model is not None)
    check_guidance(cfg)
    check_particles(cfg, cfg.n, pipeline=cfg.model is not None)
    if cfg.n < 2 and cfg.compare:
        raise DiffcliError(f"--compare measures diversity in a batch, so --n must be >= 2 (got {cfg.n})")
    if cfg.n < 1:
        raise DiffcliError("--n must be >= 1")
    if cfg.model is not None and cfg.context is not None:
        raise DiffcliError("--context is for next-frame diffcli models (--checkpoint), not pipelines")
    if cfg.model is not None and cfg.labels is not None:
        raise DiffcliError("--labels is for class-conditional diffcli models; a pipeline takes a prompt")
    for name in ("height", "width"):
        v = getattr(cfg, name)
        if v is not None and (v < 8 or v % 8):
            raise DiffcliError(f"--{name} must be a positive multiple of 8")
    if cfg.height is not None or cfg.width is not None:
        check_image_size(cfg.height or cfg.width, cfg.width or cfg.height)


def family(cfg: PGConfig) -> str:
    return "pipeline" if cfg.model is not None else "digits"


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
                  device: torch.device, on_step: Callable[[int], None] | None = None,
                  context: torch.Tensor | None = None, seed_offset: int = 0) -> torch.Tensor:
    """All n samples as ONE batch (the particle set), (N, C, H, W) in [-1, 1]; sample i uses seed + seed_offset + i.

    This is `diffcli sample`'s path with the batch's denoiser wrapped in PG. A next-frame model's particles
    share one `context` (C_ctx, H, W), so PG spreads them over that context's futures.
    """
    shared = {name: getattr(cfg, name) for name in group_fields(GuidanceOptions, SamplingOptions)}
    scfg = DrawOptions(**{**shared, "cfg": digit_scale(cfg, meta), "pg_factor": factor,
                          "steps": cfg.steps or DEFAULT_STEPS["digits"]},
                       n=cfg.n, labels=cfg.labels, seed=cfg.seed + seed_offset, batch_size=cfg.n)
    images, _, _ = sample_images(model, meta, scfg, device, on_step=on_step, kernel=kernel, context=context)
    return images


def digit_metrics(files: list[str], labels: list[int] | None, classifier,
                  device: torch.device) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """The numbers `diffcli eval --digits` reports, read back from the written PNGs; with the classifier's
    features and predicted classes (for the embedding plot)."""
    logits, feats = classify(classifier, load_digits(files), 64, device)
    return digit_record(logits, feats, labels), feats, logits.argmax(1)


def plot_embedding(path: Path, feats: dict[str, torch.Tensor], classes: dict[str, torch.Tensor] | None,
                   n: int, what: str) -> bool:
    """embedding.png: every sample's features projected to 2-D (PCA over all sets together), a panel a set (plain,
    PG), the particles of one batch joined to their mean, colours the predicted class where there is one."""
    try:  # deferred: matplotlib is slow to import and only pictures need it
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(feats)
    points = pca_2d(torch.cat([feats[k] for k in names])).split([len(feats[k]) for k in names])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), sharex=True, sharey=True)
    for ax, name, pts in zip(axes if len(names) > 1 else [axes], names, points):
        colour = classes[name].numpy() if classes else "tab:blue"
        for batch in pts.split(n):
            centre = batch.mean(0)
            for p in batch:
                ax.plot([centre[0], p[0]], [centre[1], p[1]], lw=0.4, c="0.75", zorder=1)
        sc = ax.scatter(pts[:, 0], pts[:, 1], c=colour, cmap="tab10", vmin=-0.5, vmax=9.5, s=22, zorder=2)
        ax.set_title(f"{name} ({len(pts)} samples, batches of {n})", fontsize=9)
        ax.set_xlabel(f"PC 1 of the {what}")
    (axes[0] if len(names) > 1 else axes).set_ylabel("PC 2")
    if classes:
        fig.colorbar(sc, ax=axes, ticks=range(10), label="predicted class", fraction=0.03)
    save_figure(path, fig, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- Stable Diffusion pipelines

@torch.no_grad()
def sample_pipeline(pipe, cfg: PGConfig, factor: float, device: torch.device,
                    on_step: Callable[[int], None] | None = None,
                    kernel: tuple[KernelGrad, bool] | None = None,
                    guide: tuple[Any, torch.nn.Module] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N,3,H,W) in [-1,1], final latents): the pipeline's sigmas (or Karras), the guidance stack (CFG, SEG
    with --blur, PG on the latent), any sampler, VAE decode."""
    family = pipelines.pipeline_family(pipe)
    sigmas = family.sigmas(cfg.steps or DEFAULT_STEPS["pipeline"], device, cfg.schedule or "scheduler")
    height, width = pipeline_size(family, cfg)
    cond, uncond = family.encode_prompts([cfg.prompt] * cfg.n, cfg.negative_prompt, height, width, device)
    opts = replace(cfg, pg_factor=factor)
    guidance = guidance_of(opts, default_cfg(family, cfg.cfg, DEFAULT_CFG["pipeline"]), kernel=kernel,
                           sigma_data=family.sigma_data, guide=guide)
    denoiser = guidance.denoiser(family.denoiser(), cond, uncond, sigmas)
    rng = PerSampleRandn([cfg.seed + i for i in range(cfg.n)], device)
    x = family.initial_latents(rng, family.latent_shape(height, width), sigmas[0])
    with guidance.installed(family.attention):
        x = run_sampler(cfg.sampler, denoiser, x, sigmas, callback=(lambda info: on_step(1)) if on_step else None,
                        noise=rng, **cfg.knobs())
    return family.decode(x, sigmas[-1]), ve_to_vp(x, sigmas[-1]).float().cpu()


def pipeline_size(pipe, cfg: PGConfig) -> tuple[int, int]:
    family = pipelines.pipeline_family(pipe)
    size = family.native_size()
    height, width = cfg.height or size, cfg.width or size
    family.check_size(height, width, ("--height", "--width"))
    return height, width


def latent_metrics(latents: torch.Tensor) -> dict[str, Any]:
    """Diversity of a pipeline batch in its latent space (no class judge there)."""
    flat = latents.flatten(1).double()
    return {"n": len(flat), "mean_similarity": float(mean_pairwise_cosine(flat)),
            "mean_pairwise_distance": float(torch.pdist(flat).mean())}


# ---------------------------------------------------------------- outputs

def sequence_compare_metrics(seq: dict[str, Any], images: torch.Tensor, n: int) -> dict[str, Any]:
    """Means over contexts of the 001 metrics (where the truth is known) and the samples' spread."""
    spread = [sq.pairwise_rmse(sq.ink(x)) for x in images.split(n)]
    return {**seq.get("metrics", {}), "pairwise_rmse": sum(spread) / len(spread), "per_context": seq.get("per_context")}


def sequence_compare_pictures(out: Path, contexts: list, plain: torch.Tensor, pg: torch.Tensor, cfg: PGConfig,
                              meta: dict[str, Any]) -> None:
    """compare.png: per context a plain row then a PG row (context | samples | true futures);
    landing-compare.png: where the digits moved, plain | PG; landing-scatter.png too with matplotlib."""
    rows = [sq.context_row(c, x) for c, a, b in zip(contexts, plain.split(cfg.n), pg.split(cfg.n)) for x in (a, b)]
    save_image(out / "compare.png", sq.strip(rows))
    known = [c for c in contexts if c.item is not None]
    if not known:
        return
    shifts = known[0].item.shifts
    # one map for the contexts that share the first one's futures (all of them, except for moving-mnist)
    same = [i for i, c in enumerate(contexts) if c.item is not None and torch.equal(c.item.shifts, shifts)]
    moved = {name: torch.cat([sq.moved_by(x.split(cfg.n)[i], contexts[i].item) for i in same])
             for name, x in (("plain", plain), (f"pg {cfg.pg_factor:g}", pg))}
    radius = sq.landing_radius(meta)
    maps = [sq.landing_map(m, shifts, radius) for m in moved.values()]
    save_image(out / "landing-compare.png", sq.strip([[m[None] for m in maps]], gap=8))
    sq.plot_landing(out / "landing-scatter.png", moved, shifts)


def metric_lines(plain: dict[str, Any], pg: dict[str, Any], factor: float) -> list[str]:
    rows = [("modes discovered", "modes_discovered", "{}"), ("mean in-batch similarity", "mean_similarity", "{:.4f}"),
            ("mean pairwise latent distance", "mean_pairwise_distance", "{:.3f}"), ("class accuracy", "accuracy", "{:.3f}"),
            # next-frame models (mean over contexts; see diffcli.data.sequences.sequence_metrics)
            ("true futures per context", "modes_possible", "{:.0f}"), ("modes found", "modes_found", "{:.2f}"),
            ("contexts with all futures found", "all_modes_found", "{:.2f}"),
            ("directional accuracy", "directional_accuracy", "{:.3f}"), ("L2 to nearest true future", "l2", "{:.4f}"),
            ("IoU with nearest true future", "iou", "{:.3f}"), ("mean pairwise RMSE", "pairwise_rmse", "{:.4f}")]
    lines = [f"{'':32s}{'plain':>10s}{f'pg {factor:g}':>10s}"]
    for title, key, fmt in rows:
        if plain.get(key) is not None:
            lines.append(f"{title:32s}{fmt.format(plain[key]):>10s}{fmt.format(pg[key]):>10s}")
    return lines


# ---------------------------------------------------------------- the command

def write_samples(out: Path, images: torch.Tensor, labels: list[int] | None, seed: int,
                  nrow: int | None = None) -> list[str]:
    """One PNG per sample named by index, seed and label (`drawing.sample_names`), plus grid.png; returns the file
    names."""
    files = sample_names(len(images), labels, seed)
    for i, (name, img) in enumerate(zip(files, images)):
        save_image(out / name, img, {"index": i, "seed": seed + i, "label": None if labels is None else labels[i]})
    save_grid(out / "grid.png", images[:GRID_MAX], nrow=nrow)
    return files

SETS = ".pg-sets"  # each finished particle set as a tensor file, so that --resume redraws only the missing ones


def run(cfg: PGConfig, out: Path, overwrite: bool, device_name: str | None, options: dict[str, Any],
        resume: bool = False) -> dict[str, Any]:
    validate(cfg)
    with Dist(device_name) as dist:
        return _run(cfg, out, overwrite, resume, dist, options)


def _run(cfg: PGConfig, out: Path, overwrite: bool, resume: bool, dist: Dist, options: dict[str, Any]) -> dict[str, Any]:
    """The particle sets (one per context, plain and PG) are tasks: torchrun ranks draw every world-th one, --resume
    keeps those drawn (their tensors in SETS); rank 0 then writes every output from the sets."""
    device = dist.device
    dtype = pick_dtype(cfg.dtype or "fp32", device)
    kind = family(cfg)
    classifier, contexts = None, None
    if kind == "pipeline":
        if cfg.dtype is None and pipelines.is_flow(cfg.model):  # SD3/Flux: bf16 on CUDA (fp16 overflows)
            dtype = pipelines.pipeline_dtype(None, device, cfg.model) if device.type == "cuda" else dtype
        pipe = pipelines.load_family(cfg.model, device, dtype, offload=cfg.offload)
        apply_flow_options(pipe, cfg)
        height, width = pipeline_size(pipe, cfg)  # fail before touching the output folder
        check_pipeline_steps(pipe.pipe, cfg.steps or DEFAULT_STEPS["pipeline"], cfg.schedule)
        pipe.check_memory(cfg.n, height, width, dtype, device, "the particles (one network batch)", "lower --n")
        seg_layers(pipe.attention, cfg, "--layers")
        guide = pipeline_guide(cfg, pipe, device, dtype)
        if guide is not None:
            seg_layers(guide[1], cfg, "--layers")
        labels, meta = None, {"kind": pipe.kind, "model": cfg.model}
        image_features = None
        if cfg.kernel == "clip" and cfg.pg_factor:
            from .backends.clip_model import image_features_fn, load_clip
            image_features = image_features_fn(load_clip(cfg.clip_model, cfg.clip_pretrained, device))
        kernel = pipelines.pipeline_kernel(pipe, cfg, image_features)
        draw = lambda factor, j, step: sample_pipeline(pipe, cfg, factor, device, step, kernel, guide)
        nfe_each = (cfg.sampler, cfg.steps or DEFAULT_STEPS["pipeline"])
        shape = (cfg.n, 3, height, width)
    else:
        ours = pipelines.load_family(cfg.checkpoint or SHIPPED_MODEL, device, dtype, checkpoint=True)
        model, meta = ours.model, ours.meta
        digit_scale(cfg, meta)
        seg_layers(ours.attention, cfg, "--layers")
        guide = load_guide(cfg, meta, device, dtype)  # the digit path loads it again (cached): checked here, early
        if guide is not None:
            seg_layers(guide[1], cfg, "--layers")
        labels = None if cfg.labels is None else parse_labels(cfg.labels, meta["num_classes"], cfg.n)
        contexts = model_contexts(cfg, meta, many=True)
        check_seed("seed", cfg.seed, cfg.n * len(contexts or [None]))
        ours.check_memory(cfg.n, meta["image_size"], meta["image_size"], dtype, device,
                          "the particles (one network batch)", "lower --n")
        if cfg.compare and not contexts:
            classifier = load_classifier(cfg.classifier or SHIPPED_CLASSIFIER, device)
        kernel = digit_kernel(cfg, device, cfg.classifier, meta)
        # next-frame models: one particle set per context, seeds running on across them
        draw = lambda factor, j, step: (sample_digits(model, meta, cfg, factor, kernel, device, step,
                                                      contexts[j].frames if contexts else None, j * cfg.n), None)
        nfe_each = (cfg.sampler, cfg.steps or DEFAULT_STEPS["digits"])
        shape = (cfg.n, meta["channels"], meta["image_size"], meta["image_size"])
    record = {**options_record(cfg), **options}
    dist.begin(out, overwrite, resume, "pg", record)  # --resume: the same options as the run in `out`

    steps = cfg.steps or DEFAULT_STEPS[kind]
    runs = [("plain", 0.0)] if cfg.compare else []
    folders = {"pg": out, "plain": out / "plain"}
    count = len(contexts or [None])
    tasks = [Task((name, factor, j), (folders[name] / SETS / f"{j:05d}.safetensors",))
            for name, factor in runs + [("pg", cfg.pg_factor)] for j in range(count)]

    def draw_sets(mine: list[Task], advance) -> Iterator[tuple]:
        for task in mine:
            (name, factor, j), (path,) = task.item, task.files
            images, latents = draw(factor, j, lambda k: advance(1))
            yield path, save_checkpoint, {"images": images, **({"latents": latents} if latents is not None else {})}, \
                {"pg_set": {"name": name, "index": j}}

    if resume:
        keep_drawn_sets(tasks, shape, latents=kind == "pipeline")
    done = run_tasks(dist, tasks, draw_sets, resume=resume, label="sampling", work=lambda task: steps)
    if not done.main:
        return {"out": str(out), "n": cfg.n * count, "lines": [], "main": False}
    return write_outputs(cfg, done, out, folders, labels, contexts, meta, classifier, record, dist, nfe_each)


def run_scale(cfg: PGConfig, meta: dict[str, Any]) -> float:
    """The CFG scale a set ran at (for its cost record): a digit model's `digit_scale`, a pipeline's default 7.5."""
    if "num_classes" in meta:
        return digit_scale(cfg, meta) or 0.0 if meta["num_classes"] else 1.0
    return DEFAULT_CFG["pipeline"] if cfg.cfg is None else cfg.cfg


def keep_drawn_sets(tasks: list[Task], shape: tuple[int, ...], latents: bool) -> None:
    """--resume: a particle-set file on disk is kept only if it is the one this run draws there: a readable diffcli
    tensor file naming this set, its `images` of the run's shape (`shape`: N, C, H, W), finite, with `latents` (N
    rows) exactly for pipelines. Any other (truncated, another run's, edited) is removed and drawn again, so the
    resumed folder equals the uninterrupted run's. A folder or link in its place is refused."""
    for task in tasks:
        (name, _, j), (path,) = task.item, task.files
        if not os.path.lexists(path):
            continue
        if path.is_symlink() or not path.is_file():
            raise DiffcliError(f"--resume: {path} is not a particle-set file of this run; remove it and resume")
        try:
            tensors, set_meta = load_checkpoint(path)
        except DiffcliError:
            tensors, set_meta = {}, {}
        images, lat = tensors.get("images"), tensors.get("latents")
        good = (set_meta.get("pg_set") == {"name": name, "index": j} and isinstance(images, torch.Tensor)
                and tuple(images.shape) == tuple(shape) and images.is_floating_point()
                and bool(torch.isfinite(images).all()) and (lat is not None) == latents
                and (lat is None or (lat.ndim >= 2 and lat.shape[0] == shape[0] and lat.is_floating_point()))
                and set(tensors) <= {"images", "latents"})
        if not good:
            path.unlink(missing_ok=True)


def write_outputs(cfg: PGConfig, done: Done, out: Path, folders: dict[str, Path], labels: list[int] | None,
                  contexts: list | None, meta: dict[str, Any], classifier, record: dict[str, Any], dist: Dist,
                  nfe_each: tuple[str, int]) -> dict[str, Any]:
    """Rank 0, every set drawn: each folder's samples, grid and run.json, with --compare the side-by-side pictures
    and metrics; then the sets' tensors go."""
    device = dist.device
    results: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for name in dict.fromkeys(task.item[0] for task in done.tasks):
        parts = [load_checkpoint(task.files[0])[0] for task in done.tasks if task.item[0] == name]
        results[name] = (torch.cat([p["images"] for p in parts]),
                         None if "latents" not in parts[0] else torch.cat([p["latents"] for p in parts]))

    metrics: dict[str, dict[str, Any]] = {}
    embed: dict[str, torch.Tensor] = {}
    predicted: dict[str, torch.Tensor] = {}
    for name, (images, latents) in results.items():
        folder = folders[name]
        folder.mkdir(exist_ok=True)
        files = write_samples(folder, images, labels, cfg.seed, nrow=cfg.n if contexts else None)
        factor = cfg.pg_factor if name == "pg" else 0.0
        samples = samples_record(files, labels, cfg.seed)
        seq = {}
        if contexts:
            for k, s in enumerate(samples):
                s["context"] = contexts[k // cfg.n].source
            pictures, seq["sequence"] = sequence_pictures(contexts, list(images.split(cfg.n)), meta)
            for picture_name, picture in pictures.items():
                save_image(folder / picture_name, picture)
            if cfg.compare:
                metrics[name] = sequence_compare_metrics(seq["sequence"], images, cfg.n)
        write_run_json(folder, "pg", {**record, "pg_factor": factor}, device, model=meta,
                       **nfe_record(*nfe_each, 2 if cfg.cfg not in (None, 0.0, 1.0) else 1),
                       cost=cost_of(replace(cfg, pg_factor=factor), run_scale(cfg, meta), cfg.sampler, cfg.steps,
                                    meta.get("num_classes") or 0, evaluations=nfe(*nfe_each)),
                       samples=samples, **seq)
        if cfg.compare and not contexts:
            if latents is not None:
                metrics[name], embed[name] = latent_metrics(latents), latents.flatten(1)
            else:
                metrics[name], embed[name], predicted[name] = digit_metrics([str(folder / f) for f in files], labels,
                                                                            classifier, device)
    result: dict[str, Any] = {"out": str(out), "n": len(results["pg"][0]), "lines": []}
    if cfg.compare:
        # one picture: the plain batch on top, the same seeds with PG below (a pair of rows per context)
        if contexts:
            sequence_compare_pictures(out, contexts, results["plain"][0], results["pg"][0], cfg, meta)
        else:
            save_grid(out / "compare.png", torch.cat([results["plain"][0], results["pg"][0]]), nrow=cfg.n)
            plot_embedding(out / "embedding.png", {"plain": embed["plain"], f"PG {cfg.pg_factor:g}": embed["pg"]},
                           {"plain": predicted["plain"], f"PG {cfg.pg_factor:g}": predicted["pg"]} if predicted else None,
                           cfg.n, "classifier features" if predicted else "latents")
        write_json(out / "compare.json", {"pg_factor": cfg.pg_factor, "kernel": cfg.kernel, "seed": cfg.seed,
                                          "n": cfg.n, "plain": metrics["plain"], "pg": metrics["pg"]})
        result["lines"] = metric_lines(metrics["plain"], metrics["pg"], cfg.pg_factor)
    for folder in folders.values():  # every output is written: the sets' tensors are no longer needed
        shutil.rmtree(folder / SETS, ignore_errors=True)
    return result


def main(cfg: PGConfig, ctx: RunContext) -> dict[str, Any]:
    """`diffcli pg`: draw the particles and say what was written."""
    result = run(cfg, ctx.out, ctx.overwrite, ctx.device, ctx.options(), resume=ctx.resume)
    for line in result["lines"]:
        ctx.echo(line)
    extra = ", plain/, compare.png, compare.json" if cfg.compare else ""
    ctx.echo(f"wrote {result['n']} samples, grid.png, run.json{extra} to {result['out']}")
    return result


COMMAND = Command(
    "pg", PGConfig, validate, main,
    context=generating("diffcli-out/pg",
                       "Continue an interrupted run in --out: same options; particle sets already drawn (one per "
                       "context, plain and PG) are kept, the rest drawn, then every output written as one "
                       "uninterrupted run writes it."),
    scores=("digits", "fid", "kid"),
    help="""Particle guidance: sample a batch jointly with a repulsive kernel term, for more modes per batch.

    Example: diffcli pg --n 8 --pg-factor 1.7 --compare --out pg-digits

    Example: diffcli pg --checkpoint runs/circle --context 0:10 --n 8 --compare --out pg-futures

    Example: diffcli pg "a photo of a dog" --model ./sd-v1-5 --n 4 --out pg-dogs
    """)
