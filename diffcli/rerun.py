"""diffcli rerun: run a command again from the run.json it wrote (its argv and working folder), into a new folder;
or, given an image diffcli wrote, the command line that image carries, narrowed to that image where the command says
how (`image.rerun` in its settings, e.g. sample's --n), and check that the image comes out with the same pixels."""
from __future__ import annotations

import contextlib
import os
import shlex
from pathlib import Path
from dataclasses import MISSING, dataclass
from typing import Any, Iterator, Optional

from .runner import Command, CommandExit, RunContext
from .shared.errors import DiffcliError
from .shared.fields import opt
from .shared.image_settings import read_settings
from .data.image_folders import is_regular
from .shared.inputs import read_json

RERUNNABLE = ("train", "sample", "seg", "panorama", "anagram", "pg", "sweep")
OUTPUT_FLAGS = ("--out", "--resume", "--overwrite")


def record_and_folder(path: str | Path) -> tuple[Path, Path]:
    """(the run record, the output folder it describes): OUT/run.json, or OUT.run.json beside OUT (panorama,
    anagram); a folder means the record inside it."""
    path = Path(os.path.abspath(path))  # `diffcli rerun run.json` inside the run's folder: the folder has a name
    if path.is_dir():
        return path / "run.json", path
    if path.name.endswith(".run.json"):
        return path, path.with_name(path.name[: -len(".run.json")])
    return path, path.parent


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not os.path.lexists(path):
        raise DiffcliError(f"no run.json at {path}")
    record = read_json(path, "run record")  # the path checked, its size and depth bounded
    if not (isinstance(record, dict) and isinstance(record.get("argv"), list) and isinstance(record.get("command"), str)
            and all(isinstance(a, str) for a in record["argv"])):
        raise DiffcliError(f"{path} is no diffcli run record (it needs command and argv)")
    return record


def replay_argv(record: dict[str, Any], out: Path) -> list[str]:
    """The recorded command line, from the command name on, with --out set to `out` (--resume/--overwrite dropped)."""
    command = record["command"].split()[0]
    if command not in RERUNNABLE:
        raise DiffcliError(f"cannot rerun a `{record['command']}` record; rerun takes {', '.join(RERUNNABLE)}")
    args = record["argv"][1:]
    if command not in args:
        raise DiffcliError(f"the record's argv does not name the command {command!r}: {' '.join(args)[:200]}")
    args = args[args.index(command) + 1:]
    kept: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if a.startswith("--out=") or a in ("--resume", "--overwrite"):
            continue
        kept.append(a)
    return [command, *kept, "--out", str(out.resolve())]


@contextlib.contextmanager
def working_folder(record: dict[str, Any]) -> Iterator[None]:
    """The run's working folder, so its relative paths mean what they meant (the current one if it is gone)."""
    before = os.getcwd()
    cwd = record.get("cwd")
    if isinstance(cwd, str) and Path(cwd).is_dir():
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)


def is_png(path: str | Path) -> bool:
    """A PNG named as one or starting with its signature (a run record never does)."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        return True
    if not is_regular(path):  # never open a FIFO or device to sniff it (opening a FIFO blocks)
        return False
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def image_record(path: Path) -> tuple[dict[str, Any], list[str], str, Path]:
    """From the settings an image carries: (the run record to replay, the arguments that narrow the run to the
    image, the image's file name inside the run's output folder, that folder)."""
    settings = read_settings(path)
    if settings is None:
        raise DiffcliError(f"{path} carries no diffcli settings; rerun takes an image diffcli wrote, a run.json, or "
                           f"a run's folder")
    file = settings.get("file")
    if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
        raise DiffcliError(f"{path} lies outside its run's output folder (its settings name no file inside it); "
                           f"rerun the run's record instead")
    narrow = (settings.get("image") or {}).get("rerun", [])
    if not (isinstance(narrow, list) and all(isinstance(a, str) for a in narrow)):
        raise DiffcliError(f"{path}: its settings' image.rerun is no list of arguments")
    folder = path.absolute().parents[len(Path(file).parts) - 1]
    return settings, narrow, Path(file).as_posix(), folder


def same_pixels(a: Path, b: Path) -> bool:
    """Two images decode to the same mode, size and pixels."""
    import numpy as np
    from PIL import Image
    with Image.open(a) as x, Image.open(b) as y:
        return x.mode == y.mode and x.size == y.size and np.array_equal(np.asarray(x), np.asarray(y))


@dataclass
class RerunConfig:
    record: Path = opt(MISSING, argument=True, metavar="RUN_JSON|IMAGE.png", panel="input",
                       help="The run record of a diffcli run: OUT/run.json, OUT.run.json (panorama, anagram), or the "
                            "folder OUT; or an image diffcli wrote (its settings name the run and the image).")


def rerun_image(image: Path, ctx: RunContext) -> int:
    """`diffcli rerun IMAGE`: the image's command line, narrowed to it, into --out (default: beside the run's
    folder, `<folder>-<image name>-rerun`); then the image written there is compared with IMAGE, pixel by pixel."""
    data, narrow, file, folder = image_record(image)
    out = (ctx.out or folder.with_name(f"{folder.name}-{Path(file).stem}-rerun")).resolve()
    argv = replay_argv(data, out)
    device = data.get("device")  # the kind the image was drawn on: another kind rounds otherwise
    argv[-2:-2] = [*narrow, *(["--device", device] if device in ("cpu", "cuda", "mps") else [])]  # the last wins
    if ctx.overwrite:
        argv.append("--overwrite")
    ctx.echo_err(f"diffcli {' '.join(argv)}")
    with working_folder(data):
        code = ctx.commands.run(argv[0], argv[1:])
    if code:
        raise CommandExit(code)
    again = out / file
    if not again.is_file():
        raise DiffcliError(f"the rerun wrote no {file} in {again.parent}")
    if not same_pixels(image, again):
        ctx.echo_err(f"error: {again} differs from {image} (other devices or library versions than the run's? "
                     f"`diffcli info {image}` shows them)")
        raise CommandExit(1)
    ctx.echo(f"{again}: the same pixels as {image}")
    return 0


def main(cfg: RerunConfig, ctx: RunContext) -> int:
    """`diffcli rerun`: the recorded command line, in its working folder, through `ctx.commands`."""
    if is_png(cfg.record):
        return rerun_image(cfg.record, ctx)
    path, folder = record_and_folder(cfg.record)
    data = read_record(path)
    argv = replay_argv(data, ctx.out or folder.with_name(folder.name + "-rerun"))
    target = Path(argv[-1])
    if ctx.overwrite:
        argv.append("--overwrite")
    elif target.is_dir() and any(target.iterdir()):  # the record's --config may say `overwrite`: only the user may
        raise DiffcliError(f"output folder {target} is not empty; pass --overwrite or choose another --out")
    ctx.echo_err(shlex.join(["diffcli", *argv]))
    with working_folder(data):
        code = ctx.commands.run(argv[0], argv[1:])
    if code:
        raise CommandExit(code)
    return code


COMMAND = Command(
    "rerun", RerunConfig, lambda cfg: None, main, config_file=False,
    context={"out": {"default": None, "cli_type": Optional[Path],
                     "help": "Where to write the rerun (default: the run's folder + '-rerun'); refused if not empty "
                             "unless --overwrite."},
             "overwrite": {}},
    help="""Run a command again from the run.json it wrote: the same command line, in the same working folder, into a
    new output folder (the same files, byte for byte, on the same machine and versions).

    Example: diffcli rerun digits/run.json --out digits-again

    Given an image diffcli wrote, it reruns the command line the image carries (a sample's only as far as the
    sample's network group) and checks that the image comes out with the same pixels.

    Example: diffcli rerun digits/00003-seed3-label3.png --out sample-3-again
    """)
