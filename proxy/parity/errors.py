"""The parity exception tree: one line each, mapped to exit code 2 at the CLI boundary."""

from __future__ import annotations


class ParityConfigError(ValueError):
    """The configuration cannot be used as written (a bad value, a column mapped to nothing)."""


class ParityError(RuntimeError):
    """A database or API could not be read as configured."""


class ParityDataError(ParityError):
    """A value the SQL rendering could not read (SQLSTATE class 22, e.g. text that is no number):
    the run goes on with row hashes in the client, where such a value is a difference."""
