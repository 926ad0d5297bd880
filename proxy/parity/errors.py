"""The parity exception tree: one line each, mapped to exit code 2 at the CLI boundary."""

from __future__ import annotations


class ParityConfigError(ValueError):
    """The configuration cannot be used as written (a bad value, a column mapped to nothing)."""


class ParityError(RuntimeError):
    """A database or API could not be read as configured."""
