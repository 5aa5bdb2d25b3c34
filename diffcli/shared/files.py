"""Atomic files."""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import DiffcliError
from .inputs import input_path, read_json


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
    """A JSON file named by a setting (a file, a pipe or `-`); a missing, malformed or too deep file is a one-line
    error naming the setting (`inputs.read_json`)."""
    return read_json(path, f"{option} {what}", stream=True)


def check_folder(path: str | os.PathLike, what: str = "folder") -> Path:
    """An input folder that must exist."""
    return input_path(path, what, "folder")


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
