"""The command contract: every command module exposes one `Command` (its name, Config class, validate and
run(cfg, ctx)); the run context says where output goes and what the run record notes.

    from diffcli.runner import RunContext
    from diffcli.sample import COMMAND, SampleConfig
    COMMAND.run(SampleConfig(n=4), RunContext(out=Path("digits")))

The CLI (`diffcli.cli`) derives each command's options from its Config's field declarations
(`shared/fields.py`), builds the Config with the command's `build` hook, and calls `run`; `sweep` and `rerun` call
the same contract with the argv their run records should note.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .shared.fields import opt
from .shared.libraries import library_warnings
from .shared.records import recording

@dataclass
class RunContext:
    """What a run needs besides its Config. The options declared here (--out, --overwrite, --resume, --device,
    --quiet) are the command line's, shared by the commands that take them (`Command.context`). `argv`/`cwd`: the
    command line and folder run.json records (None: this process's own); `echo`/`echo_err`: where the command's
    lines go; `notes`: what the command line adds to run.json's options; `commands`: diffcli's commands run by argv
    in this process (sweep's settings, rerun)."""
    out: Path = opt(None, "--out", help="Output folder.", panel="output")
    overwrite: bool = opt(False, "--overwrite", help="Write into a non-empty output folder.", panel="output")
    resume: bool = opt(False, "--resume", help="Continue an interrupted run in --out.", panel="output")
    device: str | None = opt(None, "--device", help="auto, cpu, cuda, cuda:N, mps.", panel="model")
    argv: list[str] | None = None
    cwd: str | None = None
    debug: bool = False
    quiet: bool = opt(False, "--quiet", panel="output")
    echo: Callable[[str], None] = field(default=print, repr=False)
    echo_err: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr), repr=False)
    notes: dict[str, Any] = field(default_factory=dict)
    commands: Any = field(default=None, repr=False)

    def options(self, **more: Any) -> dict[str, Any]:
        """What a run.json notes of the context beside the config (out and device; train also resume)."""
        return {"out": str(self.out), "device": self.device, **more, **self.notes}


@dataclass(frozen=True)
class Command:
    """One diffcli command: `run(cfg, ctx)` runs it (validating first), `validate(cfg)` only checks. For the
    command line: `cli`, a dataclass of the options that are no Config field (declared with `opt`, e.g. sample
    --show-forward); `build(values)`, the command line's values (one per declared field of `config` and `cli`)
    -> what `run` takes, where the conversions across options live (default: `config(**values)`); `context`, the
    RunContext options it takes, name -> changes to their declaration (default, help, cli_type); `notes`, the
    command line's values -> RunContext.notes."""
    name: str
    config: type | None
    validate: Callable[[Any], Any]
    run: Callable[[Any, RunContext], Any]
    build: Callable[[dict[str, Any]], Any] | None = None
    notes: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    context: dict[str, dict[str, Any]] = field(default_factory=dict)
    cli: type | None = None
    help: str = ""
    extra_args: bool = False  # sweep: the swept command's own arguments follow
    config_file: bool = True  # takes --config FILE.toml
    record_beside: bool = False  # its run record is OUT.run.json beside OUT (a folder graded entry by entry)
    scores: tuple[str, ...] = ()  # what `diffcli sweep --score` may ask of its folders; () = not sweepable
    clip_app: str | None = None   # the 003 app its folders are CLIP-graded as (eval --app)

    def make(self, values: dict[str, Any]) -> Any:
        """Config of the command line's values."""
        if self.build is not None:
            return self.build(values)
        return None if self.config is None else self.config(**values)


def generating(out: str, resume: str, out_help: str | None = None) -> dict[str, dict[str, Any]]:
    """The context options of a command that writes a folder: --out (its default folder, and its own help where
    given), --overwrite, --resume (its own help) and --device."""
    return {"out": {"default": Path(out), **({"help": out_help} if out_help else {})}, "overwrite": {},
            "resume": {"help": resume}, "device": {}}


class CommandExit(Exception):
    """A run that ends with this exit code, its messages already written (eval: some folders failed)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def execute(command: Command, cfg: Any, ctx: RunContext) -> Any:
    """Run a command on its config in a context; run records written meanwhile note the context's argv and cwd."""
    with recording(ctx.argv, ctx.cwd), library_warnings(show=ctx.debug):  # no library's warning reaches the user
        return command.run(cfg, ctx)
