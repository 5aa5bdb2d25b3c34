"""What a command reads from outside, checked in one place: paths (`input_path`), streams (`read_stream`), JSON
read back (`read_json`) and environment variables (`env_number`). Each problem is one line naming the input, its
value quoted to a short prefix (`shown`)."""
from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DiffcliError

SHOWN_MAX = 60                  # characters of a user's value a message quotes
PATH_SHOWN_MAX = 200            # a path's (its tail says which file)
JSON_MAX_BYTES = 256 * 2**20    # a JSON file read back (a run.json of 10^6 samples is ~100 MB)
JSON_MAX_DEPTH = 64             # nesting of a JSON file read back (ours nest 5 deep)
STREAM_MAX_BYTES = 64 * 2**20   # a prompts file, a pipe or standard input
STDIN = "-"                     # `--prompts-file -`: standard input


def shown(value: Any, limit: int = SHOWN_MAX) -> str:
    """A value as a one-line message quotes it: repr, cut to `limit` characters with the full length said."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


MESSAGE_MAX = 600  # characters of one error line; beyond it a message is cut (a value pasted whole into it)


QUOTED_MAX = 300  # a quoted run longer than this in a message is a value pasted whole (ours quote <= 200 + text)
_QUOTED = re.compile("'([^'\\n]{%d,})'|\"([^\"\\n]{%d,})\"" % (QUOTED_MAX + 1, QUOTED_MAX + 1))


def one_line(message: str, limit: int = MESSAGE_MAX) -> str:
    """An error message as the one line the user sees: every quoted value cut to a short prefix (`shown`; a value
    a library or an older check pasted whole), line breaks folded, at most `limit` characters."""
    text = _QUOTED.sub(lambda m: shown(m.group(1) or m.group(2)), str(message))
    text = " ".join(text.splitlines())
    return text if len(text) <= limit else f"{text[:limit]}... (message cut: {len(text)} characters)"


_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket"}


def _what_is(mode: int) -> str:
    return "a folder" if stat.S_ISDIR(mode) else _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def input_path(path: str | os.PathLike, what: str, kind: str = "file", stream: bool = False) -> Path:
    """THE check of a path a command reads (checkpoints, pipelines, prompts files, configs, run records, eval
    folders, dataset roots): it exists after following links, and is what `kind` says ("file": a regular file,
    or with `stream` also a pipe or a terminal such as `<(...)` and /dev/stdin; "folder"; "any": a file or a
    folder), and can be read. A symlink loop, a dangling link, a folder where a file belongs, a device, FIFO or
    socket, an unreadable file: one line naming `what` and the path."""
    text = os.fspath(path)
    name = f"{what} {shown(text, PATH_SHOWN_MAX)}"
    if not text:
        raise DiffcliError(f"{what}: the path is empty")
    try:
        mode = os.stat(text).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DiffcliError(f"{name} is a symlink loop (a link that points back to itself)") from None
        if e.errno == errno.ENOENT and os.path.islink(text):
            raise DiffcliError(f"{name} is a dangling symlink (to {shown(os.readlink(text))}, which does not "
                               "exist)") from None
        if e.errno == errno.ENOENT:
            raise DiffcliError(f"{what} not found: {shown(text, PATH_SHOWN_MAX)}") from None
        if e.errno == errno.ENOTDIR:
            raise DiffcliError(f"{name} not found (a part of it is a file, not a folder)") from None
        if e.errno == errno.EACCES:
            raise DiffcliError(f"{name} cannot be reached: permission denied") from None
        raise DiffcliError(f"{name}: {e.strerror or e}") from None
    if kind == "folder" and not stat.S_ISDIR(mode):
        raise DiffcliError(f"{name} is {_what_is(mode)}, not a folder")
    if kind in ("file", "any") and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) and kind == "any"):
        if stat.S_ISDIR(mode):
            raise DiffcliError(f"{name} is a folder, not a file")
        if not (stream and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) and not _is_null(text))):
            raise DiffcliError(f"{name} is {_what_is(mode)}, not a regular file")
    need = os.R_OK | (os.X_OK if stat.S_ISDIR(mode) else 0)
    if not os.access(text, need, effective_ids=os.access in os.supports_effective_ids):
        raise DiffcliError(f"{name} cannot be read: permission denied")
    return Path(text)


def _is_null(path: str) -> bool:
    """/dev/null and the like read as empty forever: no stream of prompts."""
    try:
        return os.path.samefile(path, os.devnull)
    except OSError:
        return False


def read_stream(path: str | os.PathLike, what: str, max_bytes: int = STREAM_MAX_BYTES) -> str:
    """A text input read once, at most `max_bytes`: a file, a pipe (`<(printf ...)`) or standard input (`-`).
    UTF-8; a larger or undecodable input is one line."""
    text = os.fspath(path)
    try:
        if text == STDIN:
            data = sys.stdin.buffer.read(max_bytes + 1) if hasattr(sys.stdin, "buffer") else \
                sys.stdin.read(max_bytes + 1).encode("utf-8")
            name = f"{what} (standard input)"
        else:
            # non-blocking open: a named FIFO no one writes to reads as empty instead of hanging (a pipe from
            # `<(...)` has its writer already); then blocking reads, so a slow writer is waited for
            fd = os.open(input_path(text, what, "file", stream=True), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)
            with os.fdopen(fd, "rb") as f:
                data = f.read(max_bytes + 1)
            name = f"{what} {shown(text)}"
    except OSError as e:
        raise DiffcliError(f"cannot read {what} {shown(text)}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise DiffcliError(f"{name} is larger than {max_bytes // 2**20} MiB; split it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DiffcliError(f"{name} is not UTF-8 text (byte {e.start})") from None


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def json_depth(data: bytes) -> int:
    """How deep a JSON text nests arrays and objects (brackets inside strings do not count); linear time."""
    bare = np.frombuffer(_STRING.sub(b'""', data), dtype=np.uint8)
    if not bare.size:
        return 0
    steps = (np.isin(bare, (ord("["), ord("{"))).astype(np.int64) - np.isin(bare, (ord("]"), ord("}"))))
    return int(np.cumsum(steps).max(initial=0))


def read_json(path: str | os.PathLike, what: str, max_bytes: int = JSON_MAX_BYTES,
              max_depth: int = JSON_MAX_DEPTH, stream: bool = False) -> Any:
    """THE reader of every JSON file diffcli reads back (run records, eval.json, a sweep's records, prompt sets,
    configs): the path checked (`input_path`), at most `max_bytes` read, at most `max_depth` levels of nesting
    (json's recursion never reached), malformed text named in one line."""
    data = read_stream(path, what, max_bytes).encode("utf-8") if stream else _read_bytes(path, what, max_bytes)
    return parse_json(data, f"{what} {shown(os.fspath(path))}", max_depth)


def parse_json(data: bytes | str, name: str, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """JSON text (a file's, a checkpoint's metadata) with its nesting bounded; `name` says whose in messages."""
    data = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    depth = json_depth(data)
    if depth > max_depth:
        raise DiffcliError(f"{name} nests {depth} levels deep (at most {max_depth}); it is no file diffcli wrote")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise DiffcliError(f"{name} is not valid JSON: {reason}") from None


def _read_bytes(path: str | os.PathLike, what: str, max_bytes: int) -> bytes:
    checked = input_path(path, what, "file")
    try:
        with open(checked, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise DiffcliError(f"cannot read {what} {shown(os.fspath(path))}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise DiffcliError(f"{what} {shown(os.fspath(path))} is larger than {max_bytes // 2**20} MiB; it is no "
                           "file diffcli wrote")
    return data


def env_number(name: str, default: float, low: float, high: float, integer: bool = False, meaning: str = "") -> Any:
    """THE reader of an environment variable holding a number: unset or blank gives `default`; anything else must
    be an integer (or, without `integer`, a finite number) in [low, high], else one line naming the variable, its
    value (a short prefix) and the range. `meaning` says what the variable does."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    value: Any = None
    try:
        value = int(text) if integer else float(text)
    except (ValueError, OverflowError):
        pass
    if value is None or (not integer and not math.isfinite(value)) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise DiffcliError(f"environment variable {name}={shown(text, 40)}: expected {kind} in [{low:g}, {high:g}]"
                           + (f" ({meaning})" if meaning else ""))
    return value
