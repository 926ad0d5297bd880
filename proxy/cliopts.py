"""The options the ``strangler`` commands share: one definition each (the help text is part of the
CLI). A leaf that needs only typer, so ``proxy/cli.py`` can declare its commands, and
``strangler --help`` list them, without importing settings, Redis or any capability;
``proxy.cliutil`` re-exports these names for the capabilities' commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file.")]
RedisOpt = Annotated[str | None, typer.Option("--redis-url", help="Redis URL (default: the embedded one).")]
GroupOpt = Annotated[
    str | None, typer.Option("--group", "-g", help="Route group (default: the global split).")
]
AllGroupsOpt = Annotated[str | None, typer.Option("--group", "-g", help="Route group (default: all groups).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _admin_url(help: str) -> Any:
    return typer.Option("--url", envvar="STRANGLER_ADMIN_URL", help=help)


# --url on the commands that read a proxy's config otherwise, and on those that talk to Redis otherwise
AdminUrlOpt = Annotated[str | None, _admin_url("Admin API of a running proxy (default: from the config).")]
RemoteUrlOpt = Annotated[str | None, _admin_url("Admin API of a running proxy (instead of Redis).")]
AdminTokenOpt = Annotated[
    str | None, typer.Option("--token", envvar="STRANGLER_ADMIN_TOKEN", help="Admin bearer token.")
]
