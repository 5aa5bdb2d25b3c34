"""Contexts for next-frame models: dataset indices, regenerated from the sequence record the model carries and the
MNIST digits it was trained on (so the generator's truth comes along), or one context file (a PNG strip or a
tensor). `resolve_contexts` is `--context` of `diffcli sample` and `diffcli pg`: it checks everything against the
model before any output, and its messages name the option.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import load_file

from ..shared.errors import DiffcliError
from ..shared.images import check_image_file, to_model_range
from ..shared.limits import N_MAX, PIXELS_MAX
from .datasets import mnist_digit_tiles
from ..shared.inputs import input_path
from .sequences import SEQUENCE_DIGITS, Context, SequenceItem, make_item, spec_from_record, tiles_of

CONTEXT_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_digits(record: dict[str, Any], data_root: str | None) -> torch.Tensor:
    """The digit tiles a sequence model was trained on: from a given MNIST root, else the ones its model file
    carries (its first sequences', `sequences.SEQUENCE_DIGITS`), else from the recorded MNIST root."""
    if data_root is None and record.get("digits_file"):
        try:
            with safe_open(record["digits_file"], "pt") as f:
                return f.get_tensor(SEQUENCE_DIGITS)
        except Exception as e:  # the file changed since the model loaded
            raise DiffcliError(f"cannot read the digits carried in {record['digits_file']}: {e}") from None
    root = data_root or record.get("data_root") or "data"
    return mnist_digit_tiles(root, record.get("split", "train"), spec_from_record(record).digit_size)


def dataset_item(record: dict[str, Any], index: int, digits: torch.Tensor) -> SequenceItem:
    spec = spec_from_record(record)
    total = int(record.get("sequences", len(digits)))
    carried = len(digits) == record.get("digits_carried") and len(digits) < total
    if not 0 <= index < len(digits) or (carried and index + spec.num_digits > len(digits)):  # 2 digits: i, i + 1
        if carried and 0 <= index < total:
            raise DiffcliError(f"the model file carries the digits of sequences 0..{len(digits) - spec.num_digits}; "
                               f"for sequence {index} pass --data-root (the MNIST folder it was trained on)")
        raise DiffcliError(f"sequence {index} is outside the model's dataset (sequences 0..{len(digits) - 1})")
    return make_item(spec, tiles_of(digits, index, spec.num_digits), index)


def parse_indices(text: str) -> list[int] | None:
    """`3`, `0,4,7` or `0:10` -> indices; None when the text is not of that form (then it is a file)."""
    t = text.strip()
    try:
        if ":" in t:
            a, b = t.split(":")
            if int(b) - int(a) > N_MAX:  # before the list exists: 0:10**12 is no bomb
                raise DiffcliError(f"--context {text}: {int(b) - int(a)} sequences; at most {N_MAX}")
            return list(range(int(a), int(b)))
        return [int(p) for p in t.split(",")]
    except DiffcliError:
        raise
    except ValueError:
        return None


def read_context(path: str | Path, frames: int, size: int) -> torch.Tensor:
    """A context file -> (frames, size, size) float in [-1, 1].

    .png/.jpg: the frames side by side, grey (a (frames*size) x size strip, as `context.png` is written);
    .pt/.safetensors: one tensor (frames, size, size), optionally with a leading or second axis of 1;
    uint8 tensors are 0..255, float tensors the model range [-1, 1].
    """
    path = Path(path)
    expect = (f"the model expects {frames} context frame(s) of {size}x{size}: a {frames * size}x{size} PNG "
              f"(frames side by side) or a ({frames}, {size}, {size}) tensor")
    input_path(path, "--context file", "file")
    suffix = path.suffix.lower()
    if suffix in CONTEXT_IMAGE_EXTS:
        check_image_file(path, PIXELS_MAX, "context image")  # a decompression bomb is refused from its header
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise DiffcliError(f"cannot read context image {path}: {e}") from None
        h, w = arr.shape
        if (h, w) != (size, frames * size):
            raise DiffcliError(f"context image {path} is {w}x{h}; {expect}")
        t = torch.from_numpy(arr.copy()).reshape(size, frames, size).permute(1, 0, 2)
    elif suffix in (".pt", ".pth", ".safetensors"):
        t = _read_tensor(path)
        while t.ndim > 3 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 4 and t.shape[1] == 1:
            t = t[:, 0]
        if tuple(t.shape) != (frames, size, size):
            raise DiffcliError(f"context tensor in {path} has shape {tuple(t.shape)}; {expect}")
    else:
        raise DiffcliError(f"context file {path}: unknown file type {suffix or '(none)'}; use .png, .pt or .safetensors")
    if t.dtype == torch.uint8:
        return to_model_range(t)
    t = t.float()
    if not torch.isfinite(t).all():
        raise DiffcliError(f"context tensor in {path} has NaN or infinite values")
    return t


def _read_tensor(path: Path) -> torch.Tensor:
    try:
        if path.suffix.lower() == ".safetensors":
            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as e:
        raise DiffcliError(f"cannot read context tensor {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(obj, dict):
        obj = obj.get("context", next(iter(obj.values())) if len(obj) == 1 else None)
    if not isinstance(obj, torch.Tensor):
        raise DiffcliError(f"{path} holds no single context tensor (save one tensor, or a dict with key 'context')")
    return obj


def resolve_contexts(spec: str, meta: dict[str, Any], data_root: str | None = None,
                     many: bool = False) -> list[Context]:
    """`--context` for a sequence model: dataset indices (regenerated from the recorded parameters and the
    MNIST digits under data_root) or one file. Checks everything against the model before any output."""
    frames = int(meta.get("context_frames") or 0)
    if not frames:
        raise DiffcliError("--context is for next-frame models (trained on moving-mnist, circle-jumping or "
                           "horizontal); this model takes no context")
    size = int(meta["image_size"])
    indices = parse_indices(spec)
    if indices is None:
        if os.path.lexists(spec):
            input_path(spec, "--context file", "file")
        else:
            raise DiffcliError(f"--context {spec}: no such file, and not a dataset index (e.g. 3, 0,4,7 or 0:10)")
        return [Context(read_context(spec, frames, size), str(spec))]
    if not indices:
        raise DiffcliError(f"--context {spec!r} selects no sequence")
    if len(indices) > 1 and not many:
        raise DiffcliError(f"--context takes one sequence here, got {len(indices)} ({spec!r}); `diffcli pg` takes several")
    record = meta.get("sequence")
    if not record:
        raise DiffcliError("this model does not record its sequence dataset; pass --context FILE")
    digits = load_digits(record, data_root)
    items = [dataset_item(record, i, digits) for i in indices]
    return [Context(to_model_range(it.context), f"index {i}", i, it) for i, it in zip(indices, items)]
