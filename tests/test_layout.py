"""The package's layering: imports run one way, from the commands down to shared/, and no command imports another.

Layers, top first: cli -> the command modules -> the library at the top of the package (options, drawing, ...) ->
backends/ -> data/ -> core/ -> shared/. A module may import its own layer or any layer below it. Read from the
code's own import statements (every `from . import`, `from .x import`, `import diffcli.x`, at any depth)."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "diffcli"
COMMANDS = {"train", "sample", "seg", "panorama", "anagram", "pg", "eval", "sweep", "rerun", "info", "report"}
LAYERS = {"shared": 0, "core": 1, "data": 2, "backends": 3}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")[1:]
    if not parts:
        return 4  # the package's face: names only, loaded lazily
    if parts[0] in LAYERS:
        return LAYERS[parts[0]]
    if parts[0] in ("cli", "__main__"):
        return 6
    return 5 if parts[0] in COMMANDS else 4


def imports(path: Path) -> set[str]:
    """Every diffcli module `path` imports (relative imports resolved; `from . import x` names the module x)."""
    me = module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "diffcli"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "diffcli":
                base = node.module.split(".")
            else:
                continue
            for a in node.names:  # `from .core import attention` imports the module core.attention
                sub = PACKAGE.joinpath(*base[1:], a.name)
                found.add(".".join([*base, a.name]) if sub.with_suffix(".py").is_file() or sub.is_dir() else ".".join(base))
    return found


def edges() -> list[tuple[str, str]]:
    return [(module_name(p), m) for p in sorted(PACKAGE.rglob("*.py")) for m in imports(p)]


def test_imports_run_down_the_layers():
    up = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})" for a, b in edges() if layer(b) > layer(a)]
    assert not up, "imports that run up the layers:\n  " + "\n  ".join(up)


def test_no_command_imports_another():
    def command(m: str) -> str | None:
        parts = m.split(".")
        return parts[1] if len(parts) > 1 and parts[1] in COMMANDS else None

    across = [f"{a} imports {b}" for a, b in edges() if command(a) and command(b) and command(a) != command(b)]
    assert not across, "\n".join(across)


def test_the_reader_sees_relative_imports():
    """The check is only as good as its reader: it must find the arrows everyone knows are there."""
    found = set(edges())
    assert ("diffcli.pg", "diffcli.drawing") in found
    assert ("diffcli.core.guidance", "diffcli.core.attention") in found
    assert ("diffcli.shared.dist", "diffcli.shared.errors") in found
    assert any(a == "diffcli.cli" and layer(b) == 5 for a, b in found)
