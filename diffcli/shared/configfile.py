"""Command options from a TOML file (`--config FILE`): the same names as the flags, checked against them."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .errors import DiffcliError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_options(path: str | Path, options: dict[str, list[str]]) -> dict[str, Any]:
    """{option name: value} from a TOML file; a key is the option's name (seg_scale) or a flag without dashes
    (seg-scale, guidance). `options` maps each option's name to its flags. Unknown keys are refused, listing the
    valid ones; tables are refused (one flat table of options)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DiffcliError(f"cannot read config {path}: {getattr(e, 'strerror', None) or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise DiffcliError(f"config {path} is not valid TOML: {e}") from None
    names = {alias.replace("-", "_"): name for name, flags in options.items() for alias in [name, *flags]}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            raise DiffcliError(f"config {path}: {key!r} is a table; give each option as KEY = VALUE")
        name = names.get(key.replace("-", "_"))
        if name is None:
            raise DiffcliError(f"config {path}: unknown option {key!r}; valid: {', '.join(sorted(options))}")
        if name in out:
            raise DiffcliError(f"config {path}: option {name!r} given twice")
        out[name] = value
    return out
