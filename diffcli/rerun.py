"""diffcli rerun: run a command again from the run.json it wrote (its argv and working folder), into a new folder."""
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


@dataclass
class RerunConfig:
    record: Path = opt(MISSING, argument=True, metavar="RUN_JSON", panel="input",
                       help="The run record of a diffcli run: OUT/run.json, OUT.run.json (panorama, anagram), or the "
                            "folder OUT.")


def main(cfg: RerunConfig, ctx: RunContext) -> int:
    """`diffcli rerun`: the recorded command line, in its working folder, through `ctx.commands`."""
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
    """)
