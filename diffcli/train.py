"""diffcli train: EDM training (Karras et al. 2022) with EMA, atomic resumable checkpoints and DDP.

Every random draw of step k comes from a generator seeded with (seed, k) and the data order of epoch e
from (seed, e), so the state to resume is just weights, EMA, optimizer and step: a run killed at any
point and resumed ends with the same weights as one never interrupted.
"""
from __future__ import annotations

import copy
import json
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .core.blurring import (DEFAULT_STEPS as BLURRING_STEPS, BlurringLoss, check_blur_sigma, get_ts, sample_blurring,
                            schedule_of)
from .runner import Command, RunContext
from .shared.errors import DiffcliError
from .shared.fields import check_fields, opt
from .shared.devices import PerSampleRandn
from .shared.checkpoints import (add_prefix, flatten_state, load_checkpoint, save_checkpoint, strip_prefix,
                                 unflatten_state)
from .shared.files import clear_temp_files, prepare_out_dir
from .shared.images import save_grid, save_image, to_model_range
from .shared.records import note_run, write_run_json
from .shared.inputs import read_json
from .data.datasets import BatchOrder, ImageSet, load_dataset, mnist_digit_tiles
from .core.denoisers import EDMPrecond
from .shared.dist import Dist
from .backends.models import EDM_STEPS, MODEL_FORMAT, build_model, snapshot_path
from .backends.nets import PRESETS, count_params, net_config
from .shared.limits import (BATCH_MAX, CHANNELS_MAX, CONTEXT_FRAMES_MAX, PREVIEW_MAX, SIDE_MAX, SIGMA_LIMIT,
                            TRAIN_SEED_MAX, TRAIN_STEPS_MAX, check_batch_memory, check_image_size, count, finite,
                            seed as check_seed)
from .core.samplers import get_sigmas_karras, sample_heun
from .data.sequences import CARRIED_DIGITS, SEQUENCE_DIGITS, make_item, spec_from_record, strip, tiles_of


@dataclass
class EDMLoss:
    """EDM eq. 2 with ln(sigma) ~ N(P_mean, P_std^2) and weight 1/c_out^2 = (s^2 + sd^2) / (s sd)^2."""
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5

    def draw(self, batch: int, shape: tuple[int, ...], gen: torch.Generator):
        """The random part of one step, drawn on CPU for the whole global batch (ranks slice their shard)."""
        sigma = (torch.randn(batch, generator=gen) * self.P_std + self.P_mean).exp()
        noise = torch.randn((batch, *shape), generator=gen)
        return sigma, noise

    def process_record(self) -> dict[str, Any]:
        """What a checkpoint says about its process (the sampler's default sigma range)."""
        return {"kind": "edm", "sigma_data": self.sigma_data, "sigma_min": 0.002, "sigma_max": 80.0}

    def __call__(self, model: nn.Module, images: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                 labels: torch.Tensor | None, **cond: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, 1, 1, 1)
        weight = (s ** 2 + self.sigma_data ** 2) / (s * self.sigma_data) ** 2
        denoised = model(images + s * noise, sigma, labels, **cond)
        return (weight * (denoised - images) ** 2).mean()


BLUR_SIGMA_MAX, P_MEAN, P_STD = 20.0, -1.2, 1.2  # the process options' defaults (None: not given)


@dataclass
class TrainConfig:
    dataset: str = opt("mnist", panel="input",
                       help="mnist, fashion-mnist, cifar10, folder:PATH, or a next-frame sequence set made from the "
                            "MNIST digits under --data-root: moving-mnist, circle-jumping, horizontal.")
    data_root: str = opt("data", panel="input", help="Where torchvision-layout datasets live (or are downloaded to).")
    split: str = opt("train", panel="input", help="train or test split of the dataset.")
    image_size: int | None = opt(None, panel="input", check="count", high=SIDE_MAX,
                                 help="Resize images to this size (default: native); for sequence sets the frame size "
                                      "(default 32; digits are half of it).")
    channels: int | None = opt(None, panel="input", help="1 or 3 for folder datasets (default: from the files).")
    conditional: bool = opt(True, "--unconditional", name="unconditional", cli_default=False, panel="model",
                            to_config=lambda unconditional: not unconditional, help="Ignore labels.")
    p_uncond: float = opt(0.2, panel="model", check="finite", high=1.0,
                          help="Label dropout probability (one model does CFG).")
    process: str = opt("edm", panel="model",  # or "blurring" (Hoogeboom & Salimans 2023): the loss and the model kind
                       help="edm (Karras et al. 2022) or blurring (Hoogeboom & Salimans 2023: DCT heat dissipation "
                            "under cosine noise, eps-prediction).")
    # blurring only (None: 20); 0 = plain DDPM-style diffusion
    blur_sigma_max: float | None = opt(None, "--blur-sigma-max", panel="model", check="finite", high=SIGMA_LIMIT,
                                       help="blurring: largest blur std in pixels, sigma_B,max (default 20; 0 = plain "
                                            "DDPM-style diffusion).")
    # edm only: ln(sigma) ~ N(p_mean, p_std^2) during training (None: -1.2 and 1.2)
    p_mean: float | None = opt(None, "--p-mean", panel="model", check="finite", low=-10.0, high=10.0,
                               help=f"edm: mean of ln(sigma) drawn in training (default {P_MEAN}; higher = more "
                                    "training at high noise, where a digit's class is decided).")
    p_std: float | None = opt(None, "--p-std", panel="model", check="finite", above=True, high=10.0,
                              help=f"edm: standard deviation of ln(sigma) drawn in training (default {P_STD}).")
    net: str = opt("small", panel="model", help="Architecture preset: small, tiny, base.")
    net_overrides: dict[str, Any] = field(default_factory=dict)  # --block-channels: {"block_out_channels": [...]}
    steps: int = opt(10_000, panel="sampling", check="count", high=TRAIN_STEPS_MAX,
                     help="Total optimizer steps (a resumed run may raise it).")
    batch: int = opt(64, panel="sampling", check="count", high=BATCH_MAX,
                     help="Global batch size (split across torchrun processes).")
    lr: float = opt(1e-3, panel="sampling", check="finite", above=True, help="Adam learning rate.")
    lr_warmup: int = opt(200, panel="sampling", check="count", low=0, high=TRAIN_STEPS_MAX,
                         help="Linear warm-up steps.")
    ema_halflife_kimg: float = opt(20.0, panel="sampling", check="finite", help="EMA half-life in thousands of images.")
    ema_rampup: float = 0.05
    seed: int = opt(0, panel="sampling", check="seed", high=TRAIN_SEED_MAX)
    ckpt_every: int = opt(500, panel="output", check="count", low=0, high=TRAIN_STEPS_MAX,
                          help="Checkpoint every N steps (0: only at the end).")
    # keep the EMA model of every N-th step as snapshots/step-NNNNNNN.safetensors
    snapshot_every: int = opt(0, "--snapshot-every", panel="output", check="count", low=0, high=TRAIN_STEPS_MAX,
                              help="Also keep the EMA model of every N-th step as snapshots/step-NNNNNNN.safetensors "
                                   "(0: none); sample, pg and sweep read one as --checkpoint RUN@STEP.")
    grid_every: int = opt(1000, panel="output", check="count", low=0, high=TRAIN_STEPS_MAX,
                          help="Sample grid every N steps (0: never).")
    log_every: int = opt(50, panel="output", check="count", low=0, high=TRAIN_STEPS_MAX,
                         help="Loss log line every N steps.")
    precision: str = "fp32"  # or bf16: autocast for the forward/backward, fp32 weights and optimizer (TrainArgs)
    sequence: dict[str, Any] = field(default_factory=dict)  # sequence datasets: --context-frames etc. as given


@dataclass(kw_only=True)
class TrainArgs:
    """The command line's own train options: --block-channels (-> TrainConfig.net_overrides), the sequence-set
    options (-> TrainConfig.sequence, only those given), --precision (train's `precision`) and --preview."""
    block_channels: str | None = opt(None, "--block-channels", name="channels_mult", panel="model",
                                     help="Override block widths, e.g. 32,64,96.")
    precision: str | None = opt(None, panel="model",
                                help="fp32 (default) or bf16 autocast; on --resume, changes the run's.")
    context_frames: int | None = opt(None, "--context-frames", panel="input",
                                     help="Sequence sets: frames the model sees before the one it predicts (default 2).")
    step_size: int | None = opt(None, "--step-size", panel="input",
                                help="Sequence sets: pixels the digit moves a frame (default 4; moving-mnist: the "
                                     "largest velocity component).")
    directions: int | None = opt(None, "--directions", panel="input",
                                 help="circle-jumping: K equally likely jump directions on the circle (default 4).")
    p_left: float | None = opt(None, "--p-left", panel="input",
                               help="horizontal: probability that the digit moves left (default 0.5).")
    p_change: float | None = opt(None, "--p-change", panel="input",
                                 help="moving-mnist: probability that the velocity is redrawn before each move "
                                      "(default 0: constant velocity).")
    num_digits: int | None = opt(None, "--num-digits", panel="input",
                                 help="moving-mnist: 1 (default) or 2 digits moving independently.")
    data_seed: int | None = opt(None, "--data-seed", panel="input",
                                help="Sequence sets: seed of the generated motions (default 0).")
    preview: int = opt(0, "--preview", panel="output",
                       help="Write OUT/preview.png with this many example sequences (context | next frame | every "
                            "allowed future) and exit without training.")


@dataclass
class TrainJob:
    """What `diffcli train` does: train `config` (at `precision`, None: the run's own), or with `preview` > 0 only
    write that many example sequences."""
    config: TrainConfig
    precision: str | None = None
    preview: int = 0


def ema_beta(cfg: TrainConfig, step: int) -> float:
    """EDM's EMA: half-life in images, ramped up with the number of images seen so far."""
    nimg = (step + 1) * cfg.batch
    halflife = cfg.ema_halflife_kimg * 1000
    if cfg.ema_rampup:
        halflife = min(halflife, nimg * cfg.ema_rampup)
    return 0.5 ** (cfg.batch / max(halflife, 1e-8))


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


PROCESSES = ("edm", "blurring")


def given_process_options(cfg: TrainConfig) -> TrainConfig:
    """Refuse a process option of the other process (only given ones: None means not given), then fill in the
    defaults: what `train` and `write_preview` run and record."""
    if cfg.blur_sigma_max is not None and cfg.process != "blurring":
        raise DiffcliError("--blur-sigma-max is a --process blurring option")
    if (cfg.p_mean is not None or cfg.p_std is not None) and cfg.process != "edm":
        raise DiffcliError("--p-mean and --p-std are --process edm options")
    return replace(cfg, blur_sigma_max=BLUR_SIGMA_MAX if cfg.blur_sigma_max is None else cfg.blur_sigma_max,
                   p_mean=P_MEAN if cfg.p_mean is None else cfg.p_mean,
                   p_std=P_STD if cfg.p_std is None else cfg.p_std)


def make_loss(cfg: TrainConfig) -> EDMLoss | BlurringLoss:
    """The process switch: the loss draws the noise level and says what the model is; the loop is shared."""
    return BlurringLoss(cfg.blur_sigma_max) if cfg.process == "blurring" else EDMLoss(cfg.p_mean, cfg.p_std)


def model_record(cfg: TrainConfig, ds: ImageSet, net_cfg: dict[str, Any], loss: EDMLoss | BlurringLoss,
                 step: int) -> dict[str, Any]:
    return {**loss.process_record(), "format": MODEL_FORMAT, "net": net_cfg,
            "num_classes": ds.num_classes if cfg.conditional else 0,
            "class_names": ds.class_names if cfg.conditional else [],
            "image_size": int(ds.images.shape[-1]), "channels": int(ds.images.shape[1]),
            "dataset": ds.name, "split": cfg.split, "train_step": step, "train_images": step * cfg.batch,
            **({"context_frames": int(ds.context.shape[1]), "sequence": ds.sequence} if ds.context is not None else {})}


# ---------------------------------------------------------------- checkpoints

def save_state(run_dir: Path, cfg: TrainConfig, record: dict, step: int, model: EDMPrecond, ema: EDMPrecond,
               opt: torch.optim.Optimizer, digits: torch.Tensor | None = None) -> None:
    """training-state.safetensors (resume) then model.safetensors (EMA weights for sampling); each atomic."""
    opt_tensors, opt_skel = flatten_state(opt.state_dict(), "optim")
    tensors = {**add_prefix(model.net.state_dict(), "net."), **add_prefix(ema.net.state_dict(), "ema."), **opt_tensors}
    meta = {"model": record, "train": {"config": asdict(cfg), "step": step, "optim": opt_skel}}
    save_checkpoint(run_dir / "training-state.safetensors", tensors, meta)
    save_checkpoint(run_dir / "model.safetensors", model_tensors(ema, digits), {"model": record})


def model_tensors(ema: EDMPrecond, digits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What a model file holds: the EMA net's weights and, for a next-frame model, the digit tiles of its first
    CARRIED_DIGITS sequences (contexts.SEQUENCE_DIGITS), so `--context N` regenerates those sequences, truth
    included, with no MNIST on disk."""
    carried = {} if digits is None else {SEQUENCE_DIGITS: digits[:CARRIED_DIGITS].contiguous()}
    return {**add_prefix(ema.net.state_dict(), "net."), **carried}


def load_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = run_dir / "training-state.safetensors"
    if not path.is_file():
        raise DiffcliError(f"nothing to resume: {path} does not exist")
    tensors, meta = load_checkpoint(path)
    if "train" not in meta:
        raise DiffcliError(f"{path} is not a training state (no 'train' record)")
    train_meta = meta["train"]
    if not (isinstance(train_meta, dict) and isinstance(train_meta.get("config"), dict)
            and isinstance(train_meta.get("optim"), dict)):
        raise DiffcliError(f"{path}: its 'train' record is malformed (needs config, step and optim); it cannot be "
                           "resumed")
    count(f"{path}: the 'train' record's step", train_meta.get("step"), 0, TRAIN_STEPS_MAX)
    return tensors, meta


def saved_config(train_meta: dict[str, Any], path: Path) -> TrainConfig:
    """The TrainConfig a training state recorded (checked by `_validate` with the rest)."""
    try:
        return TrainConfig(**train_meta["config"])
    except TypeError as e:
        raise DiffcliError(f"{path}: its training config does not fit this diffcli ({e}); it cannot be resumed") from None


# ---------------------------------------------------------------- the loop

class _StopFlag:
    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True


def train(cfg: TrainConfig, out: Path, resume: bool = False, overwrite: bool = False,
          device_name: str | None = None, quiet: bool = False, options: dict | None = None,
          precision: str | None = None) -> dict[str, Any]:
    """Run (or continue) a training run in folder `out`. Returns a summary; raises DiffcliError on bad input.

    `precision` (fp32/bf16) overrides the config's, also on resume; None keeps the run's own.
    """
    cfg = given_process_options(cfg)
    dist = Dist(device_name)
    try:
        return _train(cfg, out, resume, overwrite, dist, quiet, options or {}, precision)
    finally:
        dist.close()


SEQUENCE_FLAGS = {"context_frames": "--context-frames", "step_size": "--step-size", "directions": "--directions",
                  "p_left": "--p-left", "seed": "--data-seed", "p_change": "--p-change", "num_digits": "--num-digits"}


def _validate(cfg: TrainConfig) -> None:
    """Every setting, from the command line or from a resumed run's training state, checked before any data is read
    or any file written (ranges: options.py)."""
    for name in ("dataset", "data_root", "split", "net", "process", "precision"):
        if not isinstance(getattr(cfg, name), str):
            raise DiffcliError(f"--{name.replace('_', '-')} must be a string, got {getattr(cfg, name)!r}")
    for name in ("net_overrides", "sequence"):
        if not isinstance(getattr(cfg, name), dict):
            raise DiffcliError(f"the training config's {name} must be a JSON object, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.conditional, bool):
        raise DiffcliError(f"the training config's conditional must be true or false, got {cfg.conditional!r}")
    # a diverging lr is caught by the loss check (the last good checkpoint stays)
    check_fields(cfg, ["steps", "batch", "p_uncond", "lr", "lr_warmup", "ema_halflife_kimg"])
    finite("ema_rampup", cfg.ema_rampup, high=1.0)
    # p_mean: ln(sigma): e^-10 .. e^10 covers any noise range
    check_fields(cfg, ["p_mean", "p_std", "seed", "ckpt_every", "snapshot_every", "grid_every", "log_every",
                       "image_size"])
    if cfg.image_size is not None:
        check_image_size(cfg.image_size, cfg.image_size, ("--image-size", "--image-size"))
    if cfg.channels is not None and (cfg.channels not in (1, 3) or isinstance(cfg.channels, bool)):
        raise DiffcliError(f"--channels must be 1 or 3 (grey or RGB), got {cfg.channels!r}")
    if cfg.precision not in ("fp32", "bf16"):
        raise DiffcliError(f"unknown --precision {cfg.precision!r} (fp32 or bf16)")
    if cfg.process not in PROCESSES:
        raise DiffcliError(f"unknown --process {cfg.process!r}; choose one of {', '.join(PROCESSES)}")
    check_blur_sigma(cfg.blur_sigma_max)
    check_fields(cfg, ["blur_sigma_max"])
    if cfg.net not in PRESETS:
        raise DiffcliError(f"unknown --net {cfg.net!r}; choose one of {', '.join(PRESETS)}")
    _validate_overrides(cfg)
    limits = {"context_frames": (1, CONTEXT_FRAMES_MAX), "step_size": (1, SIDE_MAX), "directions": (1, 1024),
              "num_digits": (1, 2)}
    for key, value in cfg.sequence.items():
        if key in limits:
            count(SEQUENCE_FLAGS[key], value, *limits[key])
        elif key == "seed":
            check_seed("--data-seed", value, high=TRAIN_SEED_MAX)
        elif key in ("p_left", "p_change") and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise DiffcliError(f"{SEQUENCE_FLAGS[key]}: {key} is a probability and must be in [0, 1], got {value!r}")


def _validate_overrides(cfg: TrainConfig) -> None:
    """--block-channels: one width per block of the preset, each a multiple of its norm groups."""
    widths = cfg.net_overrides.get("block_out_channels")
    if widths is None:
        return
    preset = PRESETS[cfg.net]
    blocks, groups = len(preset["block_out_channels"]), preset.get("norm_num_groups", 32)
    if not isinstance(widths, (list, tuple)) or len(widths) != blocks:
        raise DiffcliError(f"--block-channels needs {blocks} widths (one per block of --net {cfg.net}), got {widths!r}")
    for w in widths:
        count("--block-channels: each width", w, 1, CHANNELS_MAX)
        if w % groups:
            raise DiffcliError(f"--block-channels: each width must be a multiple of {groups} (the norm groups of --net "
                               f"{cfg.net}), got {w}")


def _train(cfg: TrainConfig, out: Path, resume: bool, overwrite: bool, dist: Dist, quiet: bool,
           options: dict, precision: str | None) -> dict[str, Any]:
    out = Path(out)
    if precision is not None and not resume:
        cfg.precision = precision
    state_tensors, state_meta = None, None
    if resume:
        state_tensors, state_meta = load_state(out)
        saved = saved_config(state_meta["train"], out / "training-state.safetensors")
        saved.steps, saved.ckpt_every, saved.grid_every, saved.log_every = \
            cfg.steps, cfg.ckpt_every, cfg.grid_every, cfg.log_every  # a resumed run may go further
        saved.snapshot_every = cfg.snapshot_every
        if precision is not None:
            saved.precision = precision
        cfg = saved
    _validate(cfg)
    if cfg.batch % dist.world:
        raise DiffcliError(f"--batch {cfg.batch} is not divisible by the {dist.world} processes")

    ds = load_dataset(cfg.dataset, cfg.data_root, cfg.split, cfg.image_size, cfg.channels, cfg.sequence)
    if cfg.process == "blurring" and ds.context is not None:
        raise DiffcliError("--process blurring trains on still images; next-frame datasets need --process edm")
    if cfg.conditional and ds.labels is None and ds.context is None:
        raise DiffcliError(f"{cfg.dataset} has no labels; train with --unconditional or use class subfolders")
    size = int(ds.images.shape[-1])
    net_cfg = net_config(cfg.net, size, int(ds.images.shape[1]), ds.num_classes if cfg.conditional else 0,
                         0 if ds.context is None else int(ds.context.shape[1]) // int(ds.images.shape[1]))
    net_cfg.update(cfg.net_overrides)
    factor = 2 ** (len(net_cfg["block_out_channels"]) - 1)
    if size % factor or ds.images.shape[-2] % factor:
        raise DiffcliError(f"image size {tuple(ds.images.shape[-2:])} is not divisible by {factor} "
                           f"(the --net {cfg.net} downsampling factor); pass --image-size")

    if not resume and dist.main:
        if (out / "training-state.safetensors").exists() and not overwrite:
            raise DiffcliError(f"{out} already holds a training run; pass --resume to continue it or --overwrite")
        if out.exists() and not out.is_dir():  # prepare_out_dir's own refusals, before the model is built
            raise DiffcliError(f"output path {out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise DiffcliError(f"output folder {out} is not empty; pass --overwrite or choose another --out")
    if resume and dist.main:  # what writers killed mid-checkpoint left: in the run folder and its grids/ only
        clear_temp_files(out, out / "grids")
    dist.barrier()

    loss_fn = make_loss(cfg)
    record = model_record(cfg, ds, net_cfg, loss_fn, 0)
    check_batch_memory(cfg.batch // dist.world, net_cfg["block_out_channels"][0], int(ds.images.shape[-2]), size,
                       torch.float32, dist.device, "one training batch", "lower --batch")
    torch.manual_seed(cfg.seed)  # initial weights
    model = build_model(record, f"the net of this run (--net {cfg.net})").to(dist.device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    start = 0
    if state_tensors is not None:
        try:
            model.net.load_state_dict(strip_prefix(state_tensors, "net."))
            ema.net.load_state_dict(strip_prefix(state_tensors, "ema."))
            opt.load_state_dict(unflatten_state(state_meta["train"]["optim"], state_tensors))
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise DiffcliError(f"{out / 'training-state.safetensors'}: its weights or optimizer state do not match "
                               f"the recorded run ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                               ) from None
        start = int(state_meta["train"]["step"])
        if start >= cfg.steps:
            raise DiffcliError(f"run in {out} is already at step {start} >= --steps {cfg.steps}; pass a larger --steps")
    if not resume and dist.main:  # everything is checked: only now the run folder appears
        prepare_out_dir(out, overwrite=overwrite)
    dist.barrier()
    ddp = model
    if dist.world > 1:
        ddp = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)

    if dist.main:
        earlier = _earlier_runs(out / "run.json") if resume else []
        write_run_json(out, "train", {**options, **asdict(cfg)}, dist.device, world_size=dist.world,
                       parameters=count_params(model.net), resumed_from=start, earlier_sessions=earlier)

    images = ds.images
    labels = ds.labels if cfg.conditional else None
    order = BatchOrder(len(images), cfg.batch, cfg.seed)
    shard = slice(dist.rank * cfg.batch // dist.world, (dist.rank + 1) * cfg.batch // dist.world)
    stop = _StopFlag()
    old_handler = signal.signal(signal.SIGINT, stop) if _is_main_thread() else None
    progress = _Progress(cfg, start, quiet or not dist.main)
    log_path = out / "log.jsonl"
    t0, step, last_loss = time.time(), start, float("nan")
    try:
        for step in range(start, cfg.steps):
            idx = order.indices(step)
            gen = step_generator(cfg.seed, step)
            level, noise = loss_fn.draw(cfg.batch, tuple(images.shape[1:]), gen)  # sigma (EDM) or t (blurring)
            y = None
            if labels is not None:
                y = labels[idx].clone()
                y[torch.rand(cfg.batch, generator=gen) < cfg.p_uncond] = model.null_label
                y = y[shard].to(dist.device)
            x0 = to_model_range(images[idx][shard]).to(dist.device)
            # next-frame sets: the batch carries its context frames; the loop is otherwise the same
            cond = {} if ds.context is None else {"context": to_model_range(ds.context[idx][shard]).to(dist.device)}
            with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss = loss_fn(ddp, x0, level[shard].to(dist.device), noise[shard].to(dist.device), y, **cond)
            bad = dist.any(not torch.isfinite(loss).item())
            if bad:
                raise DiffcliError(f"loss became {loss.item()} at step {step}; stopped. The last good checkpoint "
                                   f"in {out} is kept (try a lower --lr)")
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.lr_warmup, 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            beta = ema_beta(cfg, step)
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm.detach(), 1 - beta)
            done = step + 1
            last_loss = loss.item()
            interrupted = dist.any(stop.requested)
            at_ckpt = (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps or interrupted
            if dist.main:
                progress.update(done, last_loss)
                if cfg.log_every and done % cfg.log_every == 0:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": done, "loss": last_loss, "time": round(time.time() - t0, 2)}) + "\n")
                if at_ckpt:
                    save_state(out, cfg, {**record, "train_step": done, "train_images": done * cfg.batch},
                               done, model, ema, opt, ds.digits)
                if cfg.snapshot_every and done % cfg.snapshot_every == 0:
                    save_checkpoint(snapshot_path(out, done), model_tensors(ema, ds.digits),
                                    {"model": {**record, "train_step": done, "train_images": done * cfg.batch}})
                if cfg.grid_every and (done % cfg.grid_every == 0 or done == cfg.steps):
                    save_grid(out / "grids" / f"step-{done:07d}.png", preview_samples(ema, record, context=ds.context), nrow=_grid_cols(record))
            dist.barrier()
            if interrupted:
                raise KeyboardInterrupt
    finally:
        progress.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    return {"step": cfg.steps, "loss": last_loss, "seconds": time.time() - t0, "out": str(out)}


def _earlier_runs(path: Path) -> list[dict]:
    """The records of the sessions before a resume, so run.json keeps the whole history of the run."""
    try:
        old = read_json(path, "run record")
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict):  # a damaged run.json: its history is lost, the run itself is not
        return []
    history = old.pop("earlier_sessions", [])
    return (history if isinstance(history, list) else []) + [old]


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _grid_cols(record: dict) -> int:
    return record["num_classes"] or 8


@torch.no_grad()
def preview_samples(ema: EDMPrecond, record: dict, per_class: int = 4, steps: int = EDM_STEPS,
                    context: torch.Tensor | None = None) -> torch.Tensor:
    """A fixed-seed Heun grid (one column per class; blurring models: their own sampler) to watch training;
    never touches training RNG.

    Next-frame models: one column per dataset context (its first 8), the last context frame on top."""
    c, size, k = record["channels"], record["image_size"], record["num_classes"]
    n = per_class * (k or 8)
    device = next(ema.parameters()).device
    labels = torch.arange(n, device=device) % k if k else None
    cond = {} if context is None else {"context": to_model_range(context[torch.arange(n) % min(8, len(context))]).to(device)}
    if record["kind"] == "blurring":  # its own reverse process, the seed's T = 100 steps
        rng = PerSampleRandn(range(n), device)
        return sample_blurring(lambda z, t: ema(z, t, labels), rng.randn((c, size, size)), get_ts(BLURRING_STEPS, device),
                               schedule_of(record), noise=rng).clamp(-1, 1)
    x = PerSampleRandn(range(n), device).randn((c, size, size)) * record["sigma_max"]
    sigmas = get_sigmas_karras(steps, record["sigma_min"], record["sigma_max"], device=device)
    out = sample_heun(lambda x, s: ema(x, s, labels, **cond), x, sigmas).clamp(-1, 1)
    return out if context is None else torch.cat([cond["context"][:8, -c:].cpu(), out.cpu()])


class _Progress:
    """Rich bar with loss and images/s on a terminal; a plain line every log interval otherwise."""

    def __init__(self, cfg: TrainConfig, start: int, disabled: bool):
        self.cfg, self.disabled, self.start, self.t0 = cfg, disabled, start, time.time()
        self.bar = None
        if disabled:
            return
        self.console = Console(stderr=True)
        if self.console.is_terminal:
            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), console=self.console)
            self.task = self.bar.add_task("train", total=cfg.steps, completed=start, info="")
            self.bar.start()

    def update(self, done: int, loss: float) -> None:
        if self.disabled:
            return
        rate = (done - self.start) * self.cfg.batch / max(time.time() - self.t0, 1e-9)
        info = f"loss {loss:.4f}  {rate:.0f} img/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=done, info=info)
        elif self.cfg.log_every and done % self.cfg.log_every == 0:
            self.console.print(f"step {done}/{self.cfg.steps}  {info}", highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------- --preview

def write_preview(cfg: TrainConfig, out: str | Path, n: int, overwrite: bool = False) -> Path:
    """`diffcli train --preview N`: N example sequences of the configured dataset as OUT/preview.png, one
    row each (context | next frame | every allowed future); other datasets: a grid of their first images."""
    count("preview", n, 1, PREVIEW_MAX)
    cfg = given_process_options(cfg)
    _validate(cfg)
    ds = load_dataset(cfg.dataset, cfg.data_root, cfg.split, cfg.image_size, cfg.channels, cfg.sequence)
    folder = prepare_out_dir(out, overwrite)
    path = folder / "preview.png"
    note_run("train --preview", {"out": str(out), "preview": n, **asdict(cfg)}, "cpu")
    if ds.sequence is None:
        save_grid(path, to_model_range(ds.images[:n]))
        return path
    spec = spec_from_record(ds.sequence)
    digits = mnist_digit_tiles(cfg.data_root, cfg.split, spec.digit_size)
    rows = []
    for i in range(min(n, len(digits))):
        it = make_item(spec, tiles_of(digits, i, spec.num_digits), i)
        rows.append([to_model_range(it.context[:, None]), to_model_range(it.target[None]), to_model_range(it.futures)])
    save_image(path, strip(rows))
    return path


# ---------------------------------------------------------------- the command

def build(values: dict[str, Any]) -> TrainJob:
    """The command line's values -> what train does: --block-channels parsed into net_overrides, the sequence
    options given into `sequence` (--data-seed as its seed)."""
    args = {name: values.pop(name) for name in [f for f in TrainArgs.__dataclass_fields__]}
    overrides = {}
    if args["block_channels"]:
        try:
            overrides["block_out_channels"] = [int(c) for c in args["block_channels"].split(",")]
        except ValueError:
            raise DiffcliError(f"--block-channels expects comma-separated integers, got {args['block_channels']!r}"
                               ) from None
    given = {"context_frames": args["context_frames"], "step_size": args["step_size"],
             "directions": args["directions"], "p_left": args["p_left"], "seed": args["data_seed"],
             "p_change": args["p_change"], "num_digits": args["num_digits"]}
    cfg = TrainConfig(**values, net_overrides=overrides, sequence={k: v for k, v in given.items() if v is not None})
    return TrainJob(cfg, args["precision"], args["preview"])


def validate(job: TrainJob | TrainConfig) -> None:
    """Every option checked before any data is read or any file written."""
    cfg = job.config if isinstance(job, TrainJob) else job
    _validate(given_process_options(cfg))


def main(job: TrainJob, ctx: RunContext) -> dict[str, Any] | Path:
    """`diffcli train`: train (or write the preview) and say where the model is."""
    if job.preview:
        path = write_preview(job.config, ctx.out, job.preview, ctx.overwrite)
        ctx.echo(f"wrote {path}")
        return path
    result = train(job.config, ctx.out, resume=ctx.resume, overwrite=ctx.overwrite, device_name=ctx.device,
                   quiet=ctx.quiet, options={"out": str(ctx.out), "resume": ctx.resume, "device": ctx.device},
                   precision=job.precision)
    if not ctx.quiet:
        ctx.echo(f"trained to step {result['step']} (loss {result['loss']:.4f}); model: "
                 f"{Path(result['out']) / 'model.safetensors'}")
    return result


COMMAND = Command(
    "train", TrainConfig, validate, main, build=build, cli=TrainArgs,
    context={"out": {"default": Path("runs/edm"), "help": "Run folder: checkpoints, grids, log, run.json."},
             "resume": {"help": "Continue the run in --out exactly where it stopped."},
             "overwrite": {"help": "Replace an existing run in --out."},
             "device": {}, "quiet": {}},
    help="""Train a model: EDM (class-conditional with label dropout, unconditional, or next-frame) or blurring diffusion.

    Example: diffcli train --dataset mnist --data-root data --steps 8000 --out runs/mnist

    Blurring diffusion: diffcli train --process blurring --blur-sigma-max 20 --out runs/blur

    Example: diffcli train --dataset circle-jumping --data-root data --split test --directions 4 --preview 8 --out preview
    """)
