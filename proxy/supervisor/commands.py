"""``strangler reload`` (ask the running proxy's parent to re-read its configuration),
``strangler upgrade`` (a new generation of the whole proxy takes its sockets) and
``strangler config check FILE`` (the same validation without a running proxy: the ``nginx -t`` of
Strangler). Heavy imports happen inside the commands (tests/test_cli_start.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from proxy.cliopts import ConfigOpt, JsonOpt

config_app = typer.Typer(
    help="Check a configuration file without running it.", rich_markup_mode=None, no_args_is_help=True
)
SocketOpt = Annotated[
    Path | None, typer.Option("--socket", help="The proxy's control socket (default: control_socket).")
]


def _ask(config: Path | None, socket_path: Path | None, command: str) -> dict[str, Any]:
    """One request to the running parent; no proxy answering there is one line, exit 1."""
    from proxy.cliutil import EXIT_FAILED, fail
    from proxy.supervisor.control import Unreachable, request

    try:
        return request(socket_path or control_socket_of(config), {"command": command})
    except Unreachable as exc:
        fail(str(exc), EXIT_FAILED)


def reload(config: ConfigOpt = None, socket_path: SocketOpt = None, as_json: JsonOpt = False) -> None:
    """Re-read and validate the running proxy's configuration; new workers take over.

    The proxy reads the same sources as at start (its -c file, its environment, its flags): -c here
    only says where its control socket is. Exit 0 when the new workers serve, 2 when the
    configuration is invalid or cannot change live (nothing changed), 1 when the new workers failed
    (the old ones keep serving) or no proxy answers."""
    from proxy.cliutil import EXIT_FAILED, EXIT_USAGE, fail

    answer = _ask(config, socket_path, "reload")
    if as_json:
        print(json.dumps(answer))
    if not answer.get("ok"):
        code = EXIT_USAGE if answer.get("result") == "invalid" else EXIT_FAILED
        if as_json:
            raise typer.Exit(code)
        fail(str(answer.get("error", "the proxy refused the reload")), code)
    if not as_json:
        count = int(answer.get("workers", 0))
        print(f"reloaded: generation {answer.get('generation')}, {count} worker{'s' if count != 1 else ''} "
              f"ready in {float(answer.get('seconds', 0)):.2f} s")  # fmt: skip


def upgrade(config: ConfigOpt = None, socket_path: SocketOpt = None, as_json: JsonOpt = False) -> None:
    """Start a new generation of the running proxy on its sockets; the old one drains and exits.

    The new generation runs what is installed now. It is started as the running one was (command
    line, environment, directory), takes the listening sockets, the control socket and the embedded
    Redis, and once its workers are ready the old generation drains and exits (a new pid). Exit 0
    then, 1 when the new generation failed (the old one keeps serving; the reason is the new
    process's) or no proxy answers. For hosts where strangler runs under a shell or nohup;
    Kubernetes: the rolling update."""
    from proxy.cliutil import EXIT_FAILED, fail

    answer = _ask(config, socket_path, "upgrade")
    if as_json:
        print(json.dumps(answer))
    if not answer.get("ok"):
        if as_json:
            raise typer.Exit(EXIT_FAILED)
        reason = str(answer.get("error") or "the proxy refused the upgrade").removeprefix("upgrade: ")
        fail(f"upgrade failed, pid {answer.get('old_pid')} keeps serving: {reason}", EXIT_FAILED)
    count = int(answer.get("workers", 0))
    print(f"upgraded: pid {answer.get('old_pid')} -> {answer.get('new_pid')}, {plural(count, 'worker')} "
          f"ready in {float(answer.get('seconds', 0)):.1f} s; the old generation drains "
          f"(up to {float(answer.get('drain_timeout_seconds', 0)):g} s)")  # fmt: skip


def control_socket_of(config: Path | None) -> Path:
    """Where the proxy started with ``config`` listens: its settings' ``control_socket``. The file
    may be the invalid one being reloaded: then its ``control_socket`` key alone, or the default."""
    from proxy.settings import ConfigError, Settings, load_settings

    try:
        return load_settings(config).control_socket
    except ConfigError:
        pass
    try:
        import yaml

        data: Any = yaml.safe_load(config.read_text(encoding="utf-8")) if config else None
        if isinstance(data, dict) and isinstance(data.get("control_socket"), str):
            return Path(data["control_socket"])
    except (OSError, ValueError, yaml.YAMLError):
        pass
    return Path(str(Settings.model_fields["control_socket"].default))


@config_app.command("check")
def check(
    file: Annotated[Path, typer.Argument(help="The YAML settings file.")], as_json: JsonOpt = False
) -> None:
    """Validate FILE as `strangler serve -c FILE` would load it, and build what a worker builds."""
    from proxy.cliutil import EXIT_USAGE, fail
    from proxy.settings import ConfigError, load_settings
    from proxy.supervisor.parent import check_tls, one_line

    try:
        settings = load_settings(file)
        check_tls(settings)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    try:
        dry_build(settings)
    except Exception as exc:  # noqa: BLE001 - a file that parses but cannot run: one line
        fail(f"{file}: {one_line(exc)}", EXIT_USAGE)
    groups, rules = len(settings.routes), len(settings.deprecations)
    if as_json:
        print(json.dumps({"ok": True, "file": str(file), "route_groups": groups, "deprecation_rules": rules,
                          "workers": settings.workers}))  # fmt: skip
        return
    print(f"ok: {file} ({plural(groups, 'route group')}, {plural(rules, 'deprecation rule')}, "
          f"workers {settings.workers})")  # fmt: skip


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def dry_build(settings: Any) -> None:
    """What a worker builds from ``settings`` (the app and its parts), without starting it: nothing
    connects, nothing listens."""
    import asyncio

    from proxy.app import create_app

    if not settings.redis_url:  # the embedded Redis's URL is known only once serve starts it
        settings = settings.model_copy(update={"redis_url": "redis://127.0.0.1:6390/0"})

    async def build() -> None:
        app = create_app(settings)
        await app.redis.aclose()

    asyncio.run(build())
