"""diffcli sample: draw images from a diffcli checkpoint (EDM with any sampler, or blurring diffusion with its own),
optional CFG, a denoising strip and GIF; `show_forward` pictures the blurring forward process."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from .shared.errors import DiffcliError
from .shared.devices import PerSampleRandn, pick_dtype
from .shared.images import check_image_file, load_images, make_grid, save_gif, save_grid, save_image
from .shared.memory import check_memory
from .shared.records import is_run_record, write_run_json
from .shared.checkpoints import load_checkpoint
from .shared.files import prepare_out_dir
from .shared.dist import Dist
from .shared.tasks import Done, Task, run_tasks
from .backends.models import check_record
from .backends.pipelines import load_family
from .shared.limits import (BATCH_MAX, N_MAX, PIXELS_MAX, SIGMA_LIMIT, count, finite,
                            seed as check_seed)
from .options import (GuidanceOptions, SamplingOptions, check_guidance, check_particles, check_sampling,
                      record as options_record, seg_layers)
from .core.draw import net_group
from .core.samplers import SAMPLERS, nfe
from .core.blurring import (SAMPLERS as BLURRING_SAMPLERS, BlurSchedule, blurred_mean, check_blur_sigma, diffuse,
                            schedule_of)
from .drawing import (GRID_MAX, check_against_model, model_contexts, resolve, sample_batches, sample_names, samples_record,
                      sequence_pictures)

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


def run(cfg: SampleConfig, out: Path, overwrite: bool, device_name: str | None, options: dict[str, Any],
        resume: bool = False) -> dict:
    validate(cfg)
    with Dist(device_name) as dist:
        return _run(cfg, out, overwrite, resume, dist, options)


def _run(cfg: SampleConfig, out: Path, overwrite: bool, resume: bool, dist: Dist, options: dict[str, Any]) -> dict:
    """The tasks are blocks of consecutive samples: network groups (`core.draw.fixed_groups`), or with PG the
    --batch-size batches, its particle sets; torchrun ranks take every world-th block, --resume skips the blocks
    whose samples all exist; rank 0 then writes the merged grid and run.json."""
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
    pg = bool(cfg.pg_factor)
    block = cfg.batch_size if pg else net_group(device)
    blocks = [range(s, min(s + block, cfg.n)) for s in range(0, cfg.n, block)]
    tasks = [Task(b, tuple(out / names[i] for i in b)) for b in blocks]

    def draw(mine: list[Task], advance) -> Iterator[tuple]:
        # a PG block is a particle set and runs whole (what is on disk stays as it is); other blocks draw only
        # their missing samples
        todo = [i for task in mine for i, f in zip(task.item, task.files) if pg or f in task.missing]
        for idx, images, strip in sample_batches(model, meta, cfg, device, todo, on_step=advance,
                                                 context=None if ctx is None else ctx.frames):
            yield from ((out / names[i], save_image, img) for i, img in zip(idx, images))
            if strip is not None:
                yield from process_outputs(out, strip, cfg.strip, cfg.gif)

    def finish(done: Done) -> None:
        nrow = cfg.nrow or (meta["num_classes"] if labels is not None and cfg.labels in (None, "all") else None)
        save_grid(out / "grid.png", load_images([out / f for f in names[:GRID_MAX]]), nrow=nrow)
        seq = {}
        if ctx is not None:
            pictures, seq["sequence"] = sequence_pictures([ctx], [load_images([out / f for f in names])], meta)
            for name, picture in pictures.items():
                save_image(out / name, picture)
        write_run_json(out, "sample", record, device, status="complete", model=meta, world_size=dist.world, **seq,
                       nfe_per_sample=nfe(cfg.sampler, cfg.steps) * (2 if cfg.cfg not in (None, 0.0, 1.0) else 1),
                       samples=samples_record(names, labels, cfg.seed))

    # each sample's progress: cfg.steps a sample drawn (a PG block draws all of its samples)
    done = run_tasks(dist, tasks, draw, resume=resume, label="sampling", finish=finish,
                     work=lambda task: cfg.steps * (len(task.files) if pg else len(task.missing)))
    return {"out": str(out), "n": cfg.n, "skipped": len(done.present), "main": dist.main}


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


def process_outputs(out: Path, trajectory: torch.Tensor, strip: bool, gif: bool) -> list[tuple]:
    """strip.png (a row a sample, a column a step) and/or process.gif (every step, the last held) from
    (rows, steps, C, H, W), as the job loop's outputs."""
    cols = trajectory.shape[1]
    outputs: list[tuple] = []
    if strip:
        pick = torch.linspace(0, cols - 1, 11).round().long() if cols > STRIP_MAX else torch.arange(cols)
        outputs.append((out / "strip.png", save_grid, trajectory[:, pick].flatten(0, 1), len(pick)))
    if gif:
        frames = [make_grid(trajectory[:, j]) for j in range(cols)]
        outputs.append((out / "process.gif", save_gif, frames + [frames[-1]] * 20, 60))
    return outputs


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
