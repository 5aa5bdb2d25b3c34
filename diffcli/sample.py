"""diffcli sample: draw images from a diffcli checkpoint (EDM with any sampler, or blurring diffusion with its own),
optional CFG, a denoising strip and GIF; `show_forward` pictures the blurring forward process."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .runner import Command, RunContext, generating
from .shared.errors import DiffcliError
from .shared.fields import check_fields, opt
from .shared.devices import PerSampleRandn, pick_dtype
from .shared.images import check_image_file, load_images, make_grid, save_gif, save_grid, save_image
from .shared.memory import check_memory
from .shared.records import is_run_record, note_run, write_run_json
from .shared.checkpoints import load_checkpoint
from .shared.files import prepare_out_dir
from .shared.dist import Dist
from .shared.tasks import Done, Task, run_tasks
from .backends.models import check_record
from .backends.pipelines import load_family
from .shared.limits import (BATCH_MAX, N_MAX, PIXELS_MAX, SIDE_MAX, SIGMA_LIMIT, finite,
                            seed as check_seed)
from .options import (FlowOptions, GuidanceOptions, SamplingOptions, check_guidance, check_particles, check_sampling,
                      cost_of, group_fields, record as options_record, seg_layers)
from .shared.names import check_file_names, read_prompts_file
from .text_images import PipelineRun, check_prompts, planned_files, run_prompts
from .core.draw import net_group
from .core.samplers import SAMPLERS, nfe_record
from .core.blurring import (SAMPLERS as BLURRING_SAMPLERS, BlurSchedule, blurred_mean, check_blur_sigma, diffuse,
                            schedule_of)
from .drawing import (GRID_MAX, check_against_model, check_model_inputs, load_guide, model_contexts, resolve,
                      sample_batches, sample_names, samples_record, sequence_pictures)

from .shared.shipped import SHIPPED_MODEL as SHIPPED_CHECKPOINT  # the built-in model; every shipped path is in shipped.py
from .shared.inputs import read_json


@dataclass(kw_only=True)
class SampleConfig(GuidanceOptions, SamplingOptions):
    """sampler None: the model's default, heun (EDM) or ancestral (blurring); steps None: 18 (EDM; heun = 35 NFE)
    or 100 (blurring, the 004 seed's T). SEG and PG act on EDM models; PG's particles are each network batch."""
    checkpoint: str = opt(str(SHIPPED_CHECKPOINT), panel="input", cli_type=Optional[Path], cli_default=None,
                          to_config=lambda v: None if v is None else str(v),
                          help="A diffcli model file, a run folder (its latest model), or RUN@STEP (a snapshot of "
                               "--snapshot-every); default: the shipped MNIST model.")
    n: int = opt(16, "--n", panel="sampling", check="count", high=N_MAX, help="Number of samples.")
    labels: str | None = opt(None, panel="input", help="Class of each sample, cycled: '0,3,7' or 'all' (default: all).")
    sigma_min: float | None = opt(None, panel="sampling", check="finite", above=True, high=SIGMA_LIMIT,
                                  help="Lowest noise level (default: the model's, 0.002).")
    sigma_max: float | None = opt(None, panel="sampling", check="finite", above=True, high=SIGMA_LIMIT,
                                  help="Highest noise level (default: the model's, 80).")
    seed: int = opt(0, panel="sampling", check="seed", per="n",
                    help="Sample i uses seed + i, whatever the batch size.")
    batch_size: int = opt(64, panel="sampling", check="count", high=BATCH_MAX, help="Samples per network batch.")
    dtype: str | None = opt(None, panel="model", help="Network precision: fp32 (default), fp16 or bf16 (GPU).")
    strip: bool = opt(False, "--strip", panel="output",
                      help="Also write strip.png: x0_hat along the steps (blurring models: z_t at t = 1, 0.9, ..., 0).")
    gif: bool = opt(False, "--gif", panel="output",
                    help="Also write process.gif: the first 8 samples at every step (blurring models: the blur "
                         "undone); with --show-forward, forward.gif.")
    # blurring models: keep x0_hat in [-1, 1] at every step (DDPM's clip_denoised)
    clip_denoised: bool = opt(False, "--clip-denoised", panel="sampling",
                              help="Plain (blur_sigma_max 0) blurring-process models: keep x0_hat in [-1, 1] at every "
                                   "step (DDPM's clip_denoised; refused for blurring models, where x0_hat is "
                                   "ill-conditioned).")
    nrow: int | None = opt(None, panel="output", check="count", high=GRID_MAX, help="Images per grid row.")
    # next-frame models: a dataset index or a context file
    context: str | None = opt(None, "--context", panel="input",
                              help="Next-frame models: the frames to continue, as an index into the model's sequence "
                                   "dataset (truth known: metrics) or a file (a PNG of the frames side by side, or a "
                                   ".pt/.safetensors tensor). All n samples share it.")
    # where the model's MNIST digits are (default: as recorded at training)
    data_root: str | None = opt(None, "--data-root", panel="input",
                                help="With --context N: where the model's MNIST digits are (default: the digits its "
                                     "model file carries, else the folder recorded at training).")


@dataclass(kw_only=True)
class ShowForward:
    """`diffcli sample --show-forward IMAGE`: the blurring forward process on one image, no model sampled."""
    show_forward: Path | None = opt(None, "--show-forward", metavar="IMAGE", panel="input",
                                    help="Instead of sampling, picture the blurring forward process on IMAGE: "
                                         "forward.png (blurred | blurred + noise, t = 0 .. 1).")
    blur_sigma_max: float | None = opt(None, "--blur-sigma-max", panel="model",
                                       help="With --show-forward: sigma_B,max (default: the --checkpoint's blurring "
                                            "model's, else 20).")
    checkpoint: str | None = None
    seed: int = 0
    gif: bool = False


@dataclass(kw_only=True)
class PipelinePrompts:
    """`diffcli sample "a cat" --model PIPE`: text-to-image on a diffusers pipeline (SD 1.x/2.x, SDXL), the run of
    `diffcli seg` (`text_images.run_prompts`) with SEG off unless asked."""
    prompt: str | None = opt(None, argument=True, panel="input", help="With --model: the text prompt (or --prompts-file).")
    prompts_file: Path | None = opt(None, "--prompts-file", panel="input",
                                    help="With --model: one prompt a line (blank lines and # comments skipped).")
    model: str | None = opt(None, "--model", panel="model",
                            help="Sample a diffusers pipeline instead (SD 1.x/2.x or SDXL: a hub id in the cache or a "
                                 "local folder): --n images per prompt, one batch; defaults --cfg 7.5, euler (DDIM), "
                                 "50 steps, SEG and PAG off.")
    height: int | None = opt(None, panel="sampling", check="count", high=SIDE_MAX,
                             help="With --model: image height (default: the model's native size).")
    width: int | None = opt(None, panel="sampling", check="count", high=SIDE_MAX,
                            help="With --model: image width (non-square allowed).")
    negative_prompt: str | None = opt(None, "--negative-prompt", panel="input",
                                      help="With --model: the prompt of the unconditional CFG branch (default: empty).")


@dataclass(kw_only=True)
class SampleCli(ShowForward, PipelinePrompts, FlowOptions):
    """The command line's fields beyond SampleConfig: --show-forward, the pipeline prompts and the flow-model
    options."""


PIPELINE_DEFAULTS = {"sampler": "euler", "steps": 50}
PIPELINE_CFG = 7.5  # as `diffcli pg` on pipelines: SD's usual CFG (1, off, on guidance-distilled Flux)
DIGIT_ONLY = ("labels", "sigma_min", "sigma_max", "nrow", "context", "data_root")  # None unless given


def validate(cfg: SampleConfig | PipelineRun) -> None:
    """Every option checked before a model loads or a file is written (ranges: the fields' declarations)."""
    if isinstance(cfg, PipelineRun):
        check_prompts(cfg)
        return
    check_fields(cfg, ["n", "batch_size", "seed", "nrow", "sigma_min", "sigma_max"])
    if cfg.sampler is not None and cfg.sampler not in (*SAMPLERS, *BLURRING_SAMPLERS):
        raise DiffcliError(f"unknown sampler {cfg.sampler!r}; choose one of {', '.join(SAMPLERS)} (EDM models) "
                           f"or {', '.join(BLURRING_SAMPLERS)} (blurring models)")
    check_sampling(replace(cfg, sampler=None), pipeline=False)
    check_guidance(cfg)
    check_particles(cfg, min(cfg.n, cfg.batch_size), pipeline=False, what="the batch (--n and --batch-size)")
    if cfg.sigma_min is not None and cfg.sigma_max is not None and not 0 < cfg.sigma_min < cfg.sigma_max:
        raise DiffcliError("need 0 < --sigma-min < --sigma-max")
    check_model_inputs(cfg.checkpoint, cfg.labels)


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
    guide = load_guide(cfg, meta, device, dtype)
    if guide is not None:
        seg_layers(guide[1], cfg, "--layers")
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

    def sample_facts(i: int) -> dict[str, Any]:
        """What image i carries of its own: index, seed, label, and the arguments that draw it again with least
        work, the same pixels: --n up to the end of its block (its network group, whose other rows its floats
        depend on; with PG its batch, one particle set)."""
        alone = min(cfg.n, (i // block + 1) * block)
        return {"index": i, "seed": cfg.seed + i, "label": None if labels is None else labels[i],
                "rerun": ["--n", str(alone), *(["--batch-size", str(cfg.batch_size)] if pg else [])]}

    def draw(mine: list[Task], advance) -> Iterator[tuple]:
        # a PG block is a particle set and runs whole (what is on disk stays as it is); other blocks draw only
        # their missing samples
        todo = [i for task in mine for i, f in zip(task.item, task.files) if pg or f in task.missing]
        for idx, images, strip in sample_batches(model, meta, cfg, device, todo, on_step=advance,
                                                 context=None if ctx is None else ctx.frames, guide=guide):
            yield from ((out / names[i], save_image, img, sample_facts(i)) for i, img in zip(idx, images))
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
                       **nfe_record(cfg.sampler, cfg.steps, 2 if cfg.cfg not in (None, 0.0, 1.0) else 1),
                       cost=cost_of(cfg, 1.0 if cfg.cfg is None or labels is None else cfg.cfg, cfg.sampler, cfg.steps,
                                    meta.get("num_classes") or 0),
                       samples=samples_record(names, labels, cfg.seed))

    # each sample's progress: cfg.steps a sample drawn (a PG block draws all of its samples)
    done = run_tasks(dist, tasks, draw, resume=resume, label="sampling", finish=finish,
                     work=lambda task: cfg.steps * (len(task.files) if pg else len(task.missing)))
    return {"out": str(out), "n": cfg.n, "skipped": len(done.present), "main": dist.main}


def check_particle_batches(out: Path, batch_size: int) -> None:
    """--resume with PG: each --batch-size batch is one particle set, so a run resumes only with its own."""
    record = Path(out) / "run.json"
    try:
        before = read_json(record, "run record")["options"]["batch_size"] if is_run_record(record) else None
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
    options = {"image": str(image), "seed": seed, "gif": gif, "t": ts, **asdict(schedule)}
    note_run("sample --show-forward", {"out": str(out), **options}, "cpu")
    save_grid(out / "forward.png", torch.stack([frame(t) for t in ts], dim=1).flatten(0, 1), nrow=columns)
    if gif:
        frames = [make_grid(frame(t), nrow=2) for t in torch.linspace(0, 1, 50).tolist()]
        save_gif(out / "forward.gif", frames + [frames[-1]] * 10, duration_ms=80)
    write_run_json(out, "sample --show-forward", options, "cpu")
    return {"out": str(out), "schedule": asdict(schedule)}


# ---------------------------------------------------------------- the command

def build(values: dict[str, Any]) -> SampleConfig | ShowForward | PipelineRun:
    """The command line's values -> the config: --show-forward pictures the forward process instead of sampling;
    --blur-sigma-max goes only with it; --model samples a pipeline (a prompt or --prompts-file); no --checkpoint
    means the shipped model."""
    prompts = {name: values.pop(name) for name in ("prompt", "prompts_file", "model", "height", "width",
                                                   "negative_prompt", "guidance_embed", "offload")}
    if prompts["model"] is not None:
        return pipeline_run(values, prompts)
    given = [name for name in ("prompt", "prompts_file", "height", "width", "negative_prompt", "guidance_embed")
             if prompts[name] is not None] + ["offload"] * prompts["offload"]
    if given:
        raise DiffcliError(f"--{given[0].replace('_', '-')} goes with --model PIPE (text-to-image on a pipeline)")
    image, blur_sigma_max = values.pop("show_forward"), values.pop("blur_sigma_max")
    if image is not None:
        return ShowForward(show_forward=image, blur_sigma_max=blur_sigma_max, checkpoint=values["checkpoint"],
                           seed=values["seed"], gif=values["gif"])
    if blur_sigma_max is not None:
        raise DiffcliError("--blur-sigma-max goes with --show-forward; a trained model's process is fixed")
    if values["checkpoint"] is None and not SHIPPED_CHECKPOINT.is_file():
        raise DiffcliError(f"the shipped model {SHIPPED_CHECKPOINT} is missing; pass --checkpoint")
    return SampleConfig(**{**values, "checkpoint": values["checkpoint"] or str(SHIPPED_CHECKPOINT)})


def pipeline_run(values: dict[str, Any], prompts: dict[str, Any]) -> PipelineRun:
    """`sample --model PIPE`: the shared guidance and sampling options (pipeline defaults where not given), --n and
    --seed, the prompts; an option of diffcli models only, or --show-forward, is refused in one line."""
    if prompts["prompt"] is not None and prompts["prompts_file"] is not None:
        raise DiffcliError("give a prompt or --prompts-file, not both")
    if values["checkpoint"] is not None:
        raise DiffcliError("--checkpoint samples a diffcli model and --model a pipeline: give one")
    for name in ("show_forward", "blur_sigma_max", *DIGIT_ONLY):
        if values.get(name) is not None:
            raise DiffcliError(f"--{name.replace('_', '-')} is for diffcli models; --model samples a pipeline")
    for name in ("strip", "gif", "clip_denoised"):
        if values.get(name):
            raise DiffcliError(f"--{name.replace('_', '-')} is for diffcli models; --model samples a pipeline")
    text = ([prompts["prompt"]] if prompts["prompt"] is not None else
            read_prompts_file(prompts["prompts_file"]) if prompts["prompts_file"] is not None else [])
    shared = {name: values[name] for name in group_fields(GuidanceOptions, SamplingOptions)}
    shared.update({k: v for k, v in PIPELINE_DEFAULTS.items() if shared[k] is None})
    return PipelineRun(**shared, prompts=text, model=prompts["model"], n=values["n"], seed=values["seed"],
                       height=prompts["height"], width=prompts["width"], negative_prompt=prompts["negative_prompt"],
                       dtype=values["dtype"], guidance_embed=prompts["guidance_embed"], offload=prompts["offload"])


def run_pipeline(cfg: PipelineRun, out: Path, overwrite: bool, device_name: str | None, options: dict[str, Any],
                 resume: bool = False) -> dict[str, Any]:
    """`sample --model`: the text-to-image run `diffcli seg` runs, with this command's defaults."""
    blurs = check_prompts(cfg)
    check_file_names(out, planned_files(cfg, blurs))
    with Dist(device_name) as dist:
        return run_prompts(cfg, blurs, out, overwrite, resume, dist, options, "sample", default_cfg=PIPELINE_CFG)


def main(cfg: SampleConfig | ShowForward | PipelineRun, ctx: RunContext) -> dict[str, Any]:
    """`diffcli sample`: sample (or picture the forward process) and say what was written."""
    if isinstance(cfg, PipelineRun):
        result = run_pipeline(cfg, ctx.out, ctx.overwrite, ctx.device, ctx.options(), resume=ctx.resume)
        if result["main"]:
            ctx.echo(f"wrote {result['images']} images, grid.png and run.json to {result['out']}")
        return result
    if isinstance(cfg, ShowForward):
        result = show_forward(cfg.show_forward, ctx.out, ctx.overwrite, cfg.checkpoint, cfg.blur_sigma_max, cfg.seed,
                              cfg.gif)
        ctx.echo(f"wrote forward.png{', forward.gif' if cfg.gif else ''} (sigma_B,max "
                 f"{result['schedule']['blur_sigma_max']:g}) to {result['out']}")
        return result
    result = run(cfg, ctx.out, ctx.overwrite, ctx.device, ctx.options(), resume=ctx.resume)
    if result["main"]:
        skipped = f" ({result['skipped']} already there)" if ctx.resume else ""
        extra = "".join(f", {name}" for name, on in (("strip.png", cfg.strip), ("process.gif", cfg.gif)) if on)
        ctx.echo(f"wrote {result['n']} samples{skipped}, grid.png{extra} and run.json to {result['out']}")
    return result


COMMAND = Command(
    "sample", SampleConfig, validate, main, build=build, cli=SampleCli,
    notes=lambda values: {"prompts_file": str(values["prompts_file"])} if values.get("prompts_file") else {},
    context=generating("diffcli-out/sample",
                       "Continue an interrupted run in --out: same options, samples already written are skipped."),
    scores=("digits", "fid", "kid"),
    help="""Sample a diffcli model (EDM or blurring diffusion): PNGs, a grid, run.json, optionally the denoising strip/GIF.

    Example: diffcli sample --labels all --n 20 --cfg 2 --strip --out digits

    Example: diffcli sample --checkpoint checkpoints/mnist-blurring.safetensors --strip --gif --out blur

    Example: diffcli sample --show-forward digit.png --blur-sigma-max 20 --gif --out forward

    Example: diffcli sample --checkpoint runs/circle --context 3 --n 8 --out next-frames

    Example: diffcli sample "a cat" --model ./sd-v1-5 --n 4 --pag-scale 3 --out cats  (a pipeline: SEG off by default)

    Many GPUs: torchrun --nproc_per_node 4 -m diffcli -- sample --n 50000 --out fid-samples (each rank draws every 4th sample; the -- keeps torchrun off --n).
    """)
