"""``strangler deprecations``: list rules with hit counts, override a rule's phase live.

Hit counts come from the running proxy's admin API (``GET {prefix}/deprecations``), not from
Redis: they are Prometheus counters in the proxy's memory (summed over its workers), so reading
them costs the proxy nothing on the request path and needs no extra writer task. The price: a
count is per proxy instance and restarts at zero; fleet-wide history is the Prometheus query
``sum by (rule, phase) (increase(strangler_deprecated_requests_total[7d]))``. Without a reachable
admin API the rules are still listed (config + Redis overrides), without counts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Annotated, Any

import typer
from redis.exceptions import RedisError

from proxy.cliutil import (
    EXIT_USAGE,
    AdminTokenOpt,
    AdminUrlOpt,
    ConfigOpt,
    JsonOpt,
    RedisOpt,
    console,
    err,
    fail,
    print_rollback,
    settings_from,
    with_control,
)
from proxy.cliutil.remote import AdminClient, AdminError, deprecation_table
from proxy.control.client import ControlClient
from proxy.control.connect import connect
from proxy.control.keys import Keys
from proxy.settings import Settings

deprecations_app = typer.Typer(
    help="Deprecated endpoints: rules, phases and who still calls them.", invoke_without_command=True
)


def default_admin_url(settings: Settings) -> str:
    """Where a proxy started with these settings serves its admin API."""
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    port = settings.admin_port if settings.admin_port is not None else settings.port
    return f"http://{host}:{port}{settings.admin_prefix}"


@deprecations_app.callback()
def listing(
    ctx: typer.Context,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: AdminUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List rules and hit counts (from the proxy's admin API; rules only from Redis otherwise)."""
    if ctx.invoked_subcommand is not None:
        return
    settings = settings_from(config, redis_url=redis_url)
    target = url or default_admin_url(settings)
    try:
        with AdminClient(target, token or settings.admin_token_value(), settings.admin_prefix) as client:
            data = client.deprecations()
        source = f"admin API {client.url}"
    except AdminError as exc:
        if url:  # the user named a proxy: say it failed rather than fall back quietly
            fail(str(exc))
        err.print(f"[yellow]note:[/yellow] {exc}; listing rules from the config and Redis, no counts")
        data = {"rules": _rules_from_redis(settings)}
        source = "config + Redis (no proxy reachable: no counts)"
    if as_json:
        print(json.dumps({"source": source, **data}))
        return
    if not data["rules"]:
        console.print("no deprecation rules configured")
        return
    console.print(deprecation_table(data["rules"], f"Deprecations ({source})"))


@deprecations_app.command("phase")
def set_phase(
    name: Annotated[str, typer.Argument(help="Rule name.")],
    phase: Annotated[str, typer.Argument(help="auto | warn | gone | off")],
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: AdminUrlOpt = None,
    token: AdminTokenOpt = None,
) -> None:
    """Force a rule's phase live on every replica ("auto" follows the sunset date again)."""
    settings = settings_from(config, redis_url=redis_url)
    if not url:
        from proxy.traffic.deprecation import InvalidOverride, parse_override

        try:
            parse_override(name, phase, {rule.name: rule for rule in settings.deprecations})
        except InvalidOverride as exc:
            fail(str(exc), EXIT_USAGE)
    _override(settings, url, token, lambda c: c.override_deprecation(name, {"phase": phase}), {name: phase})
    console.print(f"deprecation rule [bold]{name}[/bold]: phase [bold]{phase}[/bold]")


@deprecations_app.command("clear")
def clear(
    name: Annotated[str, typer.Argument(help="Rule name.")],
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: AdminUrlOpt = None,
    token: AdminTokenOpt = None,
) -> None:
    """Drop a rule's live override (back to its configured values)."""
    settings = settings_from(config, redis_url=redis_url)
    _override(settings, url, token, lambda c: c.clear_deprecation(name), {name: None})
    console.print(f"deprecation rule [bold]{name}[/bold]: live override removed")


def _override(
    settings: Settings,
    url: str | None,
    token: str | None,
    remote: Callable[[AdminClient], Any],
    fields: dict[str, str | None],
) -> None:
    """A live override: through the proxy named by ``--url`` (any refusal exits 1), else written to
    Redis, where every replica picks it up."""
    if url:
        try:
            with AdminClient(url, token, settings.admin_prefix) as client:
                remote(client)
        except AdminError as exc:
            fail(str(exc))
        return
    from proxy.traffic.deprecation import SECTION

    with_control(settings, lambda c: c.set_hash_fields(SECTION, fields))


def _rules_from_redis(settings: Settings) -> list[dict[str, Any]]:
    """Config rules with the Redis overrides applied, as the proxy would see them (no counts)."""
    from proxy.metrics import Metrics
    from proxy.traffic.deprecation import SECTION, DeprecationRules

    raw: dict[str, str] = {}
    url = settings.redis_url
    if url is None:
        from proxy.control.embedded import read_url

        url = read_url(settings.embedded_redis_dir)
    if url is not None:

        async def read() -> dict[str, str]:
            redis = connect(url, 2)
            try:
                keys = Keys.for_settings(settings)
                return await ControlClient(redis, keys).get_hash(SECTION)
            finally:
                await redis.aclose()

        try:
            raw = asyncio.run(read())
        except (RedisError, OSError):
            raw = {}
    rules = DeprecationRules(settings.deprecations, Metrics())
    ruleset, _ = rules.parse(raw, None)
    listed = rules.describe(ruleset)
    for item in listed:
        item["hits"] = {"warn": "-", "gone": "-"}
    return listed


# --- status / set / rollback through the admin API (cli.py calls these when --url is given) ---------
# AdminError raised here is turned into one line and an exit code by proxy.cli.StranglerGroup.


def remote_status(url: str, token: str | None, as_json: bool) -> None:
    from proxy.cliutil.remote import print_status

    with AdminClient(url, token) as client:
        print_status(client, console, as_json)


def remote_set(url: str, token: str | None, percentage: str, group: str | None) -> None:
    with AdminClient(url, token) as client:
        data = client.set_split(percentage, group)
    group_name, value = data["group"], data["percentage"]
    console.print(f"v2 share for [bold]{group_name}[/bold] set to [bold]{value:g}%[/bold]")


def remote_rollback(url: str, token: str | None, group: str | None) -> None:
    with AdminClient(url, token) as client:
        data = client.rollback(group)
    if data.get("pending"):  # 202: Redis had no master; that proxy serves 0% and retries the write
        console.print(
            f"[yellow]rollback of {data['group']} accepted[/yellow]: 0% on that proxy now; "
            "Redis is unreachable, every proxy follows when it is written"
        )
        return
    print_rollback(data.get("changed") or {data["group"]: None})
