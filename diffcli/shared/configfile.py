"""Command options from a TOML file (`--config FILE`): the same names as the flags, checked against them."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .errors import DiffcliError
from .inputs import read_stream, shown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


KINDS = {"integer": "an integer", "float": "a number", "boolean": "true or false", "text": "a string"}


def read_options(path: str | Path, options: dict[str, list[str]],
                 kinds: dict[str, tuple[str, bool]] | None = None) -> dict[str, Any]:
    """{option name: value} from a TOML file (a file, a pipe or `-`, bounded: `inputs.read_stream`); a key is the
    option's name (seg_scale) or a flag without dashes (seg-scale, guidance). `options` maps each option's name to
    its flags; `kinds` to (its KINDS key, whether it takes a list). Unknown keys are refused, listing the valid ones;
    tables are refused (one flat table of options); a value of the wrong type is refused (true is no integer)."""
    text = read_stream(path, "config")
    path = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DiffcliError(f"config {shown(str(path))} is not valid TOML: {shown(str(e), 120)}") from None
    names = {alias.replace("-", "_"): name for name, flags in options.items() for alias in [name, *flags]}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            raise DiffcliError(f"config {path}: {shown(key)} is a table; give each option as KEY = VALUE")
        name = names.get(key.replace("-", "_"))
        if name is None:
            raise DiffcliError(f"config {path}: unknown option {shown(key)}; valid: {', '.join(sorted(options))}")
        if name in out:
            raise DiffcliError(f"config {path}: option {name!r} given twice")
        out[name] = _checked(path, key, value, *(kinds or {}).get(name, ("", False)))
    return out


def _checked(path: Path, key: str, value: Any, kind: str, many: bool) -> Any:
    """A value of the option's own type: an integer is no bool and no float, a number no bool, a flag a bool, a
    string option a string (a number is taken as its text); a list only for an option that takes several."""
    if kind not in KINDS:
        return value
    if isinstance(value, list) and not many:
        raise DiffcliError(f"config {path}: {key} takes one value, not a list")
    for v in value if isinstance(value, list) else [value]:
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        good = {"integer": isinstance(v, int) and not isinstance(v, bool), "float": number,
                "boolean": isinstance(v, bool), "text": isinstance(v, str) or number}[kind]
        if not good:
            value_text = str(v).lower() if isinstance(v, bool) else shown(v) if isinstance(v, str) else shown(repr(v))
            kind_of = "a boolean" if isinstance(v, bool) else "a string" if isinstance(v, str) else type(v).__name__
            raise DiffcliError(f"config {path}: {key} = {value_text} is {kind_of}; {key} takes {KINDS[kind]}")
    if kind == "text":
        return [str(v) for v in value] if isinstance(value, list) else str(value)
    return value
