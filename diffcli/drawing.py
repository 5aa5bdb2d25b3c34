"""Drawing from our own (diffcli) models with the options of `diffcli sample` and `diffcli pg`: the library under
both commands.

`core.draw` is the loop itself (tensors in, tensors out); this module stands at the options layer because it
turns the option groups into that loop's settings: the model's defaults for --sampler/--steps and the refusals
(`resolve`), labels against the model's classes, the guidance (`options.guidance_of`), the PG kernel (the
classifier kernel loads the digit classifier: `digit_kernel`), a next-frame model's contexts. It never writes a
file: the commands do.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .backends.classifier import SHIPPED_CLASSIFIER, load_classifier
from .backends.edm import DiffcliModel
from .backends.models import model_file
from .core.blurring import DEFAULT_STEPS as BLURRING_STEPS, SAMPLERS as BLURRING_SAMPLERS
from .core.draw import draw_batches
from .core.particles import KernelGrad, classifier_features, make_kernel, posterior_push
from .core.samplers import SAMPLERS
from .core.schedules import NoiseLevels, refuses
from .data import sequences as sq
from .data.contexts import resolve_contexts
from .options import GuidanceOptions, SamplingOptions, guidance_of
from .shared.errors import DiffcliError
from .shared.limits import CLASSES_MAX


@dataclass(kw_only=True)
class DrawOptions(GuidanceOptions, SamplingOptions):
    """What a draw reads besides the guidance and sampling groups. `diffcli sample`'s SampleConfig carries these
    fields under the same names (and is passed as it is); `diffcli pg` builds one per particle set."""
    n: int
    labels: str | None = None
    seed: int = 0
    batch_size: int = 64
    sigma_min: float | None = None
    sigma_max: float | None = None
    strip: bool = False
    gif: bool = False
    clip_denoised: bool = False


def check_model_inputs(checkpoint: str | None, labels: str | None) -> None:
    """What `--checkpoint` and `--labels` can be checked for before a model loads (so a sweep refuses a bad grid
    value before it writes): the model file is there and readable (`models.model_file`), the labels are integers
    within the largest number of classes a model may have (its own classes are checked once it is loaded)."""
    if checkpoint is not None:
        model_file(checkpoint)
    if labels is not None:
        parse_labels(labels, CLASSES_MAX, 1)


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


def resolve(cfg: DrawOptions, meta: dict[str, Any]) -> DrawOptions:
    """The model's defaults for --sampler/--steps; a sampler or schedule option of the other process is refused."""
    if meta["kind"] == "blurring":
        if cfg.seg_on or cfg.pg_factor or cfg.pag_on or cfg.cfg_rule != "cfg" or cfg.ag_model is not None:
            raise DiffcliError("SEG, PAG, PG, autoguidance and the CFG rules guide EDM denoisers; a blurring-diffusion "
                               "model takes plain CFG only")
        if cfg.sampler not in (None, *BLURRING_SAMPLERS):
            raise DiffcliError(f"--sampler {cfg.sampler} is an EDM sampler; a blurring model samples with "
                               f"{', '.join(BLURRING_SAMPLERS)} (its own reverse process, --steps default {BLURRING_STEPS})")
        if cfg.sigma_min is not None or cfg.sigma_max is not None or cfg.schedule not in (None, "karras"):
            raise DiffcliError("--sigma-min/--sigma-max/--schedule set an EDM schedule; a blurring model runs t from 1 "
                               "to 0 in --steps")
        if cfg.clip_denoised and meta["blur_sigma_max"] > 0:
            # x0_hat = IDCT(u_x_hat) divides eps_hat's error by alpha_t = a_t d_t (down to ~7e-6 at high frequencies);
            # clamping that in pixel space pushes the amplified error into every frequency (tests/test_blurring.py)
            raise DiffcliError(f"--clip-denoised works only for blur_sigma_max 0 (plain diffusion); this model blurs "
                               f"(sigma_B,max {meta['blur_sigma_max']:g}), where x0_hat is too ill-conditioned to clip")
        return replace(cfg, sampler=cfg.sampler or BLURRING_SAMPLERS[0], steps=cfg.steps or BLURRING_STEPS)
    if cfg.clip_denoised:
        raise DiffcliError("--clip-denoised is a blurring-model option; EDM samplers integrate x itself")
    low, high = cfg.sigma_min or meta["sigma_min"], cfg.sigma_max or meta["sigma_max"]
    if not low < high:
        raise DiffcliError(f"need --sigma-min < --sigma-max, got {low:g} and {high:g} (the model's own where one "
                           "is not given)")
    if cfg.sampler in BLURRING_SAMPLERS:
        raise DiffcliError(f"--sampler {cfg.sampler} is the blurring-diffusion sampler; an EDM model samples with "
                           f"{', '.join(SAMPLERS)}")
    refusal = cfg.schedule and refuses(cfg.schedule, NoiseLevels(low, high))
    if refusal:
        raise DiffcliError(refusal)
    return replace(cfg, sampler=cfg.sampler or "heun", steps=cfg.steps or 18)


def check_against_model(cfg: DrawOptions, meta: dict[str, Any]) -> list[int] | None:
    """Labels and --cfg must fit the model's classes; returns each sample's label."""
    labels = parse_labels(cfg.labels, meta["num_classes"], cfg.n)
    if cfg.cfg is not None and meta["num_classes"] == 0:
        raise DiffcliError("--cfg needs a class-conditional model; this one is unconditional")
    if cfg.pg_factor and cfg.kernel == "posterior":
        check_posterior_kernel(cfg, meta)
        if cfg.cfg != 0:  # diffcli sample is conditional (labels cycling) unless --cfg 0 asks for the null pass
            raise DiffcliError("--kernel posterior spreads unconditional particles over the classes: sample with "
                               "--cfg 0 (the unconditional pass) and no --labels")
    return labels


GUIDE_FACTS = ("image_size", "channels", "num_classes", "context_frames")  # what a guide must share with its model


def load_guide(cfg: GuidanceOptions, meta: dict[str, Any], device: torch.device,
               dtype: torch.dtype | None = None) -> tuple[Any, torch.nn.Module] | None:
    """The autoguidance guide --ag-model names (a diffcli EDM checkpoint: a file, a run folder, RUN@STEP or a shipped
    name), loaded as `options.guidance_of` takes it: (its denoiser, the module holding its attention layers); None
    without --ag-model or at --ag-scale 1. Refused in one line before anything is written: a model that is not an
    EDM one, or whose image size, channels, classes or context frames differ from the main model's."""
    if cfg.ag_model is None or not cfg.ag_on:
        return None
    if meta["kind"] != "edm":
        raise DiffcliError("autoguidance guides EDM denoisers; a blurring-diffusion model takes CFG only")
    from .backends.pipelines import load_family
    family = load_family(cfg.ag_model, device, dtype, checkpoint=True, kinds=("edm",))
    differ = [f"{k} {family.meta.get(k) or 0} (the model: {meta.get(k) or 0})" for k in GUIDE_FACTS
              if (family.meta.get(k) or 0) != (meta.get(k) or 0)]
    if differ:
        raise DiffcliError(f"--ag-model {cfg.ag_model}: the guide must draw what the model draws, with the same "
                           f"conditioning; its {', '.join(differ)}")
    return family.model, family.attention


def digit_kernel(opts: GuidanceOptions, device: torch.device, classifier: str | Path | None = None,
                 meta: dict[str, Any] | None = None) -> tuple[KernelGrad, bool] | None:
    """The PG kernel a digit model's command asks for (--kernel, --pg-bandwidth); the classifier kernel loads the
    digit classifier (default the shipped one). None with PG off. The posterior kernel is checked against the
    model (`meta`): it needs a class-conditional model sampled unconditionally."""
    if not opts.pg_factor:
        return None
    if opts.kernel == "posterior":
        check_posterior_kernel(opts, meta)
        return posterior_push, True
    features = None
    if opts.kernel == "classifier":
        features = classifier_features(load_classifier(classifier or SHIPPED_CLASSIFIER, device))
    elif opts.kernel == "centroid":  # where each channel's ink is (y, x): a digit's position in a frame
        features = lambda x: sq.centroid(sq.ink(x)).flatten(1)  # noqa: E731
    return make_kernel(opts.kernel, features, opts.pg_bandwidth)


def check_posterior_kernel(opts: GuidanceOptions, meta: dict[str, Any] | None) -> None:
    """--kernel posterior spreads the particles over the model's classes: a class-conditional model, no --labels
    (the classes are what it chooses), no SEG (its passes are the class passes)."""
    if meta is not None and not meta.get("num_classes"):
        raise DiffcliError("--kernel posterior reads the model's class-conditional denoisers; this model has no "
                           "classes (use --kernel x0 or rbf)")
    if getattr(opts, "labels", None) is not None:
        raise DiffcliError("--kernel posterior spreads unconditional particles over the classes; drop --labels")
    if opts.seg_on or opts.pag_on or opts.cfg_rule != "cfg":
        raise DiffcliError("--kernel posterior runs every class as its own pass and takes no SEG (--blur), PAG "
                           "(--pag-scale) or --cfg-rule")


def sample_batches(model, meta: dict[str, Any], cfg: DrawOptions, device: torch.device,
                   indices: Sequence[int] | None = None, on_step: Callable[[int], None] | None = None,
                   kernel: tuple[KernelGrad, bool] | None = None, context: torch.Tensor | None = None,
                   guide: tuple[Any, torch.nn.Module] | None = None,
                   ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """Yields (sample indices, images (B,C,H,W) in [-1,1], x0_hat strip or None) per batch (`core.draw.batches`).

    Sample i uses seed cfg.seed + i for its initial and its per-step noise, and the network sees it in a fixed
    group (`core.draw.fixed_groups`), so it does not depend, to the bit, on batching, on which other indices are
    drawn (resume, ranks) or on their order (PG excepted: its particle set is the batch). The strip (with
    cfg.strip or cfg.gif) comes with the batch that holds index 0. Each batch samples `guidance.stack`: CFG and SEG
    (`--blur`, on the net's self-attention) in one network batch, then PG with `kernel` (particles.make_kernel;
    default the RBF on x) across the batch. Next-frame models take `context` (C_ctx, H, W) in [-1, 1], shared by
    every sample. `guide`: autoguidance's guide (`load_guide`; loaded here from cfg.ag_model when not given).
    """
    cfg = resolve(cfg, meta)
    labels = check_against_model(cfg, meta)
    if bool(meta.get("context_frames")) != (context is not None):
        raise DiffcliError("a next-frame model needs a context and other models take none")
    indices = list(range(cfg.n)) if indices is None else list(indices)
    # resolve() refused SEG and PG for blurring models; CFG applies only where there are labels
    guidance = guidance_of(cfg, 1.0 if cfg.cfg is None or labels is None else cfg.cfg,
                           kernel=digit_kernel(cfg, device, meta=meta) if kernel is None else kernel,
                           classes=meta["num_classes"],
                           guide=load_guide(cfg, meta, device, next(model.parameters()).dtype) if guide is None else guide)
    edm = meta["kind"] != "blurring"
    with guidance.installed(DiffcliModel(model, meta).attention):
        yield from draw_batches(
            model, meta, indices, device, sampler=cfg.sampler, steps=cfg.steps,
            sigma_min=(cfg.sigma_min or meta["sigma_min"]) if edm else None,
            sigma_max=(cfg.sigma_max or meta["sigma_max"]) if edm else None, rho=cfg.rho, knobs=cfg.knobs(),
            seed=cfg.seed, batch_size=cfg.batch_size, labels=labels,
            guidance=guidance,
            trajectory=cfg.strip or cfg.gif, clip_denoised=cfg.clip_denoised, on_step=on_step, context=context,
            schedule=cfg.schedule)


def sample_images(model, meta: dict[str, Any], cfg: DrawOptions, device: torch.device,
                  on_step: Callable[[int], None] | None = None, kernel: tuple[KernelGrad, bool] | None = None,
                  context: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int] | None, torch.Tensor | None]:
    """All n samples (N,C,H,W in [-1,1]) in memory, their labels, and the strip if asked."""
    images, strip = [], None
    for _, batch, batch_strip in sample_batches(model, meta, cfg, device, on_step=on_step, kernel=kernel,
                                                context=context):
        images.append(batch)
        strip = batch_strip if batch_strip is not None else strip
    return torch.cat(images), check_against_model(cfg, meta), strip


def model_contexts(cfg, meta: dict[str, Any], many: bool = False) -> list | None:
    """The context(s) `cfg.context` names for a next-frame model (sequences.Context each; several with `many`),
    None for other models; errors before any output."""
    if cfg.context is None:
        if meta.get("context_frames"):
            several = ", a list (0,4,7), a range (0:10)" if many else ""
            raise DiffcliError(f"this model predicts the next frame after {meta['context_frames']} context frame(s) of "
                               f"{meta['image_size']}x{meta['image_size']}: pass --context N{several} (sequences of its "
                               f"{meta.get('dataset')} dataset) or --context FILE")
        return None
    return resolve_contexts(cfg.context, meta, cfg.data_root, many=many)


def sequence_pictures(contexts: list, images: list[torch.Tensor],
                      meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The pictures a next-frame run writes beside its samples, by file name, and its run.json `sequence` record:
    context.png (first context, reusable as --context FILE), sequence.png (a row per context: context | samples |
    true futures), landing.png (where the digits moved) and the 001 metrics where the truth is known."""
    pictures = {"context.png": sq.context_picture(contexts[0].frames),
                "sequence.png": sq.strip([sq.context_row(c, x[:16]) for c, x in zip(contexts, images)])}
    per = [sq.context_metrics(x, c) for c, x in zip(contexts, images)]
    record: dict[str, Any] = {"contexts": [c.source for c in contexts]}
    known = [m for m in per if m is not None]
    if known:
        record.update(metrics=sq.mean_metrics(known), per_context=per)
        first = next(c for c in contexts if c.item is not None).item.shifts
        # one map for the contexts that share the first one's futures (all of them, except for moving-mnist)
        moved = torch.tensor([p for c, m in zip(contexts, per) if m and torch.equal(c.item.shifts, first)
                              for p in m["moved"]])
        pictures["landing.png"] = sq.landing_map(moved, first, sq.landing_radius(meta))
    return pictures, record


GRID_MAX = 256  # samples in grid.png: a grid of 50k FID samples helps nobody; the first 256 show the model


def sample_names(n: int, labels: list[int] | None, seed: int) -> list[str]:
    """File name of sample i: index, seed and label, so a folder explains itself and --resume can skip it."""
    return [f"{i:05d}-seed{seed + i}" + (f"-label{labels[i]}" if labels is not None else "") + ".png"
            for i in range(n)]


def samples_record(files: list[str], labels: list[int] | None, seed: int) -> list[dict[str, Any]]:
    """The run.json `samples` list `diffcli eval --digits` reads the labels from."""
    return [{"file": f, "seed": seed + i, "label": labels[i] if labels else None} for i, f in enumerate(files)]
