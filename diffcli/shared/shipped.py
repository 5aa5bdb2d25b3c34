"""Where the files shipped with diffcli live: the built-in models (checkpoints/*.safetensors and their .md model
cards) and the 003 prompt sets (prompts/*.json). Every shipped path is built here and nowhere else.

The repository keeps them at its root, in checkpoints/ and prompts/ beside the package. A wheel carries them
inside the package, as diffcli/checkpoints and diffcli/prompts (pyproject.toml maps those two packages onto the
two folders). So:

- installed from a wheel (`pip install .`, or a wheel installed anywhere): diffcli/checkpoints, diffcli/prompts;
- source checkout or editable install (`pip install -e .`): the package is the repository's diffcli/, and the
  folders are the repository's checkpoints/ and prompts/.

A shipped file that is missing is a one-line DiffcliError from `checkpoint(name)` / `prompts(name)`.
"""
from __future__ import annotations

from pathlib import Path

from .errors import DiffcliError

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the diffcli package (this file is diffcli/shared/shipped.py)


def _folder(name: str) -> Path:
    """diffcli/<name> when installed from a wheel, else <repository>/<name> (checkout, editable install)."""
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name


CHECKPOINTS_DIR = _folder("checkpoints")  # the built-in models and their model cards
PROMPTS_DIR = _folder("prompts")          # the 003 prompt sets and their README (licence)

SHIPPED_MODEL = CHECKPOINTS_DIR / "mnist-edm.safetensors"            # default model of `diffcli sample` and `pg`
SHIPPED_CLASSIFIER = CHECKPOINTS_DIR / "mnist-classifier.safetensors"  # the digit judge (eval --digits, PG kernel)
SHIPPED_BLURRING = CHECKPOINTS_DIR / "mnist-blurring.safetensors"    # the blurring-diffusion digit model
SHIPPED_CIRCLE = CHECKPOINTS_DIR / "circle-jumping.safetensors"      # next-frame model of circle-jumping digits

WIDE_PROMPTS = "wide_image_prompts.json"            # `diffcli panorama --prompts-file assignment`
AMBIGUOUS_PROMPTS = "ambiguous_image_prompts.json"  # `diffcli anagram --prompts-file assignment`


def _shipped(folder: Path, name: str, suffix: str, what: str) -> Path:
    if not name or Path(name).name != name:
        raise DiffcliError(f"not a shipped {what} name: {name!r} (a file name in {folder}, no folders)")
    path = folder / (name if Path(name).suffix else name + suffix)
    if not path.is_file():
        found = ", ".join(sorted(p.stem for p in folder.glob(f"*{suffix}"))) if folder.is_dir() else ""
        raise DiffcliError(f"shipped {what} {path.name} not found in {folder}"
                           + (f" (shipped: {found})" if found else "; reinstall diffcli"))
    return path


def checkpoint(name: str) -> Path:
    """A shipped model file by name, with or without .safetensors (`mnist-edm`, `mnist-classifier.safetensors`);
    model cards too (`mnist-edm.md`)."""
    return _shipped(CHECKPOINTS_DIR, name, ".safetensors", "checkpoint")


def prompts(name: str) -> Path:
    """A shipped prompt set by name, with or without .json (`wide_image_prompts`, `ambiguous_image_prompts.json`)."""
    return _shipped(PROMPTS_DIR, name, ".json", "prompt set")


def models() -> list[str]:
    """File names of the shipped models (what `diffcli info` lists)."""
    return sorted(p.name for p in CHECKPOINTS_DIR.glob("*.safetensors")) if CHECKPOINTS_DIR.is_dir() else []


def prompt_sets() -> list[str]:
    """File names of the shipped prompt sets."""
    return sorted(p.name for p in PROMPTS_DIR.glob("*.json")) if PROMPTS_DIR.is_dir() else []
