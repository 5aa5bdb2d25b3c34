"""Images."""
from __future__ import annotations

import math
import os
import re
import stat
import warnings
import zlib
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image

from .errors import DiffcliError
from .files import atomic_path
from .image_settings import image_settings, png_info, parameters_text, KEY, PARAMETERS_KEY


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}  # what counts as an image file
BATCH_SIZE = 64  # images per network batch, unless a command is told otherwise


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C,H,W) or (N,C,H,W) in [-1, 1] -> uint8 HWC / NHWC."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float in the models' range [-1, 1] (the inverse of `to_uint8`, but for the layout)."""
    return images_uint8.float() / 127.5 - 1


def _pil(arr: np.ndarray):
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def read_image(path: str | os.PathLike, mode: str = "RGB"):
    """Open and fully decode one image, converted with PIL's convert(mode) as the 003 grader does; returns it and
    the file's own mode. A file PIL cannot decode is a one-line error naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode), im.mode
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DiffcliError(f"cannot read image {path}: {reason} (corrupt or truncated file?)") from None


def make_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """(N,C,H,W) -> (C, H', W') grid with `nrow` images a row (default: as square as possible)."""
    n, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = x.new_full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid


def save_image(path: str | os.PathLike, x: torch.Tensor, image: dict[str, Any] | None = None) -> None:
    """Save one (C,H,W) image in [-1, 1] as PNG, atomically; never one with NaN/inf (they would turn black). It
    carries the run's generation settings (`shared.image_settings`) and `image`, a sample's own (index, seed,
    label, prompt, the arguments that draw it alone); a figure passes none."""
    check_finite_image(path, x)
    picture = _pil(to_uint8(x))
    info = png_info(image_settings(path, image), picture.size)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG", **({"pnginfo": info} if info is not None else {}))


def save_figure(path: str | os.PathLike, fig: Any, dpi: int) -> None:
    """A matplotlib figure as PNG, atomically, carrying the run's settings as `save_image`'s figures do."""
    settings = image_settings(path, None)
    metadata = {}
    if settings is not None:
        import json
        width, height = fig.get_size_inches()
        metadata = {KEY: json.dumps(settings, sort_keys=True),  # matplotlib writes it uncompressed
                    PARAMETERS_KEY: parameters_text(settings, (round(width * dpi), round(height * dpi)))}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, **({"metadata": metadata} if metadata else {}))


def check_finite_image(path: str | os.PathLike, x: torch.Tensor) -> None:
    """Bad numbers never become files: an image with NaN or inf values (a diverged sampler) is refused, by name."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise DiffcliError(f"{path}: the image holds NaN or infinite values (the sampling diverged; lower the "
                           "guidance scales or the noise settings); not written")


def load_images(paths: Iterable[str | os.PathLike]) -> torch.Tensor:
    """PNGs written by `save_image` back to (N, C, H, W) in [-1, 1] (grey stays 1 channel): exact on uint8."""
    arrays = []
    for p in paths:
        with Image.open(p) as im:
            a = np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB"))
        arrays.append(a[..., None] if a.ndim == 2 else a)
    return to_model_range(torch.from_numpy(np.stack(arrays)).movedim(-1, 1))


def save_grid(path: str | os.PathLike, x: torch.Tensor, nrow: int | None = None) -> None:
    save_image(path, make_grid(x, nrow))


def save_gif(path: str | os.PathLike, frames: Iterable[torch.Tensor], duration_ms: int = 80) -> None:
    """Frames of (C,H,W) in [-1, 1] -> looping animated GIF, atomically."""
    images = [_pil(to_uint8(f)) for f in frames]
    if not images:
        raise ValueError("no frames")
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)


def check_image_file(path: str | os.PathLike, max_pixels: int, what: str = "image") -> tuple[int, int]:
    """(width, height) of an image file from its header alone, refusing one of more than `max_pixels` pixels (a
    decompression bomb: a small file that decodes to gigabytes) before anything is decoded."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block the read forever
            raise DiffcliError(f"{what} {path} is not a regular file")
    except OSError as e:
        raise DiffcliError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except Image.DecompressionBombError as e:  # over twice PIL's own limit: PIL names the size
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise DiffcliError(f"{what} {path} has {found.group(1) if found else 'too many'} px; diffcli reads at most "
                           f"{max_pixels} px (8192 x 8192) an image") from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DiffcliError(f"cannot read {what} {path}: {reason} (corrupt or truncated file?)") from None
    if width * height > max_pixels:
        raise DiffcliError(f"{what} {path} is {width} x {height} = {width * height} px; diffcli reads at most "
                           f"{max_pixels} px (8192 x 8192) an image")
    return width, height
