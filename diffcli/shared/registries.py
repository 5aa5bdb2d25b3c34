"""Registries: a dict from a choice's name to its record, in the order the choices are listed.

Every registry of the library (samplers, schedules, PG kernels, views, SEG blurs) is such a dict; its records
carry a one-line `description`, from which the help texts are rendered. `name in REGISTRY` and
`', '.join(REGISTRY)` read the names alone.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping


def describe(registry: Mapping[str, Any], note: Callable[[Any], str] | None = None) -> str:
    """The choices with their help lines, in the registry's order: "euler: Euler on the ODE; heun: ...";
    `note` adds a fact of each record ("rbf: an RBF on x, for digit models and pipelines"; no square brackets,
    which the CLI's rich help would take for markup)."""
    return "; ".join(f"{name}: {entry.description}" + (f", for {note(entry)}" if note else "")
                     for name, entry in registry.items())


def having(registry: Mapping[str, Any], test) -> tuple[str, ...]:
    """The names whose record passes `test`, in the registry's order (a derived choice list)."""
    return tuple(name for name, entry in registry.items() if test(entry))
