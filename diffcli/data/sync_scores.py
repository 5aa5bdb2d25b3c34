"""What `diffcli eval --app regions|seam` reads from a panorama folder and how it is judged.

- regions: the run record beside the folder (OUT.run.json) names each image's region prompts and where they are
  (a box 'X0,Y0,X1,Y1' or a mask file); each region's crop (the box, or the bounding box of the mask's lit
  pixels) is scored by CLIP against its own prompt. The score says whether the prompt landed where it was asked.
- seam: every panorama in the folder (files without a crop position) gets `metrics.seam_figure`: the change across
  the left/right join against the change between neighbouring columns inside.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.metrics import seam_figure
from ..shared.errors import DiffcliError
from ..shared.images import read_image
from ..shared.records import RECORD_BESIDE, beside
from .grading import has_crop_position

SYNC_APPS = ("regions", "seam")


@dataclass
class RegionCrop:
    image: str                        # the panorama file
    box: tuple[int, int, int, int]    # x0, y0, x1, y1 in px
    prompt: str
    region: str                       # as recorded: the box or the mask file


def _box_of(region: str, width: int, height: int, where: str) -> tuple[int, int, int, int]:
    parts = region.split(",")
    if len(parts) == 4:
        try:
            x0, y0, x1, y1 = (int(p) for p in parts)
            return x0, y0, x1, y1
        except ValueError:
            pass
    image, _ = read_image(region, "L")  # a mask file: the bounding box of its lit pixels
    if image.size != (width, height):
        raise DiffcliError(f"{where}: mask {region} is {image.size[0]}x{image.size[1]}, the image {width}x{height}")
    lit = np.argwhere(np.asarray(image) >= 128)
    if not len(lit):
        raise DiffcliError(f"{where}: mask {region} has no lit pixel")
    (y0, x0), (y1, x1) = lit.min(0), lit.max(0) + 1
    return int(x0), int(y0), int(x1), int(y1)


def region_crops(folder: str) -> list[RegionCrop]:
    """Every region of every image the panorama run wrote into `folder`, from its OUT.run.json."""
    record_path = beside(folder, RECORD_BESIDE)
    try:
        record = json.loads(Path(record_path).read_text())
    except (OSError, ValueError):
        raise DiffcliError(f"--app regions reads the panorama run record {record_path}: missing or not JSON") from None
    crops = []
    for job in record.get("prompts", []) if isinstance(record, dict) else []:
        if not isinstance(job, dict) or not job.get("regions"):
            continue
        image = str(Path(folder) / f"{job.get('stem')}.png")
        picture, _ = read_image(image)
        for r in job["regions"]:
            box = _box_of(str(r.get("region")), *picture.size, f"--app regions: {image}")
            crops.append(RegionCrop(image, box, str(r.get("prompt")), str(r.get("region"))))
    if not crops:
        raise DiffcliError(f"--app regions: {record_path} records no region prompts (run panorama with --region)")
    return crops


def crop_pictures(crops: list[RegionCrop]):
    """The crops as PIL images (RGB), in order."""
    pictures = {}
    out = []
    for c in crops:
        if c.image not in pictures:
            pictures[c.image] = read_image(c.image)[0]
        out.append(pictures[c.image].crop(c.box))
    return out


def region_record(crops: list[RegionCrop], cosines: torch.Tensor) -> dict:
    per = [{"image": Path(c.image).name, "region": c.region, "box": list(c.box), "prompt": c.prompt,
            "clip": float(v)} for c, v in zip(crops, cosines)]
    return {"score": float(cosines.double().mean()), "regions": per}


def panorama_files(folder: str) -> list[str]:
    files = sorted(p for p in Path(folder).glob("*.png") if not has_crop_position(p.name))
    if not files:
        raise DiffcliError(f"--app seam: no panorama (a .png without a crop position) in {folder}")
    return [str(p) for p in files]


def seam_record(folder: str) -> dict:
    per = {}
    for path in panorama_files(folder):
        picture = torch.from_numpy(np.asarray(read_image(path)[0], dtype=np.float32) / 255).permute(2, 0, 1)
        per[Path(path).name] = seam_figure(picture)
    ratios = [v["ratio"] for v in per.values()]
    return {"ratio": float(np.mean(ratios)), "images": per}
