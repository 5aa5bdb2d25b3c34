"""diffcli model files: the `model` record a checkpoint carries -> the model it describes (an EDM denoiser or a
blurring-diffusion eps-predictor, each on a `nets.UNetF`), and a model file (or a training run folder) -> that
model with its weights, in eval mode.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .blurring import BlurringModel, schedule_of
from .common import DiffcliError, load_checkpoint, strip_prefix
from .denoisers import EDMPrecond
from .nets import UNetF

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


def build_model(meta: dict[str, Any]) -> EDMPrecond | BlurringModel:
    """The model a checkpoint's record describes: an EDM denoiser, or a blurring-diffusion eps-predictor."""
    return build_blurring(meta) if meta.get("kind") == "blurring" else build_edm(meta)


def load_model(path, device: torch.device | str = "cpu", kinds: tuple[str, ...] = ("edm",)):
    """A diffcli model file (or a training run folder) -> (model in eval mode, model record).

    Only models of `kinds` load: a blurring model is no denoiser D(x, sigma), so commands that need one keep
    the default and refuse it with a clear message.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    tensors, meta = load_checkpoint(path)
    model_meta = meta.get("model")
    kind = model_meta and model_meta.get("kind")
    if kind not in kinds:
        what = " or ".join(k.upper() if k == "edm" else k for k in kinds)
        raise DiffcliError(f"{path} holds no diffcli {what} model (kind {kind!r})"
                           + ("; `diffcli sample` samples it" if kind == "blurring" else ""))
    model = build_model(model_meta)
    weights = strip_prefix(tensors, "net.")
    try:
        model.net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise DiffcliError(f"{path}: weights do not match the recorded architecture ({str(e).splitlines()[0]})") from e
    return model.to(device).eval().requires_grad_(False), model_meta
