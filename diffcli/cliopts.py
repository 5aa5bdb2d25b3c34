"""Typer commands derived from the command contract: one CLI parameter per declared Config field
(`shared/fields.py`), the context options the command takes (--out, --overwrite, --resume, --device: declared once
on `runner.RunContext`), `--config FILE.toml`, and `--help` grouped into panels (input, model, sampling,
guidance, output)."""
from __future__ import annotations

import inspect
import types
import typing
from dataclasses import MISSING, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

import typer

from .runner import Command, RunContext
from .shared.errors import DiffcliError
from .shared.fields import PANELS, SAME, Opt, declared


def read_config(ctx: typer.Context, param: Any, value: Optional[Path]) -> Optional[Path]:
    """`--config FILE`: a TOML file whose keys are the command's options (seg_scale or seg-scale, blur, cfg, ...);
    they become the options' defaults, so flags given on the command line win."""
    if value is None:
        return None
    from .shared.configfile import read_options
    try:
        params = [p for p in ctx.command.params if p.name not in ("config", "ctx")]
        values = read_options(value, {p.name: [o.lstrip("-") for o in p.opts] for p in params},
                              {p.name: (_kind(p), bool(p.multiple) or p.nargs != 1) for p in params})
    except DiffcliError as e:
        raise typer.BadParameter(str(e), ctx=ctx, param=param) from None
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _kind(param: Any) -> str:
    """What a --config value of this click parameter must be (configfile.KINDS), from its annotation: flags are
    booleans; Optional[...] and list[...] count as what they hold."""
    if getattr(param, "is_flag", False):
        return "boolean"
    hint = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    while typing.get_args(hint) and typing.get_origin(hint) in (Union, types.UnionType, list, tuple):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return {bool: "boolean", int: "integer", float: "float", str: "text", Path: "text"}.get(hint, "")


CONFIG = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                           default=typer.Option(None, "--config", is_eager=True, callback=read_config,
                                                metavar="FILE.toml", rich_help_panel="Input",
                                                help="Options from a TOML file (the same names as the flags); flags "
                                                     "given here win."))


def _cli_type(hint: Any) -> Any:
    """`int | None` -> Optional[int] (the spelling Typer reads), the rest as it is."""
    if isinstance(hint, types.UnionType):
        args = typing.get_args(hint)
        return Union[args]  # type: ignore[valid-type]
    return hint


def _parameter(name: str, info: Opt, default: Any, hint: Any) -> inspect.Parameter:
    value = default if info.cli_default is SAME else info.cli_default
    if value is MISSING:
        value = ...
    keywords: dict[str, Any] = {}
    if info.help is not None:
        keywords["help"] = info.help
    if info.metavar is not None:
        keywords["metavar"] = info.metavar
    panel = info.panel.capitalize()
    if info.argument:
        spec = typer.Argument(value, **keywords)
    else:
        spec = typer.Option(value, *info.flags, rich_help_panel=panel, **keywords)
    return inspect.Parameter(info.name or name, inspect.Parameter.KEYWORD_ONLY, annotation=_cli_type(info.cli_type or hint),
                             default=spec)


def fields_of(cls: type | None) -> list[tuple[str, Opt, Any, Any]]:
    if cls is None:
        return []
    hints = typing.get_type_hints(cls)
    return [(name, info, default, hints[name]) for name, info, default in declared(cls)]


def context_fields(command: Command) -> list[tuple[str, Opt, Any, Any]]:
    """RunContext's declared options that the command takes, with its own default/help/type."""
    out = []
    for name, info, default, hint in fields_of(RunContext):
        if name not in command.context:
            continue
        change = dict(command.context[name])
        default = change.pop("default", default)
        out.append((name, replace(info, **change), default, hint))
    return out


def parameters(command: Command) -> tuple[list[inspect.Parameter], dict[str, str], set[str]]:
    """The command's Typer parameters; {parameter name: field name} of the Config/CLI fields, and the names of the
    context options."""
    own = fields_of(command.config) + fields_of(command.cli)
    ctx = context_fields(command)
    # arguments first, in their order; then the options panel by panel (input, model, sampling, guidance, output)
    ordered = sorted(own + ctx, key=lambda item: (not item[1].argument, PANELS.index(item[1].panel)))
    params = [_parameter(*item) for item in ordered]
    return (params + ([CONFIG] if command.config_file and command.config is not None else []),
            {info.name or n: n for n, info, *_ in own}, {n for n, *_ in ctx})


def to_config_values(command: Command, values: dict[str, Any]) -> dict[str, Any]:
    """The command line's values with each field's declared conversion hook applied."""
    hooks = {name: info.to_config for name, info, *_ in fields_of(command.config) + fields_of(command.cli)
             if info.to_config is not None}
    return {k: (hooks[k](v) if k in hooks else v) for k, v in values.items()}


def typer_function(command: Command, call: Callable[[Command, dict[str, Any], dict[str, Any], Any], Any]) -> Callable:
    """A function Typer registers for `command`: its signature is the derived parameters; called, it hands
    `call(command, config values, context values, click context)`."""
    params, own, ctx_names = parameters(command)
    extra = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)] \
        if command.extra_args else []

    def function(**kwargs: Any) -> Any:
        kwargs.pop("config", None)
        click_ctx = kwargs.pop("ctx", None)
        values = {own[k]: v for k, v in kwargs.items() if k in own}
        context = {k: v for k, v in kwargs.items() if k in ctx_names}
        return call(command, values, context, click_ctx)

    function.__name__ = command.name
    function.__doc__ = command.help
    function.__signature__ = inspect.Signature(extra + params)  # type: ignore[attr-defined]
    function.__annotations__ = {p.name: p.annotation for p in extra + params}
    return function
