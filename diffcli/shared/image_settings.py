"""The generation settings every PNG diffcli writes carries, in PNG text chunks, as other generation tools do.

Two chunks: `diffcli`, JSON (`SCHEMA`): the run's command line and working folder (what `diffcli rerun IMAGE`
replays), its command, options, device and versions, and for a sample its own facts (`image`: index, seed, label,
prompt, its file name inside the output folder, and the arguments that draw it alone); and `parameters`, the
one-paragraph form that other tools' image browsers read (prompt, then `Steps: .., Sampler: .., CFG scale: ..,
Seed: .., Size: WxH, Model: .., Version: diffcli ..`). Figures (grids, strips, plots) carry the run's settings
only. Nothing of the moment (no time stamp) goes in, so an image's bytes stay a function of its command line.

A run notes its settings once (`note_run`, from `shared.records` when a run begins or writes its record); the image
writers of `shared.images` read them here. Reading back (`read_settings`) is bounded: the chunk's size and its JSON
nesting, like every JSON file diffcli reads.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import zlib
from pathlib import Path
from typing import Any, Iterator

from .errors import DiffcliError
from .inputs import parse_json

KEY = "diffcli"             # the JSON chunk
PARAMETERS_KEY = "parameters"  # the A1111-style chunk other tools read
SCHEMA = 1
SETTINGS_MAX_BYTES = 1 << 20  # a chunk read back: at most 1 MiB of JSON
DEPTH_MAX = 32                # and at most this deep
OPTION_MAX_CHARS = 2000       # an option value longer than this (a list of 50,000 prompts) is left out of images

# where output goes and how fast, not what it holds (records.RESUME_IGNORES: the options that change no pixel): left
# out of images, so a run resumed, spread over torchrun ranks, batched otherwise or sent to another --out writes the
# same bytes. The device's kind is kept apart (`device`). A batch that is a PG particle set does change pixels:
# sample's images name it in their own `rerun` arguments.
PLACE_FLAGS = ("--out", "--resume", "--overwrite", "--device", "--batch-size", "--view-batch")
PLACE_OPTIONS = ("out", "resume", "overwrite", "device", "batch_size", "view_batch")

_RUN: contextvars.ContextVar[tuple[dict[str, Any], str | None] | None] = contextvars.ContextVar("image_settings",
                                                                                              default=None)


def note_run(settings: dict[str, Any] | None, out: str | os.PathLike | None = None) -> None:
    """The settings of the run now writing images into the folder `out` (None: no run; its images carry
    nothing)."""
    _RUN.set(None if settings is None else (settings, None if out is None else str(out)))


def current() -> dict[str, Any] | None:
    run = _RUN.get()
    return None if run is None else run[0]


def command_line(argv: list[str], command: str) -> list[str]:
    """`diffcli COMMAND ARGS` from a process's argv (a console script, `python -m diffcli`, torchrun's), without
    where its output went (`PLACE_FLAGS` and their values): what reproduces the pixels anywhere."""
    name = command.split()[0]
    args = list(argv[argv.index(name) + 1:]) if name in argv else list(argv[1:])
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in PLACE_FLAGS[:1] + PLACE_FLAGS[3:]:  # flags with a value
            skip = True
        elif not (a.startswith(tuple(f + "=" for f in PLACE_FLAGS)) or a in ("--resume", "--overwrite")):
            kept.append(a)
    return ["diffcli", name, *kept]


def keep() -> contextvars.Token:
    """The settings now noted, to `restore` when a run's block ends (`shared.dist.Dist`), so a run's settings never
    reach files written after it (a library user's own images)."""
    return _RUN.set(_RUN.get())


def restore(token: contextvars.Token) -> None:
    _RUN.reset(token)


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """What runs inside notes its own settings; those around it come back after (a sweep's setting, a rerun)."""
    token = _RUN.set(None)
    try:
        yield
    finally:
        _RUN.reset(token)


def run_settings(command: str, argv: list[str], cwd: str, options: dict[str, Any], device: str,
                 versions: dict[str, str]) -> dict[str, Any]:
    """What every image of a run carries: enough to run it again (its command line without where the output went,
    the working folder, the kind of device) and to read what it was. Option values too long for an image
    (`OPTION_MAX_CHARS` of JSON) are named in `omitted` instead: run.json holds them."""
    kept, omitted = {}, []
    for k, v in options.items():
        if k in PLACE_OPTIONS:
            continue
        v = str(v) if isinstance(v, Path) else v
        try:
            text = json.dumps(v)
        except (TypeError, ValueError):
            text, v = json.dumps(str(v)), str(v)
        if len(text) > OPTION_MAX_CHARS:
            omitted.append(k)
        else:
            kept[k] = v
    return {"schema": SCHEMA, "diffcli": versions.get("diffcli", "unknown"), "command": command,
            "argv": command_line(argv, command), "cwd": cwd, "device": str(device).split(":")[0], "options": kept, **({"omitted": omitted} if omitted else {}),
            "versions": versions}


def image_settings(path: str | os.PathLike, image: dict[str, Any] | None) -> dict[str, Any] | None:
    """The settings `path` carries: the run's, its file name inside the run's output folder, and `image`, the
    sample's own facts (None for a figure); None outside a run."""
    run = _RUN.get()
    if run is None:
        return None
    settings, out = dict(run[0]), run[1]
    if out is not None:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(out))
        if not rel.startswith(".."):
            settings["file"] = Path(rel).as_posix()
    if image:
        settings["image"] = image
    return settings


def _first(options: dict[str, Any], *names: str) -> Any:
    for name in names:
        if options.get(name) not in (None, "", []):
            return options[name]
    return None


def parameters_text(settings: dict[str, Any], size: tuple[int, int]) -> str:
    """The A1111-style paragraph: the prompt (if any), `Negative prompt: ..`, then `Key: value` pairs."""
    options, image = settings.get("options", {}), settings.get("image") or {}
    prompt = image.get("prompt") or _first(options, "prompt", "prompts")
    if isinstance(prompt, list):
        prompt = " | ".join(map(str, prompt))
    lines = [str(prompt)] if prompt else []
    negative = _first(options, "negative_prompt", "negative")
    if negative:
        lines.append(f"Negative prompt: {negative}")
    pairs = [("Steps", _first(options, "steps")), ("Sampler", _first(options, "sampler")),
             ("Schedule type", _first(options, "schedule")),
             ("CFG scale", _first(options, "cfg", "guidance")), ("Seed", image.get("seed", _first(options, "seed"))),
             ("Label", image.get("label")), ("Size", f"{size[0]}x{size[1]}"),
             ("Model", _first(options, "model", "checkpoint", "stage1")), ("Command", settings.get("command")),
             ("Version", f"diffcli {settings.get('diffcli')}")]
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs if v is not None))
    return "\n".join(lines)


def png_info(settings: dict[str, Any] | None, size: tuple[int, int]):
    """PIL's PngInfo holding the two chunks (None: no settings, a plain PNG)."""
    if settings is None:
        return None
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    # compressed (a zlib iTXt chunk): a 28 x 28 sample is ~300 bytes of pixels, its settings ~2 KB of JSON
    info.add_itxt(KEY, json.dumps(settings, sort_keys=True), zip=True)
    params = parameters_text(settings, size)
    try:
        params.encode("latin-1")
        info.add_text(PARAMETERS_KEY, params)
    except UnicodeEncodeError:
        info.add_itxt(PARAMETERS_KEY, params)
    return info


# ---------------------------------------------------------------- reading back

def parse_settings(text: str, where: str) -> dict[str, Any]:
    """The one place a settings chunk becomes a value: bounded in size and nesting, a JSON object with a command
    line, else a one-line error naming `where`."""
    if len(text) > SETTINGS_MAX_BYTES:
        raise DiffcliError(f"{where}: its diffcli settings are {len(text)} bytes; diffcli reads at most "
                           f"{SETTINGS_MAX_BYTES}")
    value = parse_json(text, f"{where}: its diffcli settings", DEPTH_MAX)
    if not (isinstance(value, dict) and isinstance(value.get("command"), str) and isinstance(value.get("argv"), list)
            and all(isinstance(a, str) for a in value["argv"])):
        raise DiffcliError(f"{where}: its diffcli settings name no command line (command, argv)")
    return value


def read_settings(path: str | os.PathLike) -> dict[str, Any] | None:
    """The settings a PNG carries; None for an image without them; a one-line error for a file that is no
    readable image (missing, a folder, not a picture, truncated)."""
    from PIL import Image
    path = Path(path)
    if not path.exists():
        raise DiffcliError(f"image not found: {path}")
    if not path.is_file():
        raise DiffcliError(f"{path} is not a regular file")
    try:
        with Image.open(path) as im:
            im.load()  # text chunks after the pixels, and a truncated file, show only when decoded
            text = getattr(im, "text", {}).get(KEY) if im.format == "PNG" else None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DiffcliError(f"cannot read image {path}: {reason[:200]} (not an image, or a corrupt or truncated "
                           f"file?)") from None
    if text is None:
        return None
    return parse_settings(str(text), str(path))
