"""diffcli sample: draw images from a diffcli checkpoint (EDM with any sampler, or blurring diffusion with its own),
optional CFG, a denoising strip and GIF; `show_forward` pictures the blurring forward process."""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .shared.errors import DiffcliError
from .shared.devices import PerSampleRandn, pick_dtype
from .shared.images import check_image_file, load_images, make_grid, save_gif, save_grid, save_image
from .shared.memory import check_memory
from .shared.records import is_run_record, write_run_json
from .shared.checkpoints import load_checkpoint
from .shared.progress import progress_bar
from .shared.files import prepare_out_dir
from .shared.dist import Dist
from .core.guidance import stack
from .backends.models import check_record
from .backends.edm import DiffcliModel
from .backends.pipelines import load_family
from .shared.limits import (BATCH_MAX, N_MAX, PIXELS_MAX, SIGMA_LIMIT, count, finite,
                            seed as check_seed)
from .options import (GuidanceOptions, SamplingOptions, check_guidance, check_particles, check_sampling, pg_of,
                      record as options_record, seg_layers, seg_of)
from .backends.classifier import SHIPPED_CLASSIFIER, load_classifier
from .core.particles import KernelGrad, classifier_features, make_kernel, posterior_push
from .core.samplers import SAMPLERS, get_sigmas_karras, nfe, run_sampler
from .data import sequences as sq
from .core.blurring import (DEFAULT_STEPS as BLURRING_STEPS, SAMPLERS as BLURRING_SAMPLERS, BlurSchedule,
                            blurred_mean, check_blur_sigma, diffuse, get_ts, sample_blurring, schedule_of)
from .data.contexts import resolve_contexts

from .shared.shipped import SHIPPED_MODEL as SHIPPED_CHECKPOINT  # the built-in model; every shipped path is in shipped.py


@dataclass(kw_only=True)
class SampleConfig(GuidanceOptions, SamplingOptions):
    """sampler None: the model's default, heun (EDM) or ancestral (blurring); steps None: 18 (EDM; heun = 35 NFE)
    or 100 (blurring, the 004 seed's T). SEG and PG act on EDM models; PG's particles are each network batch."""
    checkpoint: str = str(SHIPPED_CHECKPOINT)
    n: int = 16
    labels: str | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    seed: int = 0
    batch_size: int = 64
    dtype: str | None = None
    strip: bool = False
    gif: bool = False
    clip_denoised: bool = False  # blurring models: keep x0_hat in [-1, 1] at every step (DDPM's clip_denoised)
    nrow: int | None = None
    context: str | None = None    # next-frame models: a dataset index or a context file
    data_root: str | None = None  # where the model's MNIST digits are (default: as recorded at training)


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
    """Every option checked before a model loads or a file is written (ranges: options.py)."""
    count("n", cfg.n, 1, N_MAX)
    count("batch_size", cfg.batch_size, 1, BATCH_MAX)
    check_seed("seed", cfg.seed, cfg.n)
    count("nrow", cfg.nrow, 1, GRID_MAX)
    for name in ("sigma_min", "sigma_max"):
        finite(name, getattr(cfg, name), above=True, high=SIGMA_LIMIT)
    if cfg.sampler is not None and cfg.sampler not in (*SAMPLERS, *BLURRING_SAMPLERS):
        raise DiffcliError(f"unknown sampler {cfg.sampler!r}; choose one of {', '.join(SAMPLERS)} (EDM models) "
                           f"or {', '.join(BLURRING_SAMPLERS)} (blurring models)")
    check_sampling(replace(cfg, sampler=None), pipeline=False)
    check_guidance(cfg)
    check_particles(cfg, min(cfg.n, cfg.batch_size), pipeline=False, what="the batch (--n and --batch-size)")
    if cfg.sigma_min is not None and cfg.sigma_max is not None and not 0 < cfg.sigma_min < cfg.sigma_max:
        raise DiffcliError("need 0 < --sigma-min < --sigma-max")


def resolve(cfg: SampleConfig, meta: dict[str, Any]) -> SampleConfig:
    """The model's defaults for --sampler/--steps; a sampler or schedule option of the other process is refused."""
    if meta["kind"] == "blurring":
        if cfg.seg_on or cfg.pg_factor:
            raise DiffcliError("SEG and PG guide EDM denoisers; a blurring-diffusion model takes CFG only")
        if cfg.sampler not in (None, *BLURRING_SAMPLERS):
            raise DiffcliError(f"--sampler {cfg.sampler} is an EDM sampler; a blurring model samples with "
                               f"{', '.join(BLURRING_SAMPLERS)} (its own reverse process, --steps default {BLURRING_STEPS})")
        if cfg.sigma_min is not None or cfg.sigma_max is not None:
            raise DiffcliError("--sigma-min/--sigma-max set an EDM schedule; a blurring model runs t from 1 to 0 in --steps")
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
    return replace(cfg, sampler=cfg.sampler or "heun", steps=cfg.steps or 18)


def check_against_model(cfg: SampleConfig, meta: dict[str, Any]) -> list[int] | None:
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
    if opts.seg_on:
        raise DiffcliError("--kernel posterior runs every class as its own pass and takes no SEG (--blur)")


def sample_batches(model, meta: dict[str, Any], cfg: SampleConfig, device: torch.device,
                   indices: Sequence[int] | None = None, on_step: Callable[[int], None] | None = None,
                   kernel: tuple[KernelGrad, bool] | None = None, context: torch.Tensor | None = None,
                   ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """Yields (sample indices, images (B,C,H,W) in [-1,1], x0_hat strip or None) per batch (`batches`).

    Sample i uses seed cfg.seed + i for its initial and its per-step noise, and the network sees it in a fixed
    group (`fixed_groups`), so it does not depend, to the bit, on batching, on which other indices are drawn
    (resume, ranks) or on their order (PG excepted: its particle set is the batch). The strip comes with the batch that
    holds index 0. Each batch samples `guidance.stack`: CFG and SEG (`--blur`, on the net's self-attention) in one
    network batch, then PG with `kernel` (particles.make_kernel; default the RBF on x) across the batch.
    Next-frame models take `context` (C_ctx, H, W) in [-1, 1], shared by every sample.
    """
    cfg = resolve(cfg, meta)
    labels = check_against_model(cfg, meta)
    if bool(meta.get("context_frames")) != (context is not None):
        raise DiffcliError("a next-frame model needs a context and other models take none")
    indices = list(range(cfg.n)) if indices is None else list(indices)
    seg = seg_of(cfg, check_guidance(cfg)[0] if cfg.seg_on else None)  # resolve() refused both for blurring
    pg = pg_of(cfg, kernel or digit_kernel(cfg, device, meta=meta), classes=meta["num_classes"])
    with seg.installed(DiffcliModel(model, meta).attention) if seg else contextlib.nullcontext():
        yield from _draw(model, meta, cfg, device, indices, labels, seg, pg, on_step, context)


def _draw(model, meta, cfg, device, indices, labels, seg, pg, on_step, context):
    """sample_batches' loop (its options already resolved and checked; SEG's processors installed)."""
    scale = 1.0 if cfg.cfg is None or labels is None else cfg.cfg
    blurring = meta["kind"] == "blurring"  # its model predicts eps at time t; CFG mixes eps the same way
    if blurring:
        ts, start_scale = get_ts(cfg.steps, device), 1.0
    else:
        sigmas = get_sigmas_karras(cfg.steps, cfg.sigma_min or meta["sigma_min"], cfg.sigma_max or meta["sigma_max"],
                                   cfg.rho, device=device)
        start_scale = sigmas[0]
    shape = (meta["channels"], meta["image_size"], meta["image_size"])
    group = net_group(device)
    for idx in batches(indices, cfg.batch_size, None if pg else group):
        rng = PerSampleRandn([cfg.seed + i for i in idx], device)
        x = rng.randn(shape) * start_scale
        cond = {} if context is None else {"context": context.to(device).expand(len(idx), *context.shape)}
        if labels is None:
            both = (cond, cond)
        else:
            y = torch.tensor([labels[i] for i in idx], device=device)
            both = ({"class_labels": y, **cond}, {"class_labels": torch.full_like(y, model.null_label), **cond})
        net = fixed_groups(model, idx, group)
        denoiser = stack(net, scale, *both, None if blurring else sigmas, seg=seg, pg=pg)
        keep = (cfg.strip or cfg.gif) and 0 in idx
        # blurring: the state z_t itself, from the noise at t = 1 (x0_hat would divide by d_t ~ 0.001)
        frames: list[torch.Tensor] = [x[:8].clamp(-1, 1).cpu()] if blurring and keep else []

        def callback(info: dict[str, Any]) -> None:
            if keep:
                frames.append(info["x" if blurring else "denoised"][:8].clamp(-1, 1).cpu())
            if on_step:
                on_step(len(idx))

        if blurring:
            x = sample_blurring(denoiser, x, ts, schedule_of(meta), callback=callback, noise=rng,
                                clip_denoised=cfg.clip_denoised)
        else:
            x = run_sampler(cfg.sampler, denoiser, x, sigmas, callback=callback, noise=rng, **cfg.knobs())
        images = x.clamp(-1, 1).cpu()
        # rows: samples; columns: x0_hat after each step, then the final image (blurring: z_t from t = 1 to 0)
        yield idx, images, (torch.stack(frames if blurring else frames + [images[:8]], dim=1) if keep else None)


def batches(indices: Sequence[int], batch_size: int, group: int | None = None) -> list[list[int]]:
    """The batches `indices` are sampled in, each at most `batch_size`: runs of it; with `group` (no PG, whose
    particle sets are the batches themselves), whole network groups (`fixed_groups`) packed into each batch, so
    that no group is computed in two batches (a batch below one group still costs a group's network call)."""
    indices = list(indices)
    if group is None:
        return [indices[s:s + batch_size] for s in range(0, len(indices), batch_size)]
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][0] // group == i // group:
            runs[-1].append(i)
        else:
            runs.append([i])
    out: list[list[int]] = []
    for run in runs:
        pieces = [run[s:s + batch_size] for s in range(0, len(run), batch_size)]
        if out and len(out[-1]) + len(pieces[0]) <= batch_size:
            out[-1] += pieces.pop(0)
        out += pieces
    return out


def net_group(device: torch.device) -> int:
    """Samples per network call (see `fixed_groups`): 8 on a CPU (no slower than one call for 64 there, measured),
    64 on a GPU (the default --batch-size, so a default run's calls keep their size)."""
    return 8 if torch.device(device).type == "cpu" else 64


def fixed_groups(model, idx: Sequence[int], size: int):
    """`model` called only on fixed groups: sample i sits in row i % size of group i // size (of each role chunk,
    when CFG or SEG stack their passes), rows this batch does not fill repeat a member. The network then always
    runs `size` rows a chunk at fixed places, and since BLAS and convolution kernels pick their blocking (so their
    rounding) by batch size, this is what makes a sample's floats independent of --batch-size, of resume and of
    torchrun ranks. Costs padding where a batch holds part of a group."""
    b = len(idx)
    groups: dict[int, list[tuple[int, int]]] = {}
    for pos, i in enumerate(idx):
        groups.setdefault(i // size, []).append((pos, i % size))

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        rows = x.shape[0]
        k = rows // b  # role chunks: 1, 2 (CFG) or 3 (CFG + SEG), each b rows in batch order
        out = None
        for members in groups.values():
            src = [members[0][0]] * size
            for pos, slot in members:
                src[slot] = pos
            take = torch.tensor([r * b + p for r in range(k) for p in src], device=x.device)
            pick = lambda t: (t.index_select(0, take.to(t.device))  # noqa: E731
                              if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == rows else t)
            y = model(pick(x), pick(sigma), **{name: pick(v) for name, v in kw.items()})
            out = y.new_empty((rows, *y.shape[1:])) if out is None else out
            dst = torch.tensor([r * b + pos for r in range(k) for pos, _ in members], device=y.device)
            out[dst] = y[torch.tensor([r * size + slot for r in range(k) for _, slot in members], device=y.device)]
        return out

    return denoise


def sample_images(model, meta: dict[str, Any], cfg: SampleConfig, device: torch.device,
                  on_step: Callable[[int], None] | None = None, kernel: tuple[KernelGrad, bool] | None = None,
                  context: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int] | None, torch.Tensor | None]:
    """All n samples (N,C,H,W in [-1,1]) in memory, their labels, and the strip if asked."""
    images, strip = [], None
    for _, batch, batch_strip in sample_batches(model, meta, cfg, device, on_step=on_step, kernel=kernel,
                                                context=context):
        images.append(batch)
        strip = batch_strip if batch_strip is not None else strip
    return torch.cat(images), check_against_model(cfg, meta), strip


GRID_MAX = 256  # a grid of 50k FID samples helps nobody; the first 256 show the model


def run(cfg: SampleConfig, out: Path, overwrite: bool, device_name: str | None, options: dict[str, Any],
        resume: bool = False) -> dict:
    validate(cfg)
    with Dist(device_name) as dist:
        return _run(cfg, out, overwrite, resume, dist, options)


def _run(cfg: SampleConfig, out: Path, overwrite: bool, resume: bool, dist: Dist, options: dict[str, Any]) -> dict:
    """One rank's share of the samples (every world-th index); rank 0 writes the merged grid and run.json."""
    device = dist.device
    dtype = pick_dtype(cfg.dtype or "fp32", device)
    family = load_family(cfg.checkpoint, device, dtype, checkpoint=True, kinds=("edm", "blurring"))
    model, meta = family.model, family.meta
    cfg = resolve(cfg, meta)
    labels = check_against_model(cfg, meta)  # fail before touching the output folder
    size = meta["image_size"]
    family.check_memory(min(cfg.batch_size, cfg.n), size, size, dtype, device, "one network batch",
                        "lower --batch-size")
    if meta["kind"] == "edm":
        seg_layers(family.attention, cfg, "--layers")
    ctx = (model_contexts(cfg, meta) or [None])[0]
    record = {**options_record(cfg), **options}
    names = sample_names(cfg.n, labels, cfg.seed)

    if resume and cfg.pg_factor:
        check_particle_batches(out, cfg.batch_size)
    dist.begin(out, overwrite, resume, "sample", record, model=meta)
    pending = [i for i in range(cfg.n) if not (resume and (out / names[i]).is_file())]
    pg = bool(cfg.pg_factor)
    todo = share(dist, cfg.n, pending, cfg.batch_size if pg else net_group(device), whole=pg)
    wanted = set(pending)
    with progress_bar("sampling", len(todo) * cfg.steps, disable=not dist.main) as advance:
        for idx, images, strip in sample_batches(model, meta, cfg, device, todo, on_step=advance,
                                                 context=None if ctx is None else ctx.frames):
            for i, img in zip(idx, images):
                if i in wanted:  # a PG batch re-runs whole; what is on disk stays as it is
                    save_image(out / names[i], img)
            if strip is not None:
                save_process(out, strip, cfg.strip, cfg.gif)
    dist.barrier()
    if dist.main:
        nrow = cfg.nrow or (meta["num_classes"] if labels is not None and cfg.labels in (None, "all") else None)
        save_grid(out / "grid.png", load_images([out / f for f in names[:GRID_MAX]]), nrow=nrow)
        seq = {} if ctx is None else {"sequence": sequence_outputs(out, [ctx], [load_images([out / f for f in names])], meta)}
        write_run_json(out, "sample", record, device, status="complete", model=meta, world_size=dist.world, **seq,
                       nfe_per_sample=nfe(cfg.sampler, cfg.steps) * (2 if cfg.cfg not in (None, 0.0, 1.0) else 1),
                       samples=samples_record(names, labels, cfg.seed))
    return {"out": str(out), "n": cfg.n, "skipped": cfg.n - len(pending), "main": dist.main}


def share(dist: Dist, n: int, pending: list[int], block: int, whole: bool) -> list[int]:
    """This rank's pending samples, in blocks of `block` consecutive indices, every world-th block: network groups
    (`fixed_groups`), or with PG (`whole`) the --batch-size batches, its particle sets, which run whole when any of
    their samples is pending, so the particles come out as in an uninterrupted run."""
    wanted = set(pending)
    blocks = [range(s, min(s + block, n)) for s in range(0, n, block)]
    mine = dist.shard([b for b in blocks if any(i in wanted for i in b)])
    return [i for b in mine for i in b if whole or i in wanted]


def check_particle_batches(out: Path, batch_size: int) -> None:
    """--resume with PG: each --batch-size batch is one particle set, so a run resumes only with its own."""
    record = Path(out) / "run.json"
    try:
        before = json.loads(record.read_text())["options"]["batch_size"] if is_run_record(record) else None
    except (OSError, ValueError, KeyError, TypeError):
        before = None  # begin_output says what is wrong with the folder
    if before is not None and before != batch_size:
        raise DiffcliError(f"--resume: with --pg-factor each --batch-size batch is one particle set, so this run "
                           f"resumes only with --batch-size {before} (got {batch_size})")


STRIP_MAX = 21  # more columns than this (blurring's 100 steps) are thinned to 11: t = 1, 0.9, ..., 0


def save_process(out: Path, trajectory: torch.Tensor, strip: bool, gif: bool) -> None:
    """strip.png (a row a sample, a column a step) and/or process.gif (every step, the last held) from
    (rows, steps, C, H, W)."""
    cols = trajectory.shape[1]
    if strip:
        pick = torch.linspace(0, cols - 1, 11).round().long() if cols > STRIP_MAX else torch.arange(cols)
        save_grid(out / "strip.png", trajectory[:, pick].flatten(0, 1), nrow=len(pick))
    if gif:
        frames = [make_grid(trajectory[:, j]) for j in range(cols)]
        save_gif(out / "process.gif", frames + [frames[-1]] * 20, duration_ms=60)


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


def sequence_outputs(out: Path, contexts: list, images: list[torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """context.png (first context, reusable as --context FILE), sequence.png (a row per context: context |
    samples | true futures), landing.png (where the digits moved) and the 001 metrics where the truth is known."""
    sq.save_context_png(out / "context.png", contexts[0].frames)
    save_image(out / "sequence.png", sq.strip([sq.context_row(c, x[:16]) for c, x in zip(contexts, images)]))
    per = [sq.context_metrics(x, c) for c, x in zip(contexts, images)]
    record: dict[str, Any] = {"contexts": [c.source for c in contexts]}
    known = [m for m in per if m is not None]
    if known:
        record.update(metrics=sq.mean_metrics(known), per_context=per)
        first = next(c for c in contexts if c.item is not None).item.shifts
        # one map for the contexts that share the first one's futures (all of them, except for moving-mnist)
        moved = torch.tensor([p for c, m in zip(contexts, per) if m and torch.equal(c.item.shifts, first)
                              for p in m["moved"]])
        save_image(out / "landing.png", sq.landing_map(moved, first, sq.landing_radius(meta)))
    return record


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


def show_forward(image: Path, out: Path, overwrite: bool, checkpoint: str | None, blur_sigma_max: float | None,
                 seed: int, gif: bool, columns: int = 11) -> dict[str, Any]:
    """The blurring forward process on one image, no model needed: forward.png has a column per t = 0 .. 1 and
    two rows, the blurred image IDCT(d_t DCT(x)) and z_t (blurred, scaled by a_t, noised with one fixed noise);
    forward.gif (with `gif`) runs t through 50 values. The process is --checkpoint's if that is a blurring model
    (--blur-sigma-max overrides its sigma_B,max), else sigma_B,max = --blur-sigma-max or 20."""
    check_seed("seed", seed)
    schedule = BlurSchedule()
    if checkpoint is not None:
        path = Path(checkpoint) / "model.safetensors" if Path(checkpoint).is_dir() else checkpoint
        record = load_checkpoint(path)[1].get("model")
        if not isinstance(record, dict) or record.get("kind") != "blurring":
            raise DiffcliError(f"--show-forward shows a blurring process; {checkpoint} is no blurring model "
                               "(leave --checkpoint out and pass --blur-sigma-max)")
        check_record(record, f"{path}: the model record")
        schedule = schedule_of(record)
    if blur_sigma_max is not None:
        schedule = replace(schedule, blur_sigma_max=check_blur_sigma(blur_sigma_max))
        finite("blur_sigma_max", blur_sigma_max, high=SIGMA_LIMIT)
    check_image_file(image, PIXELS_MAX)  # a decompression bomb is refused from its header, before decoding
    try:
        x = load_images([image])
    except OSError as e:
        raise DiffcliError(f"cannot read image {image}: {getattr(e, 'strerror', None) or e}") from None
    check_memory(2 * columns * x[0].numel() * 4, "cpu", f"forward.png of a {x.shape[-1]} x {x.shape[-2]} image",
                 "pass a smaller image")
    out = prepare_out_dir(out, overwrite)
    noise = PerSampleRandn([seed]).randn(x.shape[1:])

    def frame(t: float) -> torch.Tensor:
        tt = torch.tensor([t], dtype=torch.float64)
        return torch.cat([blurred_mean(x, tt, schedule), diffuse(x, tt, noise, schedule)]).clamp(-1, 1)

    ts = torch.linspace(0, 1, columns).tolist()
    save_grid(out / "forward.png", torch.stack([frame(t) for t in ts], dim=1).flatten(0, 1), nrow=columns)
    if gif:
        frames = [make_grid(frame(t), nrow=2) for t in torch.linspace(0, 1, 50).tolist()]
        save_gif(out / "forward.gif", frames + [frames[-1]] * 10, duration_ms=80)
    write_run_json(out, "sample --show-forward", {"image": str(image), "seed": seed, "gif": gif, "t": ts,
                                                  **asdict(schedule)}, "cpu")
    return {"out": str(out), "schedule": asdict(schedule)}
