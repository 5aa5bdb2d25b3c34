"""The folders of images `diffcli eval` scores: which files count, what a `diffcli sample` folder records about its
samples, and every image decoded once up front (shared among torchrun ranks) so a bad file is named before any
model loads. Problems are one-line DiffcliErrors; what only deserves a mention comes back as notes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .common import IMAGE_EXTS, DiffcliError, check_folder, read_image, some_names
from .dist import Dist, read_each

SAMPLE_ARTIFACTS = ("grid.png", "strip.png")  # written beside the samples by `diffcli sample`


def check_images(paths: Sequence[str | Path], dist: Dist | None = None) -> dict[str, list[str]]:
    """Decode every image once before any model runs (so a bad file is named up front); modes -> file names.

    Under torchrun each rank decodes its share and the modes come back to rank 0 (the others get {}).
    """
    modes_in_order = read_each(dist, paths, lambda p: read_image(p)[1])
    if dist is not None:
        modes_in_order = dist.gather(modes_in_order) or []
    modes: dict[str, list[str]] = {}
    for p, mode in zip(paths, modes_in_order):
        modes.setdefault(mode, []).append(Path(p).name)
    return modes


def conversion_warnings(modes: dict[str, list[str]]) -> list[str]:
    """What PIL's convert('RGB') (the grader's) does to images of other modes, named."""
    out = []
    wide = [n for m in ("I;16", "I;16B", "I;16L", "I", "F") for n in modes.get(m, [])]
    alpha = [n for m in ("RGBA", "LA", "PA", "RGBa", "La") for n in modes.get(m, [])]
    if wide:
        out.append(f"{len(wide)} image(s) have 16/32-bit pixels and are converted with PIL convert('RGB') as the "
                   f"grader does, which clips values above 255 rather than rescaling them: {some_names(wide)}")
    if alpha:
        out.append(f"{len(alpha)} image(s) have an alpha channel, dropped by convert('RGB') as the grader does: "
                   f"{some_names(alpha)}")
    return out


def list_pngs(folder: str) -> tuple[list[str], list[str]]:
    """The *.png names the grader reads (sorted) and notes about the image files it would not read."""
    path = check_folder(folder)
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    if not files:
        raise DiffcliError(f"folder {folder} is empty: no images to score")
    pngs = [n for n in files if n.endswith(".png")]
    others = [n for n in files if not n.endswith(".png") and Path(n).suffix.lower() in IMAGE_EXTS]
    if not pngs:
        found = (f" (it holds {len(others)} other image(s): {some_names(others)}; the grader reads only *.png)"
                 if others else "")
        raise DiffcliError(f"no PNG images in {folder}{found}")
    notes = [f"skipped {len(others)} non-PNG image(s), as the grader reads only *.png: {some_names(others)}"]
    return pngs, notes if others else []


def is_sample_folder(folder: str) -> bool:
    """Whether `diffcli sample` wrote the folder (its run.json says so)."""
    try:
        record = json.loads((Path(folder) / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("command") == "sample"


def read_digit_samples(folder: str) -> tuple[list[str], list[int] | None, list[str]]:
    """The samples `diffcli sample` recorded in run.json (file, label); without one, every PNG, unlabelled."""
    path = check_folder(folder)
    run_json = path / "run.json"
    if not run_json.is_file():
        pngs, notes = list_pngs(folder)
        pngs = [n for n in pngs if n not in SAMPLE_ARTIFACTS and not n.startswith(".")]
        if not pngs:
            raise DiffcliError(f"no sample PNGs in {folder}")
        notes.append(f"no run.json in {folder}: no labels, so no class accuracy ({len(pngs)} PNGs)")
        return [str(path / n) for n in pngs], None, notes
    try:
        samples = json.loads(run_json.read_text()).get("samples")
    except (ValueError, AttributeError):
        raise DiffcliError(f"{run_json} is not a diffcli run record (JSON with a samples list)") from None
    if not (isinstance(samples, list) and samples and all(isinstance(s, dict) and "file" in s for s in samples)):
        raise DiffcliError(f"{run_json} lists no samples (expected samples: [{{file, seed, label}}] "
                           "from diffcli sample)")
    files = [str(path / s["file"]) for s in samples]
    missing = [s["file"] for s in samples if not (path / s["file"]).is_file()]
    if missing:
        raise DiffcliError(f"{run_json} lists {len(missing)} sample(s) missing from the folder: {some_names(missing)}")
    labels = [s.get("label") for s in samples]
    if any(y is None for y in labels):
        return files, None, [f"{run_json} records no labels (unconditional samples): no class accuracy"]
    if not all(isinstance(y, int) for y in labels):
        raise DiffcliError(f"{run_json}: sample labels must be integers")
    return files, labels, []
