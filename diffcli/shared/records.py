"""Run records."""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import datetime as _dt
import platform
import stat
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from .errors import DiffcliError
from .files import clear_temp_files, prepare_out_dir, write_json
from . import image_settings
from .inputs import read_json


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


_RECORDED: contextvars.ContextVar[tuple[list[str], str | None] | None] = contextvars.ContextVar("recorded", default=None)


@contextlib.contextmanager
def recording(argv: list[str] | None, cwd: str | None = None) -> Iterator[None]:
    """Run records written inside note `argv` (and `cwd`) instead of this process's own: a command run by sweep or
    rerun records the command line that reproduces it (runner.RunContext.argv)."""
    token = _RECORDED.set(None if argv is None else (list(argv), cwd))
    try:
        with image_settings.scoped():  # and the images written inside carry that run's settings
            yield
    finally:
        _RECORDED.reset(token)


def note_run(command: str, options: dict[str, Any], device: torch.device | str) -> None:
    """The settings every image this run writes from now on carries (`shared.image_settings`): the command line
    and folder its run record notes, its options, device and versions (no time: an image stays a function of its
    command line). `write_run_json` notes them; a rank or resumed run that writes no record calls this."""
    recorded = _RECORDED.get()
    image_settings.note_run(image_settings.run_settings(
        command, recorded[0] if recorded else sys.argv, (recorded[1] if recorded else None) or os.getcwd(),
        options, str(device), versions()), options.get("out"))


def write_run_json(out_dir: Path, command: str, options: dict[str, Any], device: torch.device | str,
                   record_path: Path | None = None, **extra: Any) -> None:
    """Record what produced a folder: argv, every option, versions, device and time; in OUT/run.json, or at
    `record_path` (panorama and anagram: OUT.run.json beside the folder, see `beside`)."""
    recorded = _RECORDED.get()
    record = {
        "command": command,
        "argv": recorded[0] if recorded else sys.argv,
        "cwd": (recorded[1] if recorded else None) or os.getcwd(),  # where relative paths in argv were meant (diffcli rerun)
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
        "versions": versions(),
        "device": str(device),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    write_json(record_path or Path(out_dir) / "run.json", record)
    note_run(command, options, device)


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


def run_record_path(out: str | os.PathLike, record_beside: bool) -> Path:
    """Where a command keeps the run record of its output folder OUT: `OUT.run.json` beside it for a command whose
    folder is graded entry by entry (`Command.record_beside`: panorama, anagram), else `OUT/run.json`. Every reader
    of a record goes through this."""
    return beside(out, RECORD_BESIDE) if record_beside else Path(out) / "run.json"


def is_run_record(path: str | os.PathLike) -> bool:
    """A plain file (not a symlink, never a FIFO) holding a diffcli run record (`write_run_json`'s)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        record = read_json(Path(path), "run record")
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
        before = read_json(record, "run record")["options"] if readable else None
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
