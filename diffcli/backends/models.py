"""diffcli model files: the `model` record a checkpoint carries -> the model it describes (an EDM denoiser or a
blurring-diffusion eps-predictor, each on a `nets.UNetF`), and a model file (or a training run folder) -> that
model with its weights, in eval mode.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..core.blurring import BlurringModel, schedule_of
from ..shared.cache import cached
from ..shared.errors import DiffcliError
from ..shared.files import some_names
from ..shared.inputs import input_path, shown
from ..shared.checkpoints import load_checkpoint, strip_prefix
from ..core.denoisers import EDMPrecond
from .nets import UNetF, check_net_config
from ..data.sequences import SEQUENCE_DIGITS
from ..shared.shipped import CHECKPOINTS_DIR
from ..shared.limits import CLASSES_MAX, CONTEXT_FRAMES_MAX, SIGMA_LIMIT, check_image_size, count, finite

MODEL_FORMAT = 1  # version of the `model` record's layout
EDM_STEPS = 18    # default sampling steps of an EDM model (Heun: 35 network evaluations)


def build_edm(meta: dict[str, Any]) -> EDMPrecond:
    """EDMPrecond(UNetF) from the `model` record a checkpoint carries."""
    return EDMPrecond(UNetF(meta["net"]), sigma_data=meta["sigma_data"], num_classes=meta["num_classes"],
                      sigma_min=meta.get("sigma_min", 0.002), sigma_max=meta.get("sigma_max", 80.0),
                      context_frames=meta.get("context_frames", 0))


def build_blurring(meta: dict[str, Any]) -> BlurringModel:
    """BlurringModel(UNetF) from a checkpoint's `model` record."""
    return BlurringModel(UNetF(meta["net"]), schedule_of(meta), meta["num_classes"])


def check_record(meta: Any, where: str = "the model record") -> None:
    """Everything `build_model` and the samplers read from a `model` record, checked before anything is allocated:
    a malformed, hand-edited or hostile record is a one-line error naming the field and its range."""
    if not isinstance(meta, dict):
        raise DiffcliError(f"{where} must be a JSON object, got {type(meta).__name__}")
    kind = meta.get("kind")
    if kind not in ("edm", "blurring"):
        raise DiffcliError(f"{where}: unknown kind {kind!r} (edm or blurring)")
    need = ["net", "num_classes", "image_size", "channels"] + (
        ["sigma_data", "sigma_min", "sigma_max"] if kind == "edm" else ["blur_sigma_max", "d_min", "logsnr_min",
                                                                         "logsnr_max"])
    missing = [k for k in need if k not in meta]
    if missing:
        raise DiffcliError(f"{where} lacks field(s) {', '.join(missing)}")
    field = lambda name: f"{where}: {name}"  # noqa: E731
    count(field("num_classes"), meta["num_classes"], 0, CLASSES_MAX)
    if not (isinstance(meta["channels"], int) and not isinstance(meta["channels"], bool) and meta["channels"] in (1, 3)):
        raise DiffcliError(f"{field('channels')} must be 1 or 3 (grey or RGB), got {meta['channels']!r}")
    check_image_size(meta["image_size"], meta["image_size"], (field("image_size"), field("image_size")))
    frames = meta.get("context_frames", 0)
    count(field("context_frames"), frames, 0, CONTEXT_FRAMES_MAX)
    if kind == "edm":
        for name in ("sigma_data", "sigma_min", "sigma_max"):
            finite(field(name), meta[name], above=True, high=SIGMA_LIMIT)
        if not meta["sigma_min"] < meta["sigma_max"]:
            raise DiffcliError(f"{where}: need sigma_min < sigma_max, got {meta['sigma_min']} and {meta['sigma_max']}")
    else:
        finite(field("blur_sigma_max"), meta["blur_sigma_max"], high=SIGMA_LIMIT)
        finite(field("d_min"), meta["d_min"], above=True, high=1.0)
        for name in ("logsnr_min", "logsnr_max"):
            finite(field(name), meta[name], low=-100.0, high=100.0)
        if not meta["logsnr_min"] < meta["logsnr_max"]:
            raise DiffcliError(f"{where}: need logsnr_min < logsnr_max, got {meta['logsnr_min']} and "
                               f"{meta['logsnr_max']}")
    net = meta["net"]
    check_net_config(net, field("net"))
    if net.get("in_channels") != meta["channels"] * (1 + frames) or net.get("out_channels") != meta["channels"]:
        raise DiffcliError(f"{where}: the net maps {net.get('in_channels')} to {net.get('out_channels')} channels, but "
                           f"{meta['channels']}-channel images with {frames} context frame(s) need "
                           f"{meta['channels'] * (1 + frames)} to {meta['channels']}")
    if meta["num_classes"] and not (isinstance(net.get("num_class_embeds"), int)
                                    and net["num_class_embeds"] > meta["num_classes"]):
        raise DiffcliError(f"{where}: {meta['num_classes']} classes need num_class_embeds >= {meta['num_classes'] + 1} "
                           f"(one more: the null label of CFG), got {net.get('num_class_embeds')!r}")


def build_model(meta: dict[str, Any], where: str = "the model record") -> EDMPrecond | BlurringModel:
    """The model a checkpoint's record describes: an EDM denoiser, or a blurring-diffusion eps-predictor; the
    record is checked first (`check_record`), and whatever else UNet2DModel refuses is a one-line error too."""
    check_record(meta, where)
    try:
        return build_blurring(meta) if meta.get("kind") == "blurring" else build_edm(meta)
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as e:
        if isinstance(e, DiffcliError):
            raise
        raise DiffcliError(f"{where}: its net does not build ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None


def load_model(path, device: torch.device | str = "cpu", kinds: tuple[str, ...] = ("edm",)):
    """A diffcli model file (or a training run folder) -> (model in eval mode, model record).

    Only models of `kinds` load: a blurring model is no denoiser D(x, sigma), so commands that need one keep
    the default and refuse it with a clear message. Within `cache.caching()` (a sweep) each file loads once.
    """
    key = ("model", str(model_file(path).resolve()), str(device), tuple(kinds))
    return cached(key, lambda: _load_model(path, device, kinds))


def snapshot_path(run: Path, step: int) -> Path:
    """Where `diffcli train --snapshot-every` keeps the EMA model of one step."""
    return Path(run) / "snapshots" / f"step-{step:07d}.safetensors"


def model_file(spec: str | Path) -> Path:
    """A model file from what a user names: a file, a run folder (its latest model.safetensors), RUN@STEP (the
    run's snapshot of that step; the message lists the steps there are), or the name of a shipped model
    (`circle-jumping`, `mnist-edm`) where no such file or folder exists."""
    text = str(spec)
    run, sep, step = text.rpartition("@")
    if sep and run and step.isdigit() and not os.path.lexists(text):  # a real file or folder NAME@STEP is itself
        input_path(run, "checkpoint run folder", "folder")
        path = snapshot_path(Path(run), int(step))
        if not os.path.lexists(path):
            have = sorted(int(p.stem.split("-")[1]) for p in (Path(run) / "snapshots").glob("step-*.safetensors")
                          if p.stem.split("-")[1].isdigit())
            raise DiffcliError(f"{shown(run)} has no snapshot of step {int(step)}; "
                               + (f"it has steps {some_names([str(h) for h in have], 12)}" if have else
                                  "it has none (train with --snapshot-every N)"))
        return input_path(path, "checkpoint", "file")
    path = Path(text)
    shipped = CHECKPOINTS_DIR / (text if text.endswith(".safetensors") else text + ".safetensors")
    if not os.path.lexists(path) and path.name == text and shipped.is_file():
        return shipped
    found = input_path(path, "checkpoint", "any")
    return input_path(found / "model.safetensors", "checkpoint", "file") if found.is_dir() else found


def _load_model(path, device: torch.device | str, kinds: tuple[str, ...]):
    path = model_file(path)
    tensors, meta = load_checkpoint(path)
    model_meta = meta.get("model")
    kind = model_meta.get("kind") if isinstance(model_meta, dict) else None
    if kind not in kinds:
        what = " or ".join(k.upper() if k == "edm" else k for k in kinds)
        raise DiffcliError(f"{path} holds no diffcli {what} model (kind {kind!r})"
                           + ("; `diffcli sample` samples it" if kind == "blurring" else ""))
    model = build_model(model_meta, f"{path}: the model record")
    if SEQUENCE_DIGITS in tensors and isinstance(model_meta.get("sequence"), dict):
        # a next-frame model carrying its first sequences' digits: --context N needs no MNIST for those
        model_meta = {**model_meta, "sequence": {**model_meta["sequence"], "digits_file": str(path.resolve()),
                                                 "digits_carried": int(tensors[SEQUENCE_DIGITS].shape[0])}}
    weights = strip_prefix(tensors, "net.")
    try:
        model.net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise DiffcliError(f"{path}: weights do not match the recorded architecture ({str(e).splitlines()[0]})") from e
    return model.to(device).eval().requires_grad_(False), model_meta
