"""Shared layer: errors, device/dtype, seeding, image/grid/GIF/JSON IO, atomic writes, checkpoints, quiet
third-party libraries."""
from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import logging
import math
import os
import platform
import re
import socket
import sys
import tempfile
import warnings
import zlib
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import Progress
from safetensors import safe_open
from safetensors.torch import save_file


class DiffcliError(ValueError):
    """A problem with the user's input or environment; the CLI prints it as one line and exits non-zero.

    A ValueError, so library users can catch it as one."""

    exit_code = 2


# ---------------------------------------------------------------- device, dtype, seeds

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def pick_device(name: str | None = None) -> torch.device:
    """`auto` (or None) picks cuda, then mps, then cpu; anything else must exist on this machine."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DiffcliError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffcliError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DiffcliError(f"device {name!r} requested but MPS is not available on this machine")
    return device


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """fp32 unless asked; half precision only where the device runs it."""
    if name in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DiffcliError(f"unknown dtype {name!r} (use one of fp32, fp16, bf16)")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise DiffcliError("fp16 is not supported on cpu; use fp32 or bf16")
    return dtype


def seed_all(seed: int) -> None:
    """Seed the global generators (only for code we do not control; our own noise uses explicit generators)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


class PerSampleRandn:
    """One torch.Generator per sample, so sample i with seed s is identical whatever the batch it is drawn in.

    Call it like torch.randn_like on a batch whose leading size equals the number of seeds.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"batch of {like.shape[0]} but {len(self.generators)} generators")
        return self.randn(like.shape[1:], like.dtype).to(like.device)


# ---------------------------------------------------------------- atomic files

# atomic_path's temp names: mkstemp(prefix=".NAME.", suffix=".tmp") adds 8 characters of [a-z0-9_]
ATOMIC_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def atomic_temp_files(folder: Path) -> list[Path]:
    """Temp files atomic_path left under `folder` (a writer killed mid-write); nothing else matches."""
    return [p for p in folder.rglob(".*.tmp") if p.is_file() and ATOMIC_TEMP.fullmatch(p.name)]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds.

    A reader (or a process killed half way) sees the old file or the new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the user's usual mode
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        if e.filename is None or Path(e.filename) == tmp_path:  # name the file the user asked for, not our temp
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any, indent: int = 4) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")


def read_json_option(path: str, option: str, what: str) -> Any:
    """A JSON file named by a setting; a missing or malformed file is a one-line error naming the setting."""
    p = Path(path)
    if not p.is_file():
        raise DiffcliError(f"{option} {what} not found: {path}")
    try:
        return json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffcliError(f"{option} {path} is not valid JSON: {e}") from None


def check_folder(path: str | os.PathLike, what: str = "folder") -> Path:
    """An input folder that must exist."""
    path = Path(path)
    if not path.exists():
        raise DiffcliError(f"{what} not found: {path}")
    if not path.is_dir():
        raise DiffcliError(f"{what} {path} is not a folder")
    return path


def some_names(names: Sequence[str], limit: int = 4) -> str:
    """The first `limit` names and how many more, for one-line messages: 'a, b, c, d and 3 more'."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def prepare_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Create the output folder; refuse one that already holds files unless --overwrite."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DiffcliError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DiffcliError(f"output folder {out} is not empty; pass --overwrite or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise DiffcliError(f"cannot write to output folder {out}: {e.strerror or e}") from e
    return out


# ---------------------------------------------------------------- progress

@contextlib.contextmanager
def progress_bar(label: str, total: int, disable: bool = False) -> Iterator[Callable[[int], None]]:
    """A transient rich bar with ETA on a terminal's stderr; nothing when output is captured (or `disable`)."""
    if disable or not sys.stderr.isatty():
        yield lambda k: None
        return
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda k: progress.advance(task, k)


# ---------------------------------------------------------------- names from prompts

_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def safe_name(prompt: str, max_len: int = 120) -> str:
    """A file-name stem from a prompt that can never leave its folder: the 003 layout (spaces -> `_`).

    Keeps letters, digits and `-_.,'()`; drops separators, control characters and anything else; no
    leading dots, no Windows-reserved names, at most `max_len` characters (so `_<pos>.png` still fits).
    """
    chars = [c if (c.isalnum() or c in "-_.,'()") else ("_" if c.isspace() or c in "/\\" else "") for c in prompt]
    stem = re.sub(r"_+", "_", "".join(chars)).strip("._ ")[:max_len].rstrip("._ ")
    if not stem or stem.lower().split(".")[0] in _RESERVED:
        stem = "prompt_" + stem if stem else "prompt"
    return stem


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """One prompt a line; blank lines and `#` comments skipped (for shell scripts looping over prompt sets)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DiffcliError(f"cannot read prompts file {path}: {getattr(e, 'strerror', None) or e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DiffcliError(f"prompts file {path} has no prompts (one a line)")
    return prompts


# ---------------------------------------------------------------- images

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


def save_image(path: str | os.PathLike, x: torch.Tensor) -> None:
    """Save one (C,H,W) image in [-1, 1] as PNG, atomically."""
    with atomic_path(path) as tmp:
        _pil(to_uint8(x)).save(tmp, format="PNG")


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


# ---------------------------------------------------------------- run records

def package_versions(packages: Iterable[str]) -> dict[str, str]:
    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), **package_versions(("diffcli", "torch", "diffusers", "transformers"))}


def write_run_json(out_dir: Path, command: str, options: dict[str, Any], device: torch.device | str,
                   **extra: Any) -> None:
    """Record what produced a folder: argv, every option, versions, device and time."""
    record = {
        "command": command,
        "argv": sys.argv,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
        "versions": versions(),
        "device": str(device),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    write_json(Path(out_dir) / "run.json", record)


RESUME_IGNORES = ("out", "device", "overwrite", "resume", "batch_size", "view_batch")


def begin_output(out: str | os.PathLike, overwrite: bool, resume: bool, options: dict[str, Any],
                 ignore: Sequence[str] = RESUME_IGNORES) -> Path:
    """Prepare the output folder of a command that writes many files.

    With `resume`, the folder must hold the run.json of a run with the same options (those in `ignore` may
    differ: they change speed or place, not pixels); the caller then skips outputs already written.
    """
    out = Path(out)
    if not resume:
        return prepare_out_dir(out, overwrite)
    try:
        before = json.loads((out / "run.json").read_text())["options"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DiffcliError(f"--resume: {out} holds no run.json of an earlier run; start without --resume") from None
    now = json.loads(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}))
    differ = sorted(k for k in set(before) | set(now) if k not in ignore and before.get(k) != now.get(k))
    if differ:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differ[:4])
        raise DiffcliError(f"--resume: options differ from the run in {out} ({shown}); resume with the same options")
    for stale in atomic_temp_files(out):
        stale.unlink(missing_ok=True)
    return prepare_out_dir(out, True)


# ---------------------------------------------------------------- checkpoints (safetensors only)

PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # raw pickle protocol 2+, torch.save zip archive


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Nested dicts/lists of tensors and plain values -> (flat tensors, JSON-able skeleton)."""
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().contiguous().cpu()
        return tensors, {"__tensor__": prefix}
    if isinstance(obj, dict):
        skel = {}
        for k, v in obj.items():
            t, s = flatten_state(v, f"{prefix}.{k}" if prefix else str(k))
            tensors.update(t)
            skel[str(k)] = s
        return tensors, {"__dict__": skel, "__intkeys__": all(isinstance(k, int) for k in obj) and bool(obj)}
    if isinstance(obj, (list, tuple)):
        skel_list = []
        for i, v in enumerate(obj):
            t, s = flatten_state(v, f"{prefix}.{i}")
            tensors.update(t)
            skel_list.append(s)
        return tensors, {"__list__": skel_list, "__tuple__": isinstance(obj, tuple)}
    return tensors, {"__value__": obj}


def unflatten_state(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if "__tensor__" in skel:
        return tensors[skel["__tensor__"]]
    if "__dict__" in skel:
        conv = int if skel.get("__intkeys__") else str
        return {conv(k): unflatten_state(v, tensors) for k, v in skel["__dict__"].items()}
    if "__list__" in skel:
        items = [unflatten_state(v, tensors) for v in skel["__list__"]]
        return tuple(items) if skel.get("__tuple__") else items
    return skel["__value__"]


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write tensors + a JSON metadata record as one safetensors file, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"diffcli": json.dumps(meta)})


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a diffcli safetensors file; refuse pickles and say clearly what is wrong with a bad file."""
    path = Path(path)
    if not path.is_file():
        raise DiffcliError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(PICKLE_MAGIC):
        raise DiffcliError(f"{path} is a pickle/torch.save file; diffcli never unpickles weights (convert it to safetensors)")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta_text = (f.metadata() or {}).get("diffcli")
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise DiffcliError(f"{path} is not a readable safetensors file (truncated or corrupt?): {str(e).splitlines()[0]}") from e
    if meta_text is None:
        raise DiffcliError(f"{path} is a safetensors file but not a diffcli checkpoint (no 'diffcli' metadata)")
    return tensors, json.loads(meta_text)


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def add_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


# ---------------------------------------------------------------- third-party libraries and downloads

@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """open_clip/huggingface/clean-fid log warnings and progress bars we restate ourselves (or that do not apply)."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def reachable(url: str, timeout: float = 3.0) -> bool:
    """A quick connection test, so that an offline machine gets our message now, not after minutes of retries."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
