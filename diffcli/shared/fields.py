"""An option declared once: a dataclass field whose metadata carries its flags, help, range, choices and help panel.

    n: int = opt(16, "--n", help="Number of samples.", check="count", low=1, high=N_MAX, panel="sampling")

The CLI derives its flags from these declarations (`diffcli.cliopts`); `check_fields` is the one generic check of
ranges and choices that every command's `validate` calls (naming the fields, in the order it checks them) beside
its rules across fields. A field whose command-line value differs from what the config holds names a conversion
hook (`to_config`), declared with the field; conversions across several options live in the command's `build`.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable

from .errors import DiffcliError
from .limits import count, finite, seed

PANELS = ("input", "model", "sampling", "guidance", "output")
SAME = "same as the field"  # Opt.cli_default when the command line's default is the field's


@dataclass(frozen=True)
class Opt:
    """What the command line knows of one field."""
    flags: tuple[str, ...] = ()         # () = the field's name as --name
    help: str | None = None
    panel: str = "model"
    check: str | None = None            # count, finite or seed: the generic range check (shared/limits.py)
    low: float | None = None
    high: float | None = None
    above: bool = False                 # finite: > low instead of >= low
    allow_inf: bool = False             # finite: inf means 'no limit'
    per: str | None = None              # seed: the field counting the items that use seed + i
    choices: tuple[str, ...] | None = None  # the generic choice check ("unknown --FLAG ...; choose one of ...")
    cli_type: Any = None                # the command line's type where it differs from the field's
    cli_default: Any = SAME             # the command line's default where it differs from the field's
    to_config: Callable[[Any], Any] | None = None  # command-line value -> field value
    argument: bool = False              # a positional argument (in field order)
    name: str | None = None             # the command line's name of the value (--config keys) where not the field's
    metavar: str | None = None

    def flag(self, name: str) -> str:
        return self.flags[0] if self.flags else "--" + name.replace("_", "-")


def opt(default: Any = MISSING, *flags: str, factory: Callable[[], Any] | None = None, **meta: Any) -> Any:
    """A dataclass field with its command-line declaration (the keywords of `Opt`); `factory` for list defaults."""
    info = Opt(flags=flags, **meta)
    if factory is not None:
        return field(default_factory=factory, metadata={"cli": info})
    return field(default=default, metadata={"cli": info})


def declared(config: Any) -> list[tuple[str, Opt, Any]]:
    """(field name, its Opt, its default) for every field of a config class or object with a declaration."""
    out = []
    for f in fields(config):
        info = f.metadata.get("cli")
        if info is not None:
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            out.append((f.name, info, default))
    return out


def check_fields(cfg: Any, names: list[str] | None = None) -> None:
    """The declared ranges and choices of a config's fields (or of `names` only, in that order), each refused in
    one line that names the option and its range."""
    infos = {name: info for name, info, _ in declared(cfg)}
    for name in infos if names is None else names:
        info = infos[name]
        value = getattr(cfg, name)
        label = info.flag(name)  # the option's first flag: the name the help shows (older names are aliases)
        if info.check == "count":
            count(label, value, 1 if info.low is None else int(info.low), None if info.high is None else int(info.high))
        elif info.check == "finite":
            finite(label, value, 0.0 if info.low is None else info.low, info.allow_inf,
                   high=math.inf if info.high is None else info.high, above=info.above)
        elif info.check == "seed":
            n = getattr(cfg, info.per) if info.per else 1
            if info.high is None:
                seed(label, value, n)
            else:
                seed(label, value, n, int(info.high))
        if info.choices is not None and value is not None and value not in info.choices:
            raise DiffcliError(f"unknown {info.flag(name)} {value!r}; choose one of {', '.join(info.choices)}")


def redefault(group: type, name: str, default: Any) -> Any:
    """A group's field again in a command's config, at another default: its declaration (flags, help, range) kept."""
    return field(default=default, metadata=group.__dataclass_fields__[name].metadata)
