"""Shared layer: errors, device/dtype, seeding, image/grid/GIF/JSON IO, atomic writes, checkpoints, quiet
third-party libraries."""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import io
import json
import logging
import math
import os
import platform
import re
import socket
import stat
import sys
import tempfile
import unicodedata
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

# atomic_path's temp names: `.diffcli.<target name>.<8 random [a-z0-9_]>.tmp` (mkstemp's random part), a form no
# user file has by accident, so --resume clears exactly what killed writers of ours left and nothing else
TEMP_PREFIX, TEMP_SUFFIX = ".diffcli.", ".tmp"
ATOMIC_TEMP = re.compile(r"\.diffcli\.[^/]+\.[a-z0-9_]{8}\.tmp")
TEMP_NAME_BYTES = len(TEMP_PREFIX) + len(".12345678") + len(TEMP_SUFFIX)  # what a temp name adds: 22 bytes


def atomic_temp_files(*folders: str | os.PathLike) -> list[Path]:
    """Temp files atomic_path left directly in `folders` (writers killed mid-write): regular files named exactly as
    ATOMIC_TEMP, never anything in a subfolder (a command names the subfolders it writes itself)."""
    found: list[Path] = []
    for folder in folders:
        try:
            with os.scandir(folder) as entries:
                found += [Path(e.path) for e in entries
                          if ATOMIC_TEMP.fullmatch(e.name) and e.is_file(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            continue
    return sorted(found)


def clear_temp_files(*folders: str | os.PathLike) -> None:
    """--resume: delete the temp files killed writers left in `folders` (the output folder and the subfolders the
    command itself writes; see atomic_temp_files)."""
    for stale in atomic_temp_files(*folders):
        stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds.

    A reader (or a process killed half way) sees the old file or the new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:  # e.g. a name too long for the file system: name the file the user asked for
        raise OSError(e.errno, e.strerror, str(path)) from e
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


NAME_MAX_BYTES = 255  # a file name's limit in bytes (Linux NAME_MAX; macOS and Windows allow 255 characters)
# a stem from user text, in UTF-8 bytes: leaves room for `-<k>` (unique_stems), the suffixes commands add
# (`_<pos>.png`, `_seed<k>.png`, `_strip.png`) and atomic_path's temp name (TEMP_NAME_BYTES) within NAME_MAX_BYTES
STEM_MAX_BYTES = 160


def _cap_bytes(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` in UTF-8, at a character boundary."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def safe_name(prompt: str, max_len: int = 120, max_bytes: int = STEM_MAX_BYTES) -> str:
    """A file-name stem from a prompt that can never leave its folder: the 003 layout (spaces -> `_`).

    Keeps letters, digits and `-_.,'()`; drops separators, control characters and anything else; no
    leading dots, no Windows-reserved names, at most `max_len` characters and `max_bytes` UTF-8 bytes (multi-byte
    scripts reach the file system's 255-byte limit long before 120 characters), so suffixes and temp names fit.
    """
    chars = [c if (c.isalnum() or c in "-_.,'()") else ("_" if c.isspace() or c in "/\\" else "") for c in prompt]
    stem = re.sub(r"_+", "_", "".join(chars)).strip("._ ")
    stem = _cap_bytes(stem[:max_len], max_bytes).rstrip("._ ")
    if not stem or stem.lower().split(".")[0] in _RESERVED:
        stem = _cap_bytes("prompt_" + stem, max_bytes).rstrip("._ ") if stem else "prompt"
    return stem


def _same_file_key(name: str) -> str:
    """Names a case-insensitive, normalising file system (macOS, Windows) takes for the same file compare equal."""
    return unicodedata.normalize("NFC", name).casefold()


def unique_stems(texts: Sequence[str], files: Callable[[int, str], Iterable[str]] | None = None,
                 max_len: int = 120) -> list[str]:
    """THE rule for file names from user text (seg, panorama, anagram): item i's stem is `safe_name(texts[i])`;
    where any file it names (`files(i, stem)`, default just the stem) is one an earlier item already names, the
    first of `stem-2`, `stem-3`, ... whose files are all free. So 'a cat' and 'a/cat' give `a_cat` and `a_cat-2`
    and nothing is overwritten; names compare as on a case-insensitive file system ('A cat' vs 'a cat')."""
    files = files or (lambda i, stem: [stem])
    claimed: set[str] = set()
    stems = []
    for i, text in enumerate(texts):
        base = safe_name(text, max_len)
        stem, k = base, 2
        while any(_same_file_key(f) in claimed for f in files(i, stem)):
            stem, k = f"{base}-{k}", k + 1
        claimed.update(_same_file_key(f) for f in files(i, stem))
        stems.append(stem)
    return stems


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name, in bytes, that `folder`'s file system takes (its nearest existing ancestor's)."""
    path = Path(os.path.abspath(folder))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return int(os.pathconf(path, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer
        return NAME_MAX_BYTES


def check_file_names(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Before any work: every file a command will write in `folder` (relative names; each part counts) fits the
    file system's name limit together with atomic_path's temp name; else one line naming the file."""
    limit = name_max(folder)
    for name in names:
        for part in Path(name).parts:
            size = len(os.fsencode(part))
            if size + TEMP_NAME_BYTES > limit:
                raise DiffcliError(f"file name {part[:48]!r}... is {size} bytes; with the {TEMP_NAME_BYTES}-byte temp "
                                   f"name it is written under first, that exceeds the {limit}-byte name limit of the "
                                   f"file system of {folder}; shorten the prompt (or --seed) or choose another --out")


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
    """Save one (C,H,W) image in [-1, 1] as PNG, atomically; never one with NaN/inf (they would turn black)."""
    check_finite_image(path, x)
    with atomic_path(path) as tmp:
        _pil(to_uint8(x)).save(tmp, format="PNG")


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
                   record_path: Path | None = None, **extra: Any) -> None:
    """Record what produced a folder: argv, every option, versions, device and time; in OUT/run.json, or at
    `record_path` (panorama and anagram: OUT.run.json beside the folder, see `beside`)."""
    record = {
        "command": command,
        "argv": sys.argv,
        "cwd": os.getcwd(),  # where relative paths in argv were meant (diffcli rerun)
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
        "versions": versions(),
        "device": str(device),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    write_json(record_path or Path(out_dir) / "run.json", record)


# panorama and anagram write folders a grader opens entry by entry (the 003 grader: every entry of glob(OUT/*)
# through PIL), so their run record and animations live next to the folder, never in it
RECORD_BESIDE = ".run.json"


def beside(out: str | os.PathLike, suffix: str) -> Path:
    """`OUT<suffix>` next to the folder OUT (`wide_images` -> `wide_images.run.json`); OUT given as `.` or
    `a/..` is named by its absolute path first. The root has nothing beside it: a one-line error."""
    path = Path(out)
    if path.name in ("", ".", ".."):
        path = Path(os.path.abspath(path))
    if not path.name:
        raise DiffcliError(f"--out {out}: panorama and anagram keep their run record beside the output folder "
                           f"({suffix}), and {out} has no folder around it; choose a subfolder")
    return path.with_name(path.name + suffix)


RECORD_BESIDE_COMMANDS = ("panorama", "anagram")  # their folders are graded entry by entry


def run_record_path(out: str | os.PathLike, command: str) -> Path:
    """Where `command` keeps the run record of its output folder OUT: `OUT.run.json` beside it for panorama and
    anagram, `OUT/run.json` for the other commands. Every reader of a record goes through this."""
    return beside(out, RECORD_BESIDE) if command in RECORD_BESIDE_COMMANDS else Path(out) / "run.json"


def is_run_record(path: str | os.PathLike) -> bool:
    """A plain file (not a symlink, never a FIFO) holding a diffcli run record (`write_run_json`'s)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"command", "argv", "options", "versions"} <= set(record)


def check_beside(out: Path, record: Path, folders: Sequence[Path], overwrite: bool, resume: bool) -> None:
    """Before anything is written: the paths diffcli keeps beside OUT (its run record, `folders` such as the
    animations) are ours or absent, and the folder around OUT is writable. A user's file there is never touched."""
    parent = record.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # prepare_out_dir creates the missing ones
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DiffcliError(f"cannot write {record.name} beside the output folder: {parent} is not writable "
                           f"(panorama and anagram keep their run record next to --out); choose another --out")
    ours = is_run_record(record)
    if os.path.lexists(record) and not ours:
        raise DiffcliError(f"{record} exists and is not a diffcli run record; diffcli keeps the run record of "
                           f"{out} there: move that file away or choose another --out")
    for folder in folders:
        if not os.path.lexists(folder):
            continue
        full = folder.is_dir() and not folder.is_symlink() and any(folder.iterdir())
        if folder.is_symlink() or not folder.is_dir() or (full and not ours):
            raise DiffcliError(f"{folder} exists and was not written by diffcli for {out} (no run record "
                               f"{record.name} beside it); move it away or choose another --out")
        if full and not (overwrite or resume):
            raise DiffcliError(f"{folder} (beside the output folder) is not empty; pass --overwrite or choose "
                               f"another --out")


RESUME_IGNORES = ("out", "device", "overwrite", "resume", "batch_size", "view_batch")


def begin_output(out: str | os.PathLike, overwrite: bool, resume: bool, options: dict[str, Any],
                 ignore: Sequence[str] = RESUME_IGNORES, record_path: Path | None = None,
                 beside_folders: Sequence[Path] = ()) -> Path:
    """Prepare the output folder of a command that writes many files.

    With `resume`, the run record (OUT/run.json, or `record_path` beside OUT for panorama and anagram) must be
    that of a run with the same options (those in `ignore` may differ: they change speed or place, not pixels);
    the caller then skips outputs already written. `beside_folders` (anagram's animations) are checked with the
    record (`check_beside`) and cleared of killed writers' temp files with OUT.
    """
    out = Path(out)
    record = record_path or out / "run.json"
    if record_path is not None:
        check_beside(out, record, beside_folders, overwrite, resume)
    if not resume:
        return prepare_out_dir(out, overwrite)
    try:  # never read a FIFO (it would hang); beside OUT, only our own record
        readable = is_run_record(record) if record_path is not None else stat.S_ISREG(os.stat(record).st_mode)
        before = json.loads(record.read_text())["options"] if readable else None
    except (OSError, ValueError, KeyError, TypeError):
        before = None
    if not isinstance(before, dict):
        if record_path is None:
            raise DiffcliError(f"--resume: {out} holds no run.json of an earlier run; start without --resume")
        stem = len(record.name) - len(RECORD_BESIDE)  # OUT's name, as `beside` spelled it
        moves = [(out / "run.json", record)] + [(out / f.name[stem + 1:], f) for f in beside_folders]
        if is_run_record(out / "run.json"):  # an older diffcli kept them inside the folder
            shown = " and ".join(f"{a} to {b}" for a, b in moves if os.path.lexists(a))
            raise DiffcliError(f"--resume: {out} was written by an older diffcli, with its run record inside; it now "
                               f"lives beside the folder: move {shown}, then resume")
        raise DiffcliError(f"--resume: no run record of an earlier run in {record} (beside {out}); start without "
                           f"--resume")
    now = json.loads(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}))
    differ = sorted(k for k in set(before) | set(now) if k not in ignore and before.get(k) != now.get(k))
    if differ:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differ[:4])
        raise DiffcliError(f"--resume: options differ from the run in {out} ({shown}); resume with the same options")
    clear_temp_files(out, *beside_folders)
    return prepare_out_dir(out, True)


# ---------------------------------------------------------------- memory and image sizes, before allocating

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
        try:
            save_file(tensors, str(tmp), metadata={"diffcli": json.dumps(meta)})
        except Exception as e:  # safetensors' own error type for a failed write (a full disk): an OSError again
            if isinstance(e, OSError):
                raise
            found = re.search(r"os error (\d+)", str(e))
            code = int(found.group(1)) if found else errno.EIO
            raise OSError(code, os.strerror(code), str(tmp)) from e


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a diffcli safetensors file; refuse pickles and say clearly what is wrong with a bad file."""
    path = Path(path)
    if not path.is_file():
        raise DiffcliError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: a u64 header length, then the JSON header; its first byte is 0x80 for 1 length in 256, so only
    # a file without that JSON brace counts as a pickle
    if head.startswith(PICKLE_MAGIC) and head[8:9] != b"{":
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
    try:
        meta = json.loads(meta_text)
    except ValueError as e:
        raise DiffcliError(f"{path}: its 'diffcli' metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DiffcliError(f"{path}: its 'diffcli' metadata is a JSON {type(meta).__name__}, not an object")
    return tensors, meta


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
