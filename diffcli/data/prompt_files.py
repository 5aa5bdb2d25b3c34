"""Prompt-set files the commands share: `assignment` names a shipped 003 set; errors point at a JSON entry's line."""
from __future__ import annotations

from pathlib import Path

from .image_folders import is_regular
from ..shared.shipped import prompts as shipped_prompts

ASSIGNMENT = "assignment"  # `--prompts-file assignment`: the shipped 003 prompt set of the command


def resolve_prompts_file(path: str, shipped: str) -> str:
    """'assignment' means the shipped 003 set in prompts/."""
    return str(shipped_prompts(shipped)) if path == ASSIGNMENT else path


def key_line(path: str, key: str) -> str:
    """' (line N)' of a key in a JSON file, so an error points at the entry."""
    if not is_regular(path):  # a pipe or standard input was read once already
        return ""
    try:
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if f'"{key}"' in line:
                return f" (line {n})"
    except (OSError, UnicodeDecodeError):
        pass
    return ""
