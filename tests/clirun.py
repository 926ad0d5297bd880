"""``strangler ARGS`` in-process: the real typer app under typer's ``CliRunner``, without the 0.4 s
interpreter start-up and import of a subprocess.

For tests where no process boundary is under test: exit codes, stdout and stderr are the same as
the console script's (``StranglerGroup`` turns our errors into one line and a code inside the
app). A crash is not an exit code here: an exception the app did not turn into one is re-raised,
so it fails the test as a traceback on stderr would. Tests of the console script itself, of
signals, ``serve`` and ``demo`` keep real subprocesses.

Output width is ``columns`` at each call: the consoles in ``proxy.cliutil`` are given it for the
call (they would otherwise keep whatever width they first saw, which differs between a terminal,
pytest and pytest-xdist workers), and parity's own consoles (``strangler parity`` keeps off
``proxy.cliutil`` to stay light) are made afresh, reading it from ``COLUMNS``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from proxy.cli import app
from proxy.cliutil import console, err
from proxy.parity import commands as parity_commands
from tests.support import ROOT


@dataclass(frozen=True)
class Ran:
    """What a finished ``strangler`` run left: the fields of ``subprocess.CompletedProcess`` the
    tests read."""

    returncode: int
    stdout: str
    stderr: str


def strangler(*args: str, env: dict[str, str] | None = None, columns: int = 200, cwd: Path = ROOT) -> Ran:
    """Run the command as a user would: no STRANGLER_* from the test runner's environment, only
    ``env``; in ``cwd`` (where the token and embedded-Redis files of a local serve are looked up)."""
    scrubbed: dict[str, str | None] = {k: None for k in os.environ if k.startswith("STRANGLER_")}
    scrubbed.update(env or {})
    scrubbed["COLUMNS"] = str(columns)
    console.width = err.width = columns
    parity_commands._consoles.clear()
    try:
        with contextlib.chdir(cwd):
            result = CliRunner().invoke(app, list(args), env=scrubbed, prog_name="strangler")
    finally:
        console.width = err.width = None  # type: ignore[assignment]  # back to "ask the terminal"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)
