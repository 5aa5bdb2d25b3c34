"""The one error type: a problem with the user's input or environment."""
from __future__ import annotations




class DiffcliError(ValueError):
    """A problem with the user's input or environment; the CLI prints it as one line and exits non-zero.

    A ValueError, so library users can catch it as one."""

    exit_code = 2
