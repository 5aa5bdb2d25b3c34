"""diffcli info: what this machine runs diffcli with (versions, devices and their dtypes, caches, shipped models);
`diffcli info IMAGE.png`: the generation settings an image diffcli wrote carries."""
from __future__ import annotations

import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .runner import Command, RunContext
from .shared.records import package_versions
from .shared.devices import pick_device
from .shared.fields import opt
from .shared.image_settings import parameters_text, read_settings
from .shared.shipped import CHECKPOINTS_DIR


def environment() -> dict[str, Any]:
    """What `diffcli info` shows: versions, devices with the dtypes they run, threads, and the model caches."""
    pkgs = package_versions(("diffcli", "torch", "torchvision", "diffusers", "transformers", "open_clip_torch",
                             "clean-fid", "safetensors", "typer"))
    devices = {"cpu": f"{torch.get_num_threads()} threads; fp32, bf16"}
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        bf16 = ", bf16" if torch.cuda.is_bf16_supported() else ""
        devices[f"cuda:{i}"] = f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB; fp32, fp16{bf16}"
    if torch.backends.mps.is_available():
        devices["mps"] = "fp32, fp16"
    try:  # deferred: not a dependency of ours (diffusers and open_clip bring it)
        from huggingface_hub import constants
        hub = constants.HF_HUB_CACHE
    except ImportError:
        hub = "huggingface_hub not installed"
    caches = {"huggingface hub (pipelines, open_clip weights)": str(hub),
              "clean-fid (Inception weights)": str(Path(tempfile.gettempdir()) / "inception-2015-12-05.pt")}
    shipped = CHECKPOINTS_DIR
    return {"python": f"{platform.python_version()} ({sys.executable})", "platform": platform.platform(),
            "packages": pkgs, "devices": devices, "default device": str(pick_device(None)), "caches": caches,
            "shipped models": sorted(p.name for p in shipped.glob("*.safetensors")) if shipped.is_dir() else [],
            "hub offline mode (HF_HUB_OFFLINE)": bool(os.environ.get("HF_HUB_OFFLINE"))}


@dataclass
class InfoConfig:
    image: Optional[Path] = opt(None, argument=True, metavar="[IMAGE.png]", panel="input",
                                help="An image diffcli wrote: print the settings it carries instead.")


def _echo_value(ctx: RunContext, key: str, value: Any, indent: str = "") -> None:
    if isinstance(value, dict):
        ctx.echo(f"{indent}{key}:")
        for k, v in value.items():
            _echo_value(ctx, k, v, indent + "  ")
    else:
        ctx.echo(f"{indent}{key}: {', '.join(map(str, value)) if isinstance(value, list) else value}")


def image_info(path: Path, ctx: RunContext) -> dict[str, Any] | None:
    """The settings IMAGE carries, a line per entry: the command line first (shell-quoted), then the sample's own
    facts, the options, device and versions. An image without them: one line saying so."""
    settings = read_settings(path)
    if settings is None:
        ctx.echo(f"{path}: no diffcli settings (not written by diffcli, or by a diffcli that did not record "
                 f"them)")
        return None
    import shlex
    ctx.echo(f"command line: {shlex.join(settings['argv'])}")
    ctx.echo(f"working folder: {settings.get('cwd')}")
    for key in ("command", "file", "image", "diffcli", "device", "options", "omitted", "versions"):
        if key in settings:
            _echo_value(ctx, key, settings[key])
    try:
        from PIL import Image
        with Image.open(path) as im:
            size = im.size
    except OSError:
        size = (0, 0)
    ctx.echo("parameters: " + parameters_text(settings, size).replace("\n", " | "))
    return settings


def main(cfg: InfoConfig | None, ctx: RunContext) -> dict[str, Any] | None:
    """`diffcli info`: the environment, a line per entry; `diffcli info IMAGE`: the settings IMAGE carries."""
    if cfg is not None and cfg.image is not None:
        return image_info(cfg.image, ctx)
    env = environment()
    for key, value in env.items():
        if isinstance(value, dict):
            ctx.echo(f"{key}:")
            for k, v in value.items():
                ctx.echo(f"  {k}: {v}")
        else:
            ctx.echo(f"{key}: {', '.join(value) if isinstance(value, list) else value}")
    return env


COMMAND = Command("info", InfoConfig, lambda cfg: None, main, config_file=False, help="""Versions, devices and the dtypes they run, and where models are cached; or, given an image diffcli wrote,
    the generation settings it carries (its command line, seed, label, prompt, options, versions).

    Example: diffcli info

    Example: diffcli info digits/00003-seed3-label3.png
    """)
