"""The ``strangler`` command: thin. It parses, calls the capabilities, and prints."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import redis.asyncio as aioredis
import typer
from redis.exceptions import RedisError
from rich.console import Console
from rich.table import Table

from proxy.admin.commands import AdminTokenOpt, AdminUrlOpt
from proxy.control.client import ControlClient, InvalidValue
from proxy.control.embedded import read_url
from proxy.control.keys import Keys
from proxy.settings import ConfigError, Settings, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Strangler: migrate from v1 to v2 safely.")
console = Console()
err = Console(stderr=True)
T = TypeVar("T")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file.")]
RedisOpt = Annotated[str | None, typer.Option("--redis-url", help="Redis URL (default: the embedded one).")]
GroupOpt = Annotated[
    str | None, typer.Option("--group", "-g", help="Route group (default: the global split).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def settings_from(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        fail(str(exc), 2)
        raise  # unreachable, for type checkers


def resolve_redis_url(settings: Settings) -> str:
    if settings.redis_url:
        return settings.redis_url
    url = read_url(settings.embedded_redis_dir)
    if url is None:
        fail(
            "no Redis to talk to: start `strangler serve` (embedded Redis) or pass --redis-url / "
            "STRANGLER_REDIS_URL"
        )
    assert url is not None
    return url


def with_control(settings: Settings, action: Callable[[ControlClient], Awaitable[T]]) -> T:
    """Run one async action against Redis with a clear message when it is unreachable."""
    url = resolve_redis_url(settings)

    async def go() -> T:
        redis = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return await action(ControlClient(redis, Keys(settings.split_key, settings.key_prefix)))
        finally:
            await redis.aclose()

    try:
        return asyncio.run(go())
    except (RedisError, OSError) as exc:
        fail(f"Redis at {url} is unreachable: {exc}")
        raise


def check_group(settings: Settings, group: str | None) -> str:
    name = group or "default"
    if name not in settings.group_names:
        fail(f"unknown group {name!r}; configured groups: {', '.join(settings.group_names)}", 2)
    return name


@app.command()
def serve(
    v1: Annotated[str | None, typer.Option("--v1", help="v1 backend URL.")] = None,
    v2: Annotated[str | None, typer.Option("--v2", help="v2 backend URL.")] = None,
    host: Annotated[str | None, typer.Option(help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port.")] = None,
    redis_url: RedisOpt = None,
    config: ConfigOpt = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes.")] = None,
    admin_token: Annotated[str | None, typer.Option(help="Token for admin changes.")] = None,
) -> None:
    """Run the proxy (embedded Redis when no Redis URL is configured)."""
    from proxy.server import run

    settings = settings_from(
        config,
        v1_url=v1,
        v2_url=v2,
        host=host,
        port=port,
        redis_url=redis_url,
        workers=workers,
        admin_token=admin_token,
    )
    run(settings)


@app.command()
def status(
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    as_json: JsonOpt = False,
    url: AdminUrlOpt = None,
    token: AdminTokenOpt = None,
) -> None:
    """Split per group as stored in Redis (or as a running proxy sees it, with --url)."""
    if url:
        from proxy.admin.commands import remote_status

        return remote_status(url, token, as_json)
    settings = settings_from(config, redis_url=redis_url)
    groups = settings.group_names

    async def read(control: ControlClient) -> dict[str, Any]:
        raw = await control.get_split(groups)
        await control.redis.ping()
        from proxy.canary.commands import canary_status

        canary = await canary_status(control, groups)
        return {"redis_ok": True, "redis_url": resolve_redis_url(settings), "groups": raw, "canary": canary}

    data = with_control(settings, read)
    global_raw = data["groups"]["default"]
    rows = []
    for group in groups:
        raw = data["groups"][group]
        effective = raw if raw is not None else (global_raw if group != "default" else None)
        rows.append(
            {
                "group": group,
                "percentage": float(effective)
                if effective is not None and _is_number(effective)
                else settings.default_percentage,
                "source": "own key" if raw is not None else ("global" if group != "default" else "default"),
                "raw": raw,
                **data["canary"][group],  # rollout, verdict, decision (one line each)
            }
        )
    proxy_view = _local_proxy_view(settings)
    if as_json:
        print(
            json.dumps(
                {"redis_ok": True, "redis_url": data["redis_url"], "groups": rows, "proxy": proxy_view}
            )
        )
        return
    if proxy_view is None:
        console.print("proxy: no answer at the configured address (snapshot age unknown; use --url)")
    else:
        age = proxy_view.get("snapshot_age_seconds")
        reachable = "reachable" if proxy_view.get("redis_ok") else "UNREACHABLE"
        shown = "-" if age is None else f"{age:.1f}s"
        console.print(f"proxy {proxy_view['url']}: Redis {reachable}, snapshot age {shown}")
    table = Table(title=f"Strangler split (Redis {data['redis_url']})")
    for column in ("group", "v2 %", "source", "raw value", "rollout", "last check", "last decision"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["group"], f"{row['percentage']:g}", row["source"], str(row["raw"]),
            row["rollout"], row["verdict"], row["decision"],
        )  # fmt: skip
    console.print(table)


@app.command("set")
def set_split(
    percentage: Annotated[str, typer.Argument(help="Share of traffic for v2, 0 to 100.")],
    group: GroupOpt = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: AdminUrlOpt = None,
    token: AdminTokenOpt = None,
    verify: Annotated[
        str | None,
        typer.Option(help="Watch the checks this long (e.g. 5m); restore the old value if they fail."),
    ] = None,
) -> None:
    """Set the v2 share; every replica follows within a moment."""
    if url:
        from proxy.admin.commands import remote_set

        return remote_set(url, token, percentage, group)
    settings = settings_from(config, redis_url=redis_url)
    name = check_group(settings, group)
    if verify is not None:
        from proxy.canary.commands import verified_set

        verified_set(settings, name, percentage, verify)
        return
    try:
        value = with_control(settings, lambda c: c.set_split(percentage, name))
    except InvalidValue as exc:
        fail(str(exc), 2)
        return
    console.print(f"v2 share for [bold]{name}[/bold] set to [bold]{value:g}%[/bold]")


@app.command()
def rollback(
    group: GroupOpt = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: AdminUrlOpt = None,
    token: AdminTokenOpt = None,
) -> None:
    """Send everything back to v1 at once."""
    if url:
        from proxy.admin.commands import remote_rollback

        return remote_rollback(url, token, group)
    settings = settings_from(config, redis_url=redis_url)
    name = check_group(settings, group)
    with_control(settings, lambda c: c.set_split(0, name))
    console.print(f"[yellow]rolled back[/yellow] {name}: v2 share is 0%")


@app.command()
def bench(
    connections: Annotated[int, typer.Option("--connections", "-c", help="Concurrent connections.")] = 64,
    seconds: Annotated[float, typer.Option("--seconds", "-d", help="Seconds per measurement.")] = 10,
    peer: Annotated[
        str | None,
        typer.Option(help="Also measure a peer: 'asgiproxy' or a command with {port} and {upstream}."),
    ] = None,
    percentage: Annotated[float, typer.Option(help="v2 share during the run.")] = 10,
    builtin: Annotated[
        bool, typer.Option("--builtin", help="Use the built-in load generator, not wrk.")
    ] = False,
    rounds: Annotated[int, typer.Option(help="Alternating rounds per target; the median counts.")] = 3,
) -> None:
    """Requests/s and p50/p99: direct, through Strangler, and through a peer, in one run."""
    import shutil

    from proxy.bench import bench as run_bench
    from proxy.bench import render

    use_wrk = not builtin and shutil.which("wrk") is not None
    results = run_bench(connections, seconds, peer, percentage, use_wrk=use_wrk, rounds=rounds)
    print(render(results, connections, seconds, "wrk" if use_wrk else "built-in generator", rounds))


def _local_proxy_view(settings: Settings) -> dict[str, Any] | None:
    """Redis health and snapshot age as the proxy configured here sees them, if it answers."""
    import httpx

    from proxy.admin.commands import default_admin_url

    url = default_admin_url(settings)
    headers = {"Authorization": f"Bearer {token}"} if (token := settings.admin_token_value()) else {}
    try:
        response = httpx.get(url + "/status", headers=headers, timeout=1.0)
        body = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    return {
        "url": url,
        "redis_ok": body.get("redis_ok"),
        "snapshot_age_seconds": body.get("snapshot_age_seconds"),
    }


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def register_capability_commands() -> None:
    """Each capability keeps its commands in ``proxy/<capability>/commands.py`` with a
    ``register(app)`` function; add one import line here per capability."""
    modules: list[Any] = []
    from proxy.admin import commands as admin_commands
    from proxy.demo import commands as demo_commands

    modules += [admin_commands, demo_commands]
    from proxy.canary import commands as canary_commands

    modules.append(canary_commands)
    from proxy.shadow import commands as shadow_commands

    modules.append(shadow_commands)
    from proxy.parity import commands as parity_commands

    modules.append(parity_commands)
    from proxy import soak as soak_commands

    modules.append(soak_commands)
    for module in modules:
        module.register(app)


register_capability_commands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
