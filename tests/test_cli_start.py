"""A CLI that starts fast: each command imports what it uses, so help needs none of the heavy parts.

Start-up time itself is never asserted (it depends on the machine); what makes it short is: the
root's help and the help of this module's commands load typer and nothing of pydantic, Redis,
httpx or a capability. The root lists the capabilities' commands from short help strings kept in
``proxy.cli.LAZY_COMMANDS``; the test below keeps them equal to the commands' own help.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import typer

from proxy.cli import LAZY_COMMANDS
from tests.clirun import strangler
from tests.support import ROOT

HEAVY = ("pydantic", "pydantic_settings", "redis", "httpx", "rich.table", "proxy.settings")

# Run the real entry point in a fresh interpreter, then list the modules it loaded.
PROBE = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted(k for k, v in sys.modules.items() if v)), file=sys.stderr))
sys.argv = ["strangler", *sys.argv[1:]]
from proxy.cli import main
main()
"""


def loaded_by(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "COLUMNS": "100"},
    )  # fmt: skip
    return result, set(json.loads(result.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("-h",),
        (),
        ("status", "--help"),
        ("set", "--help"),
        ("rollback", "-h"),
        ("serve", "--help"),
        ("bench", "--help"),
    ],
)
def test_help_imports_neither_settings_nor_redis_nor_httpx(args: tuple[str, ...]) -> None:
    result, modules = loaded_by(*args)
    assert result.returncode in (0, 2), result.stderr[-2000:]  # no arguments: the help, exit 2 (click)
    assert "Usage: strangler" in result.stdout + result.stderr
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY)
    assert heavy == []
    ours = sorted(m for m in modules if m.startswith("proxy."))
    assert ours == ["proxy.cli", "proxy.cliopts"]


@pytest.mark.parametrize("args", [("status",), ("set", "5")])
def test_a_command_imports_only_what_it_uses(args: tuple[str, ...], redis_url: str) -> None:
    """``status`` and ``set`` against a real Redis: no other command's module, no load or demo tool,
    and not httpx's own command-line client (click, rich.syntax, pygments)."""
    result, modules = loaded_by(*args, "--redis-url", redis_url)
    assert result.returncode == 0, result.stderr[-2000:]
    unused = ("proxy.demo", "proxy.bench", "proxy.soak", "proxy.shadow.commands", "proxy.parity.commands",
              "proxy.app", "proxy.edge", "proxy.traffic", "pygments", "httpx._main", "starlette")  # fmt: skip
    assert sorted(m for m in modules if m.startswith(unused)) == []


def test_root_help_lists_every_command_with_its_short_help() -> None:
    result = strangler("--help", columns=200)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    commands = [line.split(None, 1) for line in lines[lines.index("Commands:") + 1 :] if line.strip()]
    assert [name for name, _ in commands] == ["serve", "status", "set", "rollback", "bench", *LAZY_COMMANDS]
    listed = dict(commands)
    assert listed["rollout"] == "Progressive rollout: step v2 up while the checks pass."
    assert listed["status"].startswith("Split per group: stored in Redis and served by the proxies")


@pytest.mark.parametrize("name", list(LAZY_COMMANDS))
def test_the_stored_short_help_is_the_commands_own(name: str) -> None:
    """The root shows LAZY_COMMANDS' text without importing the module: it must not drift from the
    command's docstring (or its Typer's help)."""
    module, attribute, short = LAZY_COMMANDS[name]
    found = getattr(importlib.import_module(module), attribute)
    holder = typer.Typer(rich_markup_mode=None)
    if isinstance(found, typer.Typer):
        holder.add_typer(found, name=name)
    else:
        holder.command(name)(found)
    command = typer.main.get_group(holder).commands[name]
    assert command.get_short_help_str(limit=10_000) == short


def test_a_capability_command_still_runs_and_shows_its_help() -> None:
    """Built when asked for: the group's help and a nested group's help."""
    result = strangler("shadow", "ignore", "--help")
    assert result.returncode == 0, result.stderr
    assert "Ignore rules for comparisons (live, in Redis)." in result.stdout
