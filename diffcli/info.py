"""diffcli info: what this machine runs diffcli with (versions, devices and their dtypes, caches, shipped models)."""
from __future__ import annotations

import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .runner import Command, RunContext
from .shared.records import package_versions
from .shared.devices import pick_device
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


def main(cfg: None, ctx: RunContext) -> dict[str, Any]:
    """`diffcli info`: the environment, a line per entry."""
    env = environment()
    for key, value in env.items():
        if isinstance(value, dict):
            ctx.echo(f"{key}:")
            for k, v in value.items():
                ctx.echo(f"  {k}: {v}")
        else:
            ctx.echo(f"{key}: {', '.join(value) if isinstance(value, list) else value}")
    return env


COMMAND = Command("info", None, lambda cfg: None, main, help="""Versions, devices and the dtypes they run, and where models are cached.

    Example: diffcli info
    """)
