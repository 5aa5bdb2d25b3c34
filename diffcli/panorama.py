"""diffcli panorama: wide (or tall) images by synchronized diffusion over overlapping latent windows (003 task 1).

The windows are views (`views.windows`), the synchronization is `sync.synchronized`, the sampler is DDIM =
Euler over the scheduler's sigmas (`diffcli.core.samplers`); this module picks sizes, runs prompts, decodes the
latent canvas tile by tile and writes the 003 submission layout: `<Prompt_with_underscores>.png` and its
512x512 crops `<Prompt_with_underscores>_<pos>.png`, which `diffcli eval --app wide_images` grades. The folder
holds only those images (the grader opens every entry with PIL): the run record is `OUT.run.json` beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .backends import pipelines
from .shared.errors import DiffcliError
from .shared.devices import PerSampleRandn
from .shared.files import read_json_option
from .shared.names import read_prompts_file, check_file_names, unique_stems
from .shared.records import run_record_path, write_run_json
from .shared.images import save_image
from .shared.dist import Dist
from .shared.tasks import Task, run_tasks
from .shared.limits import BATCH_MAX, SIDE_MAX, check_image_size
from .shared.fields import check_fields, opt, redefault
from .runner import Command, RunContext, generating
from .options import (FlowOptions, GuidanceOptions, SamplingOptions, apply_flow_options, default_cfg,
                      check_guidance, check_particles, check_pipeline_steps,
                      check_sampling, cost_of, guidance_of, record as options_record, seg_layers)
from .core.sync import CASES, NOISES, rows_of, sample_views
from .data.prompt_files import key_line, resolve_prompts_file
from .core.views import ViewSet, windows
from .core.regions import Bootstrap, bootstrapped, flat_colours, gather_rows, prompt_weights, region_views, \
    zero_weight_cells

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-base"


DEFAULT_CFG = 7.5  # --cfg's default (003); guidance-distilled models (Flux dev/schnell): 1, no CFG


@dataclass(kw_only=True)
class PanoramaConfig(GuidanceOptions, SamplingOptions, FlowOptions):
    prompt: str | None = opt(None, argument=True, panel="input", help="Text prompt (or --prompts-file).")
    prompts_file: str | None = opt(None, "--prompts-file", panel="input",
                                   help="003 wide_image_prompts.json (prompt and eval_pos per entry), a text file (one "
                                        "prompt a line), or 'assignment' for the shipped 003 set "
                                        "(prompts/wide_image_prompts.json).")
    model: str = opt(DEFAULT_MODEL, "--model", panel="model",
                     help="SD 1.x/2.x, SDXL, SD3 or Flux pipeline: a local folder (save_pretrained layout) or a hub id in the "
                          "cache.")
    height: int = opt(512, panel="sampling", check="count", high=SIDE_MAX,
                      help="Image height in px (multiple of 8; taller than a window gives a tall image).")
    width: int = opt(3072, panel="sampling", check="count", high=SIDE_MAX, help="Image width in px (multiple of 8).")
    # latent cells; default the UNet's sample size (64 for SD 2 base = 512 px)
    window: int | None = opt(None, panel="sampling", check="count", high=SIDE_MAX,
                             help="Window size in latent cells (default: the UNet's sample size, 64 = 512 px for SD 2 "
                                  "base).")
    stride: int = opt(8, panel="sampling", check="count", high=SIDE_MAX,  # latent cells (64 px)
                      help="Window stride in latent cells (8 = 64 px); the last window is flush with the border.")
    sampler: str | None = redefault(SamplingOptions, "sampler", "euler")   # on the scheduler's sigmas: DDIM (003)
    steps: int | None = redefault(SamplingOptions, "steps", 50)
    cfg: float | None = redefault(GuidanceOptions, "cfg", None)  # None: DEFAULT_CFG; 1 (off) on guidance-distilled Flux
    negative_prompt: str | None = opt(None, "--negative-prompt", panel="input",
                                      help="Prompt of the unconditional CFG branch (default: empty).")
    seed: int = opt(1, panel="sampling", check="seed",
                    help="Seed of the canvas noise (003: 1; every prompt uses it).")
    sync: str = opt("x0", panel="sampling", choices=tuple(CASES),
                    help="What the windows agree on each step: x0 (SyncTweedies), eps, xt, or none (unsynchronized).")
    noise: str = opt("canvas", panel="sampling", choices=tuple(NOISES),
                     help="Initial noise: canvas (drawn on the canvas and cropped, 003) or views (one draw per window).")
    view_batch: int = opt(8, "--view-batch", panel="sampling", check="count", high=BATCH_MAX,
                          help="Windows per network batch (x2 with CFG).")
    # latent cells between decoded tiles; default the stride (003: 64 px)
    decode_stride: int | None = opt(None, "--decode-stride", panel="output", check="count", high=SIDE_MAX,
                                    help="Latent cells between decoded VAE tiles, averaged where they overlap "
                                         "(default: --stride).")
    decode_batch: int = opt(4, "--decode-batch", panel="output", check="count", high=BATCH_MAX,
                            help="VAE tiles decoded at once (memory does not grow with the width).")
    eval_pos: list[int] | None = opt(None, "--eval-pos", panel="output", cli_type=Optional[str],
                                     to_config=lambda text: parse_positions(text),
                                     help="x offsets (px) of window-sized crops written as <Prompt>_<pos>.png, e.g. "
                                          "243,1005 (overrides the prompts file's).")
    dtype: str | None = opt(None, panel="model", help="fp32, fp16 or bf16 (default: fp16 on CUDA, else fp32).")
    circular: bool = opt(False, "--circular", panel="sampling",
                         help="A 360-degree panorama: windows, initial noise and the tiled decode wrap around the "
                              "side border, so the left and right edges join.")
    region_boxes: list[str] = opt(None, "--region", factory=list, panel="input", cli_default=None,
                                  cli_type=Optional[list[str]], to_config=lambda v: list(v or []),
                             help="A region prompt 'X0,Y0,X1,Y1:prompt' (a box in px, repeatable): the prompt "
                                  "drives the canvas inside the box, the main prompt (the background) the rest.")
    region_masks: list[str] = opt(None, "--region-mask", factory=list, panel="input", cli_default=None,
                                  cli_type=Optional[list[str]], to_config=lambda v: list(v or []),
                                  help="A region prompt 'FILE.png:prompt' (repeatable): a greyscale mask the size of "
                                       "the image, white where the prompt applies (grey: partly).")
    bootstrap: float = opt(0.2, "--bootstrap", panel="sampling", check="finite", low=0.0, high=1.0,
                           help="Region prompts: the fraction of steps in which each region is generated over a "
                                "random flat colour outside its mask (MultiDiffusion's bootstrapping; 0: off).")


@dataclass
class Region:
    """A region prompt: its pixel mask (H, W) in [0, 1] and where it came from (for messages and the record)."""
    prompt: str
    source: str
    mask: torch.Tensor = field(repr=False, default=None)

    def record(self) -> dict[str, str]:
        return {"prompt": self.prompt, "region": self.source}


@dataclass
class Job:
    prompt: str
    eval_pos: list[int] = field(default_factory=list)
    stem: str = ""  # its files' stem, set by `name_jobs` (the one naming rule: no two prompts share a file)
    regions: list[Region] = field(default_factory=list)

    @property
    def label(self) -> str:
        """What names its files: the background prompt, or the regions' prompts when there is none."""
        return self.prompt or " + ".join(r.prompt for r in self.regions)


# ---------------------------------------------------------------- input

def parse_positions(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise DiffcliError(f"--eval-pos expects comma-separated pixel offsets like 243,1005, got {text!r}") from None


def read_wide_prompts(path: str) -> list[Job]:
    """003's wide_image_prompts.json ({key: {prompt, eval_pos}}), or a text file with one prompt a line."""
    if not path.endswith(".json"):
        return [Job(p) for p in read_prompts_file(path)]
    data = read_json_option(path, "--prompts-file", "prompts file")
    if not isinstance(data, dict) or not data:
        raise DiffcliError(f"--prompts-file {path}: expected a JSON object {{key: {{prompt, eval_pos}}}}")
    jobs = []
    for key, rec in data.items():
        where = f"--prompts-file {path}: entry {key!r}{key_line(path, key)}"
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise DiffcliError(f"{where} needs a string field 'prompt'")
        pos = rec.get("eval_pos", [])
        if not isinstance(pos, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in pos):
            raise DiffcliError(f"{where}: 'eval_pos' must be a list of integer pixel offsets")
        jobs.append(Job(rec["prompt"], pos))
    return jobs


def split_region(spec: str, flag: str, what: str) -> tuple[str, str]:
    where, sep, prompt = spec.partition(":")
    if not sep or not where.strip() or not prompt.strip():
        raise DiffcliError(f"{flag} {spec!r}: expected '{what}:prompt'")
    return where.strip(), prompt.strip()


def read_regions(cfg: PanoramaConfig) -> list[Region]:
    """--region boxes and --region-mask files -> pixel masks of the image's size, each refused in one line when it
    cannot apply (malformed, outside the image, unreadable, the wrong size, empty)."""
    from PIL import Image, UnidentifiedImageError
    regions = []
    for spec in cfg.region_boxes:
        where, prompt = split_region(spec, "--region", "X0,Y0,X1,Y1")
        try:
            x0, y0, x1, y1 = (int(v) for v in where.split(","))
        except ValueError:
            raise DiffcliError(f"--region {spec!r}: expected 'X0,Y0,X1,Y1:prompt' with integer pixels") from None
        if not (0 <= x0 < x1 <= cfg.width and 0 <= y0 < y1 <= cfg.height):
            raise DiffcliError(f"--region {spec!r}: the box must lie inside the {cfg.width}x{cfg.height} px image "
                               f"with X0 < X1 and Y0 < Y1")
        mask = torch.zeros(cfg.height, cfg.width)
        mask[y0:y1, x0:x1] = 1
        regions.append(Region(prompt, where, mask))
    for spec in cfg.region_masks:
        path, prompt = split_region(spec, "--region-mask", "FILE.png")
        try:
            with Image.open(path) as im:
                grey = im.convert("L")
                size = grey.size
                mask = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).float().div(255)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DiffcliError(f"--region-mask {path}: cannot read it as an image ({e.__class__.__name__})") from None
        if size != (cfg.width, cfg.height):
            raise DiffcliError(f"--region-mask {path}: is {size[0]}x{size[1]} px, the image is "
                               f"{cfg.width}x{cfg.height}")
        mask = mask.view(cfg.height, cfg.width)
        if not (mask > 0).any():
            raise DiffcliError(f"--region-mask {path}: the mask is black everywhere (no pixel for its prompt)")
        regions.append(Region(prompt, str(Path(path).resolve()), mask))  # eval --app regions reads it from anywhere
    return regions


def jobs_of(cfg: PanoramaConfig) -> list[Job]:
    if cfg.region_boxes or cfg.region_masks:
        if cfg.prompts_file is not None:
            raise DiffcliError("region prompts take one background prompt, not --prompts-file")
        if cfg.prompt is not None and not cfg.prompt.strip():
            raise DiffcliError("the prompt is empty")
        regions = read_regions(cfg)
        if cfg.prompt is None:  # no background: the regions must cover the image between them
            bare = int((torch.stack([r.mask for r in regions]).sum(0) <= 0).sum())
            if bare:
                raise DiffcliError(f"the regions leave {bare} px with zero total weight and there is no background "
                                   "prompt: cover the image or give a prompt")
        return [Job(cfg.prompt or "", list(cfg.eval_pos or []), regions=regions)]
    if (cfg.prompt is None) == (cfg.prompts_file is None):
        raise DiffcliError("give a prompt or --prompts-file (one of them): diffcli panorama \"a beach at sunrise\"")
    if cfg.prompt is not None:
        if not cfg.prompt.strip():
            raise DiffcliError("the prompt is empty")
        return [Job(cfg.prompt, list(cfg.eval_pos or []))]
    jobs = read_wide_prompts(resolve_prompts_file(cfg.prompts_file, "wide_image_prompts.json"))
    if cfg.eval_pos is not None:  # the command line wins over the file
        jobs = [Job(j.prompt, list(cfg.eval_pos)) for j in jobs]
    return jobs


def validate(cfg: PanoramaConfig) -> list[Job]:
    """Everything checkable before a model is loaded; returns the prompts to run."""
    if cfg.ag_model is not None:
        raise DiffcliError("--ag-model: autoguidance runs in sample, seg and pg; panorama does not take it yet")
    for name in ("height", "width"):
        v = getattr(cfg, name)
        if v < 8 or v % 8:
            raise DiffcliError(f"--{name} {v}: must be a positive multiple of 8 px")
    if cfg.window is not None and cfg.window < 1:
        raise DiffcliError("--window must be >= 1 latent cell")
    if cfg.stride < 1 or (cfg.window is not None and cfg.stride > cfg.window):
        raise DiffcliError(f"--stride {cfg.stride} must be between 1 and the window size"
                           f"{f' ({cfg.window})' if cfg.window else ''}")
    if cfg.decode_stride is not None and cfg.decode_stride < 1:
        raise DiffcliError("--decode-stride must be >= 1")
    for name in ("view_batch", "decode_batch"):
        if getattr(cfg, name) < 1:
            raise DiffcliError(f"--{name.replace('_', '-')} must be >= 1")
    check_fields(cfg, ["height", "width", "window", "stride", "decode_stride"])  # the upper limits
    check_image_size(cfg.height, cfg.width)
    check_fields(cfg, ["view_batch", "decode_batch", "seed"])
    check_sampling(cfg, pipeline=True)
    check_guidance(cfg, views=True)
    check_particles(cfg, 1, pipeline=True, what="the number of canvases a prompt (panorama draws one)")
    check_fields(cfg, ["sync", "noise", "bootstrap"])
    jobs = jobs_of(cfg)
    for job in jobs:  # the crop size needs the model (plan checks the crops); a start outside is wrong anyway
        bad = [p for p in job.eval_pos if not 0 <= p < cfg.width]
        if bad:
            raise DiffcliError(f"eval position(s) {bad} lie outside the {cfg.width} px wide image")
    return name_jobs(jobs)


def name_jobs(jobs: list[Job]) -> list[Job]:
    """Each prompt's stem under the one naming rule (`shared.names.unique_stems`): a prompt whose panorama or crops
    would take a file an earlier prompt writes ('a cat' and 'a/cat'; 'a cat 64' and the crop of 'a cat' at 64)
    gets `-2`, `-3`, ..."""
    stems = unique_stems([j.label for j in jobs], lambda i, stem: files_of(stem, jobs[i].eval_pos))
    for job, stem in zip(jobs, stems):
        job.stem = stem
    return jobs


def files_of(stem: str, eval_pos: list[int]) -> list[str]:
    return [f"{stem}.png"] + [f"{stem}_{pos}.png" for pos in eval_pos]


@dataclass
class Plan:
    """Sizes in latent cells, fixed once the model is known."""
    latent: tuple[int, int, int]
    window: int
    scale: int        # pixels per latent cell
    views: ViewSet
    tiles: list       # decode windows (latent)
    masks: torch.Tensor | None = None  # region prompts: (R, h, w) latent masks, each cell its pixels' mean

    @property
    def crop(self) -> int:
        return self.window * self.scale


def plan(pipe, cfg: PanoramaConfig, jobs: list[Job]) -> Plan:
    family = pipelines.pipeline_family(pipe)
    f = family.scale_factor
    window = cfg.window or family.native_size() // f
    family.check_size(window * f, window * f, ("--window (in px)", "--window (in px)"))
    for name, v in (("height", cfg.height), ("width", cfg.width)):
        if v % f:
            raise DiffcliError(f"--{name} {v}: must be a multiple of {f} px (one latent cell)")
        if v < window * f:
            raise DiffcliError(f"--{name} {v} px is smaller than one window ({window} latent cells = {window * f} px)")
    if cfg.stride > window:
        raise DiffcliError(f"--stride {cfg.stride} must be between 1 and the window size ({window})")
    if cfg.circular and cfg.width < window * f:
        raise DiffcliError(f"--circular: the window ({window * f} px) is wider than the canvas ({cfg.width} px)")
    latent = family.latent_shape(cfg.height, cfg.width)
    for job in jobs:
        bad = [p for p in job.eval_pos if p < 0 or p + window * f > cfg.width]
        if bad:
            raise DiffcliError(f"eval position(s) {bad} lie outside the image: a {window * f} px crop must start in "
                               f"[0, {cfg.width - window * f}]")
    views = ViewSet(windows(latent[1], latent[2], (window, window), cfg.stride, cfg.circular), latent)
    tiles = windows(latent[1], latent[2], (window, window), min(cfg.decode_stride or cfg.stride, window), cfg.circular)
    masks = None
    regions = [r for job in jobs for r in job.regions]
    if regions:
        masks = torch.nn.functional.avg_pool2d(torch.stack([r.mask for r in regions])[:, None], f)[:, 0]
        for r, m in zip(regions, masks):
            if not (m > 0).any():  # cannot happen for a mask with a lit pixel; kept for a model's own rounding
                raise DiffcliError(f"region {r.source!r} covers no latent cell")
        weights = prompt_weights(masks, bool(jobs[0].prompt))
        bare = zero_weight_cells(weights)
        if bare:
            raise DiffcliError(f"the regions leave {bare} latent cell(s) with zero total weight")
    return Plan(latent, window, f, views, tiles, masks)


# ---------------------------------------------------------------- sampling and decoding

@torch.no_grad()
def generate(pipe, p: Plan, prompt: str, cfg: PanoramaConfig, device: torch.device,
             on_step: Callable[[dict], None] | None = None,
             regions: list[Region] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (3, H, W) in [-1, 1] on the CPU, final latent canvas in our x = x0 + sigma n form).

    Each window runs the guidance stack (CFG, SEG with `--blur`) on its own rows; the windows are synchronized."""
    family = pipelines.pipeline_family(pipe)
    sigmas = family.sigmas(cfg.steps, device, cfg.schedule or "scheduler")
    size = p.window * p.scale
    prompts = [prompt] if regions is None else [prompt] * bool(prompt) + [r.prompt for r in regions]
    cond, uncond = family.encode_prompts(prompts, cfg.negative_prompt, size, size, device)
    base, guidance = family.denoiser(), guidance_of(cfg, default_cfg(family, cfg.cfg, DEFAULT_CFG))
    views, boot = p.views, None
    if regions:  # every (window, prompt) pair an instance, weighted by the prompt's mask (core/regions.py)
        instances = region_views(p.views.views, prompt_weights(p.masks, bool(prompt)), p.latent)
        views = instances.views
        cond, uncond = gather_rows(cond, instances.prompt), gather_rows(uncond, instances.prompt)
        boot = bootstrap_of(family, p, cfg, sigmas, len(regions), bool(prompt), device)
    make = lambda a, b: guidance.denoiser(base, rows_of(cond, a, b), rows_of(uncond, a, b), sigmas,  # noqa: E731
                                          limit=family.limit)
    if regions:
        make = bootstrapped(make, boot, instances)
    rng = PerSampleRandn([cfg.seed], device)
    state = family.state_dtype(device)
    with guidance.installed(family.attention):
        w = sample_views(make, views, sigmas, lambda shape: rng.randn(shape)[0].to(state),
                         (p.latent[0], p.window, p.window), sampler=cfg.sampler, case=cfg.sync, noise=cfg.noise,
                         view_batch=cfg.view_batch, knobs=cfg.knobs(), callback=on_step,
                         start_scale=family.start_scale(sigmas[0]))
    z = views.average(w)
    return decode_tiled(family, z, sigmas[-1], p.tiles, cfg.decode_batch), z


def bootstrap_of(family, p: Plan, cfg: PanoramaConfig, sigmas: torch.Tensor, regions: int, background: bool,
                 device: torch.device) -> Bootstrap | None:
    """The flat colours and noise of --bootstrap (core/regions.py): round(F x steps) steps, a colour per region and
    step drawn from --seed, the canvas noise as drawn at the start."""
    steps = round(cfg.bootstrap * (len(sigmas) - 1))
    if steps == 0:
        return None
    rgb = torch.rand(steps * regions, 3, generator=torch.Generator().manual_seed(cfg.seed))
    side = min(p.window, 8) * p.scale  # 8 latent cells: a flat colour's latent, averaged (regions.flat_colours)
    colours = torch.cat([flat_colours(family.encoded, part.to(device), side).cpu() for part in rgb.split(16)])
    noise = PerSampleRandn([cfg.seed], device).randn(p.latent)[0]  # the start's canvas noise (as the paper's code)
    return Bootstrap(colours.view(steps, regions, -1), noise, sigmas, background)


@torch.no_grad()
def decode_tiled(pipe, z: torch.Tensor, sigma_last: torch.Tensor | float, tiles: list, batch: int) -> torch.Tensor:
    """Latent canvas (C, h, w) -> image (3, H, W): overlapping tiles decoded `batch` at a time and averaged, so
    the VAE's memory depends on the tile, not on the width (003: 512 px tiles, stride 64 px)."""
    family = pipelines.pipeline_family(pipe)
    f = family.scale_factor
    acc = torch.zeros(3, z.shape[-2] * f, z.shape[-1] * f)
    count = torch.zeros(1, *acc.shape[1:])
    for a in range(0, len(tiles), batch):
        part = tiles[a:a + batch]
        images = family.decode(torch.stack([t.view(z) for t in part]), sigma_last)
        for t, image in zip(part, images):
            t.scaled(f).accumulate(acc, image)
            t.scaled(f).accumulate(count, torch.ones(1, *image.shape[1:]))
    return acc / count


def crops(image: torch.Tensor, positions: list[int], size: int) -> list[torch.Tensor]:
    """The 003 evaluation crops: size x size at x = pos, from the top."""
    return [image[:, :size, pos:pos + size] for pos in positions]


# ---------------------------------------------------------------- the command

def outputs(job: Job) -> list[str]:
    """The files one prompt writes: the panorama and its evaluation crops (the 003 layout)."""
    return files_of(job.stem or unique_stems([job.label])[0], job.eval_pos)


def run(cfg: PanoramaConfig, out: Path, overwrite: bool, device_name: str | None,
        options: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    jobs = validate(cfg)
    check_file_names(out, [f for job in jobs for f in outputs(job)])  # a name too long fails now, not after the work
    with Dist(device_name) as dist:
        return _run(cfg, jobs, out, overwrite, resume, dist, options)


def _run(cfg: PanoramaConfig, jobs: list[Job], out: Path, overwrite: bool, resume: bool, dist: Dist,
         options: dict[str, Any]) -> dict[str, Any]:
    """Prompts are jobs: torchrun ranks take every world-th one, --resume skips those whose files all exist."""
    device = dist.device
    dtype = pipelines.pipeline_dtype(cfg.dtype, device, cfg.model)
    record_file = run_record_path(out, COMMAND.record_beside)  # OUT.run.json: OUT holds only the images the grader opens
    family = pipelines.load_family(cfg.model, device, dtype, offload=cfg.offload)
    apply_flow_options(family, cfg)
    cfg = replace(cfg, cfg=default_cfg(family, cfg.cfg, DEFAULT_CFG))
    if family.pixel_space:
        raise DiffcliError(f"{cfg.model!r} is a DeepFloyd IF pipeline; panorama needs a latent model (SD 1.x/2.x, SDXL, SD3, "
                           "Flux)")
    p = plan(family, cfg, jobs)
    check_pipeline_steps(family.pipe, cfg.steps, cfg.schedule)
    seg_layers(family.attention, cfg, "--layers")
    record = {**options_record(cfg), **options}
    out = dist.begin(out, overwrite, resume, "panorama", record, record_path=record_file, model=cfg.model)

    def draw(mine: list[Task], advance) -> Iterator[tuple]:
        for todo in mine:
            job = todo.item
            image, _ = generate(family, p, job.prompt, cfg, device, lambda info: advance(1), job.regions or None)
            images = [image] + crops(image, job.eval_pos, p.crop)
            facts = [{"prompt": job.prompt}] + [{"prompt": job.prompt, "crop_x": pos} for pos in job.eval_pos]
            yield from ((path, save_image, picture, fact) for path, picture, fact in zip(todo.files, images, facts))

    files = [f for job in jobs for f in outputs(job)]
    done = run_tasks(dist, [Task(job, tuple(out / f for f in outputs(job))) for job in jobs], draw, resume=resume,
                    label="panorama", work=lambda todo: cfg.steps, finish=lambda done: write_run_json(
                        out, "panorama", record, device, record_path=record_file, status="complete", model=cfg.model,
                        world_size=dist.world, windows=len(p.views), window_px=p.crop, latent=list(p.latent),
                        decode_tiles=len(p.tiles), files=files, circular=cfg.circular,
                        prompts=[{"prompt": j.prompt, "eval_pos": j.eval_pos, "stem": j.stem,
                                  **({"regions": [r.record() for r in j.regions]} if j.regions else {})}
                                 for j in jobs],
                        cost=cost_of(cfg, cfg.cfg, cfg.sampler, cfg.steps, views=len(p.views))))
    return {"out": str(out), "run_record": str(record_file), "images": len(jobs), "crops": len(files) - len(jobs),
            "windows": len(p.views), "skipped": done.skipped, "main": dist.main}


def main(cfg: PanoramaConfig, ctx: RunContext) -> dict[str, Any]:
    """`diffcli panorama`: run every prompt and say what was written."""
    result = run(cfg, ctx.out, ctx.overwrite, ctx.device, ctx.options(), resume=ctx.resume)
    if result["main"]:
        skipped = f" ({result['skipped']} prompt(s) already there)" if ctx.resume else ""
        ctx.echo(f"wrote {result['images']} image(s) of {result['windows']} windows and {result['crops']} crop(s)"
                 f"{skipped} to {result['out']}")
    return result


COMMAND = Command(
    "panorama", PanoramaConfig, validate, main,
    context=generating("diffcli-out/panorama",
                       "Continue an interrupted run in --out (same options): prompts whose files all exist are "
                       "skipped.",
                       "Output folder: only the images (the 003 wide_images layout, gradable as written); "
                       "OUT.run.json goes beside it."),
    record_beside=True,
    scores=("clip", "fid", "kid"), clip_app="wide_images",
    help="""Wide or tall images by synchronized diffusion over overlapping windows (SyncTweedies).

    Example: diffcli panorama "A beach scene at sunrise with golden sands" --eval-pos 243,1005 --out wide_images

    Example: diffcli panorama --prompts-file assignment --out wide_images && diffcli eval wide_images --app wide_images
    """)
