"""Memory and image sizes, before allocating."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import DiffcliError


def device_memory(device: torch.device | str) -> int | None:
    """Bytes of memory `device` has: a GPU's total (torch.cuda.mem_get_info), else this machine's physical memory
    (capped by a cgroup limit where one is set); None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[1])
        except Exception:  # no driver or a device that is gone: nothing to compare against
            return None
    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        try:
            with open("/proc/meminfo") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
            total = kib * 1024
        except (OSError, StopIteration, ValueError, IndexError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit)) if total else int(limit)
    except OSError:
        pass
    return total if total and total > 0 else None


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_memory(need: int, device: torch.device | str, what: str, hint: str) -> None:
    """Refuse work that needs more bytes than `device` has at all (`device_memory`), before allocating any of it."""
    have = device_memory(device)
    if have is not None and need > have:
        device = torch.device(device)
        where = f"the {human_bytes(have)} of memory of {device}" if device.type == "cuda" else \
            f"this machine's {human_bytes(have)} of memory"
        raise DiffcliError(f"{what} needs at least {human_bytes(need)}, more than {where}; {hint}")
