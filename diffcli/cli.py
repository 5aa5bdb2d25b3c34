"""Typer app: one registration line per command (its options derived from its Config, `cliopts`), and the error
mapping (every expected failure one `error:` line and an exit code)."""
from __future__ import annotations

import functools
import traceback
from typing import Any, Callable

import typer

from . import anagram, eval as eval_, info, panorama, pg, report, rerun, sample, seg, sweep, train
from .cliopts import to_config_values, typer_function
from .runner import Command, CommandExit, RunContext, execute
from .shared.errors import DiffcliError
from .shared.inputs import one_line

try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as click_exceptions
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions, get_current_context

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="diffcli: train, sample and guide diffusion models.\n\n"
                       "Example: diffcli sample --labels all --n 20 --out digits")

PARSE_ONLY = "diffcli.parse_only"  # click context meta: build the config and hand it back instead of running


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    pass  # the flag is read where an error is mapped (`debugging`), from click's context of this invocation


def debugging() -> bool:
    ctx = get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get("debug"))


def _fail(message: str, code: int) -> int:
    typer.echo(f"error: {one_line(message)}", err=True)
    return code


def failure(e: BaseException, debug: bool) -> int:
    """One line on stderr for an expected failure, and its exit code; a traceback only with --debug (a bug
    re-raises with --debug)."""
    if isinstance(e, CommandExit):
        return e.code
    if isinstance(e, DiffcliError):
        if debug:
            traceback.print_exc()
        return _fail(str(e), e.exit_code)
    if isinstance(e, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        return 130
    if isinstance(e, MemoryError):
        return _fail("out of memory; try a smaller --batch-size or image size", 1)
    if isinstance(e, OSError):
        if debug:
            traceback.print_exc()
        return _fail(f"{e.strerror or e}{': ' + str(e.filename) if getattr(e, 'filename', None) else ''}", 1)
    if isinstance(e, Exception):  # a bug: still one line unless --debug
        if debug:
            raise e
        return _fail(f"internal error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                     "rerun with --debug for the traceback", 1)
    raise e


def handle_errors(fn: Callable) -> Callable:
    """Every expected failure of a command: one line on stderr and a non-zero exit (`failure`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BaseException as e:  # noqa: B036 (KeyboardInterrupt too)
            ctx = get_current_context(silent=True)
            if ctx is not None and ctx.meta.get(PARSE_ONLY):  # Commands.parse: the caller maps the error
                raise
            if not isinstance(e, Exception) and not isinstance(e, KeyboardInterrupt):
                raise
            raise typer.Exit(failure(e, debugging())) from None

    return wrapper


def invoke(command: Command, values: dict[str, Any], context: dict[str, Any], click_ctx: Any) -> Any:
    """A command line's values -> Config (the command's hooks) -> its run in a context."""
    if click_ctx is not None:  # sweep: the swept command's own arguments
        values["args"] = list(click_ctx.args)
    if command.notes is not None:
        context["notes"] = command.notes(values)
    cfg = command.make(to_config_values(command, values))
    meta = get_current_context().meta
    if meta.get(PARSE_ONLY):
        return command, cfg, context
    debug = debugging()
    return execute(command, cfg, run_context(context, debug, Commands(debug)))


def run_context(context: dict[str, Any], debug: bool, commands: Commands, argv: list[str] | None = None) -> RunContext:
    """The context of a run from the command line: its options, --debug, and the terminal for its lines."""
    return RunContext(**context, argv=argv, debug=debug, echo=typer.echo,
                      echo_err=lambda line: typer.echo(line, err=True), commands=commands)


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> None:
    """Add a command to the app: its Typer parameters derived from its Config (`cliopts`), errors mapped."""
    COMMANDS[command.name] = command
    settings = {"allow_extra_args": True, "ignore_unknown_options": True} if command.extra_args else None
    app.command(name=command.name, context_settings=settings)(handle_errors(typer_function(command, invoke)))


register(train.COMMAND)
register(sample.COMMAND)
register(seg.COMMAND)
register(panorama.COMMAND)
register(anagram.COMMAND)
register(pg.COMMAND)
register(info.COMMAND)
register(eval_.COMMAND)
register(sweep.COMMAND)
register(rerun.COMMAND)
register(report.COMMAND)


# ---------------------------------------------------------------- commands run by argv in this process

class Commands:
    """diffcli's own commands run by their argv in this process, through the command contract: a sweep's settings,
    a rerun (sweep.Commands)."""

    def __init__(self, debug: bool = False) -> None:
        self.debug = debug

    def spec(self, command: str) -> Command:
        """The command's contract and facts (record_beside, scores, clip_app)."""
        return COMMANDS[command]

    def sweepable(self) -> list[str]:
        """The commands a sweep runs (those with scores), in their registration order."""
        return [name for name, command in COMMANDS.items() if command.scores]

    def options(self, command: str) -> dict[str, str]:
        """Grid keys -> the command's flag, for every option except where output goes: a key is the flag without
        dashes, '-' as '_' (--seg-scale: seg_scale; --blur: blur; both --cfg and --guidance)."""
        names = {}
        for p in typer.main.get_command(app).commands[command].params:
            flags = [o for o in p.opts if o.startswith("--")]
            if flags and p.name not in ("out", "overwrite", "resume", "device"):
                names.update({flag[2:].replace("-", "_"): flags[0] for flag in flags})
        return names

    def _context(self, command: str, argv: list[str]) -> Any:
        click_command = typer.main.get_command(app).commands[command]
        try:
            ctx = click_command.make_context(command, [*map(str, argv)])
        except click_exceptions.UsageError as e:
            raise DiffcliError(f"diffcli {command}: {e.format_message()}") from None
        ctx.meta[PARSE_ONLY] = True
        return click_command, ctx

    def parse(self, command: str, argv: list[str]) -> tuple[Command, Any, dict[str, Any]]:
        """The command, its Config and its context options from its argv (nothing runs); a refused option raises
        its DiffcliError."""
        click_command, ctx = self._context(command, argv)
        with ctx:
            return ctx.invoke(click_command.callback, **ctx.params)

    def check(self, command: str, argv: list[str]) -> None:
        """Parse and validate the command's options (its `validate`) and stop before any work."""
        spec, cfg, _ = self.parse(command, argv)
        spec.validate(cfg)

    def run(self, command: str, argv: list[str]) -> int:
        """`diffcli COMMAND ARGV` in this process; its errors print their one line; returns the exit code. Its run
        record notes that command line."""
        click_command, ctx = self._context(command, argv)
        try:
            with ctx:
                spec, cfg, context = ctx.invoke(click_command.callback, **ctx.params)
            execute(spec, cfg, run_context(context, self.debug, self, ["diffcli", command, *map(str, argv)]))
        except typer.Exit as e:
            return e.exit_code
        except BaseException as e:  # noqa: B036
            if not isinstance(e, (Exception, KeyboardInterrupt)):
                raise
            return failure(e, self.debug)
        return 0


def run() -> None:
    """Entry point: click's usage errors become one `error:` line too (exit 2)."""
    import sys
    click_exc = click_exceptions
    try:
        code = app(standalone_mode=False)
    except click_exc.NoArgsIsHelpError as e:
        e.show()
        code = 2
    except click_exc.UsageError as e:  # bad option values, unknown options or commands
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        typer.echo(f"error: {one_line(e.format_message())}{hint}", err=True)
        code = 2
    except typer.Abort:
        typer.echo("interrupted", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
