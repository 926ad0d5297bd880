"""What every ``strangler`` command shares: the option aliases, the exit codes, the consoles and the
helpers that load settings, reach Redis and report an error.

A leaf on purpose: it imports ``proxy.settings`` and ``proxy.control`` only, never a capability and
never ``proxy.cli``, so each ``proxy/<capability>/commands.py`` imports it at the top and the root
(``proxy/cli.py``) adds their apps explicitly, with no import cycle and no registration by import.
``remote.py`` beside it is the admin API client the ``--url`` forms use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import redis.asyncio as aioredis
import typer
from redis.exceptions import RedisError
from rich.console import Console
from rich.markup import escape

from proxy.control.client import ControlClient, SplitWriter
from proxy.control.connect import connect
from proxy.control.embedded import read_url
from proxy.control.keys import Keys
from proxy.redis_url import describe
from proxy.settings import ConfigError, RouteGroup, Settings, load_settings
from proxy.viewsource import ADMIN_API, REDIS, source

if TYPE_CHECKING:
    from proxy.cliutil.remote import AdminClient

# Exit codes, the same for every command (README "Operate").
EXIT_FAILED = 1  # the action failed or did not hold: unreachable, checks failed, rolled back, timed out
EXIT_USAGE = 2  # bad input or a refused request: value, group, config, transition not allowed now
EXIT_INTERRUPTED = 130

console = Console()
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")

# --- options shared by the commands: defined in the leaf proxy.cliopts (light enough for `--help`)
from proxy.cliopts import (  # noqa: E402, F401 - re-exported for the capabilities' commands
    AdminTokenOpt,
    AdminUrlOpt,
    AllGroupsOpt,
    ConfigOpt,
    GroupOpt,
    JsonOpt,
    RedisOpt,
    RemoteUrlOpt,
)

# How a command that writes the split builds its writer (``Rollouts(...).manual_split``), passed in
# by the caller so this module never imports the canary.
WriterFactory = Callable[[aioredis.Redis, Keys], SplitWriter]


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """The one way a command reports an error: one line on stderr, then the exit code."""
    err.print(f"[red]error:[/red] {escape(' '.join(message.split()))}", soft_wrap=True)
    raise typer.Exit(code)


# The flags whose name is not the setting's (``--redis-url`` sets ``redis_url``; these do not)
FLAG_OF_SETTING = {"v1_url": "--v1", "v2_url": "--v2"}


def settings_from(config: Path | None, **overrides: Any) -> Settings:
    """The settings a command runs with: defaults < ``config`` (the ``-c`` file) < ``STRANGLER_*`` <
    ``overrides`` (its flags, by setting name; None: not given). A problem in any of them is one
    line naming the file and line, the variable or the flag, the setting and what is wrong: exit 2."""
    flags = {name: FLAG_OF_SETTING.get(name, "--" + name.replace("_", "-")) for name in overrides}
    try:
        return load_settings(config, flags, **overrides)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def require_extra(command: str, *modules: str, extra: str = "tools") -> None:
    """At the entry of a command that needs an optional extra (``demo``: aiohttp; ``soak``: aiohttp
    and psutil): when one of ``modules`` is not installed, one line naming the install, exit 1,
    before anything starts. ``pip install .`` is the proxy alone; the extras are in pyproject.toml."""
    from importlib.util import find_spec

    missing = [name for name in modules if find_spec(name) is None]
    if missing:
        fail(
            f"strangler {command} needs {' and '.join(missing)} (the {extra!r} extra): "
            f"pip install '.[{extra}]' in the strangler checkout"
        )


def resolve_redis_url(settings: Settings) -> str:
    if settings.redis_url:
        return settings.redis_url
    url = read_url(settings.embedded_redis_dir)
    if url is None:
        fail(
            "no Redis to talk to: start `strangler serve` (embedded Redis) or pass --redis-url / "
            "STRANGLER_REDIS_URL"
        )
    return url


def with_control(
    settings: Settings,
    action: Callable[[ControlClient], Awaitable[T]],
    writer: WriterFactory | None = None,
    hint: str = "",
) -> T:
    """Run one async action against Redis with a clear message when it is unreachable (``hint`` is
    added to it). Commands that write the split pass ``writer``, so a share set by hand goes through
    the rollout's transaction."""
    url = resolve_redis_url(settings)

    async def go() -> T:
        redis = connect(url, 2)
        try:
            keys = Keys.for_settings(settings)
            return await action(ControlClient(redis, keys, writer(redis, keys) if writer else None))
        finally:
            await redis.aclose()

    try:
        return asyncio.run(go())
    except (RedisError, OSError) as exc:
        fail(f"Redis at {describe(url)} is unreachable: {exc}{hint}")


def with_registered_groups(settings: Settings, hint: str = "") -> Settings:
    """The settings plus the route groups running proxies registered in Redis (``strangler:groups``),
    so a command works with every group a proxy serves, not only those in this CLI's config."""
    registered = with_control(settings, lambda c: c.registered_groups(), hint=hint)
    extra = [
        RouteGroup(name=name, patterns=[str(p) for p in info.get("patterns") or ["/**"]])
        for name, info in sorted(registered.items())
        if name not in settings.group_names and name != "default"
    ]
    if not extra:
        return settings
    return settings.model_copy(update={"routes": [*settings.routes, *extra]})


def check_group(settings: Settings, group: str | None, hint: str = "") -> str:
    """The group name to act on; unknown to both the config and Redis: exit code 2. The refusal
    says where it looked, so a group missing from this CLI's config is not mistaken for a typo."""
    name = group or "default"
    if name not in settings.group_names:
        settings = with_registered_groups(settings, hint)
    if name not in settings.group_names:
        known = ", ".join(settings.group_names)
        fail(f"unknown group {name!r}; known groups (config and Redis): {known}", EXIT_USAGE)
    return name


def print_rollback(changed: dict[str, str | None]) -> None:
    """One line per group rolled back, with the value it had."""
    for name, before in changed.items():
        was = "unset" if before is None else f"{before}%"
        console.print(f"[yellow]rolled back[/yellow] {name}: v2 share {escape(was)} -> 0%")


def redis_or_api(
    config: Path | None,
    redis_url: str | None,
    url: str | None,
    token: str | None,
    local: Callable[[Settings], T],
    remote: Callable[[AdminClient], T],
    *,
    settings: Settings | None = None,
    prefix: str | None = None,
) -> tuple[T, dict[str, str]]:
    """The one place a command chooses where it acts: with ``--url`` (``url``) the admin API of
    the proxy named, through ``remote(client)``; otherwise Redis, through ``local(settings)``.
    Returns the result and where it ran (the ``source`` of the views' JSON documents).

    ``settings``: already loaded by the caller (not loaded again); ``prefix``: the admin prefix
    when not the default. A refusal of the admin API exits as the same refusal through Redis
    (one line, exit 2; unreachable or failing: exit 1)."""
    if url:
        from proxy.cliutil.remote import DEFAULT_PREFIX, AdminClient, AdminError

        try:
            with AdminClient(url, token, prefix or DEFAULT_PREFIX) as client:
                return remote(client), source(ADMIN_API, client.url)
        except AdminError as exc:
            fail(str(exc), exc.exit_code)
    settings = settings or settings_from(config, redis_url=redis_url)
    result = local(settings)
    return result, source(REDIS, describe(resolve_redis_url(settings)))
