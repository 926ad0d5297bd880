"""``strangler deprecations``: list rules with hit counts, override a rule's phase live.

Hit counts come from the running proxy's admin API (``GET {prefix}/deprecations``), not from
Redis: they are Prometheus counters in the proxy's memory (summed over its workers), so reading
them costs the proxy nothing on the request path and needs no extra writer task. The price: a
count is per proxy instance and restarts at zero; fleet-wide history is the Prometheus query
``sum by (rule, phase) (increase(strangler_deprecated_requests_total[7d]))``. Without a reachable
admin API the rules are still listed (config + Redis overrides), without counts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from proxy.admin import views
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
    redis_or_api,
    resolve_redis_url,
    settings_from,
    with_control,
)
from proxy.cliutil.remote import AdminClient, AdminError, deprecation_table
from proxy.control.client import ControlClient
from proxy.control.embedded import read_url
from proxy.control.keys import DEPRECATIONS_REGISTERED, Keys
from proxy.settings import DeprecationRule, Settings

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
            data["source"] = views.source(views.ADMIN_API, client.url)
        title = f"admin API {client.url}"
    except AdminError as exc:
        if url:  # the user named a proxy: say it failed rather than fall back quietly
            fail(str(exc), exc.exit_code)
        err.print(f"[yellow]note:[/yellow] {exc}; listing rules from the config and Redis, no counts")
        data = _rules_from_redis(settings)
        title = f"config + Redis at {data['source']['url']}: no proxy reachable, no counts"
    if as_json:
        print(json.dumps(data))
        return
    if not data["rules"]:
        console.print("no deprecation rules configured")
        return
    console.print(deprecation_table(data["rules"], f"Deprecations ({title})"))


@deprecations_app.command("phase")
def set_phase(
    name: Annotated[str, typer.Argument(help="Rule name.")],
    phase: Annotated[str, typer.Argument(help="auto | warn | gone | off")],
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: AdminUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Force a rule's phase live on every replica ("auto" follows the sunset date again).

    The rule may come from this CLI's config, from a running proxy's (registered in Redis), or be
    defined live in Redis; any other name is refused (exit 2)."""
    settings = settings_from(config, redis_url=redis_url)

    def local(settings: Settings) -> dict[str, Any]:
        from proxy.traffic.deprecation import PHASES, SECTION, InvalidOverride, parse_override

        known = _known_rules(settings)
        known.refuse_unknown(name)
        raw = phase.strip()
        if name not in known.configured and raw in PHASES:
            raw = _merged(known, name, raw)  # a rule defined live: change its phase only
        try:
            parse_override(name, raw, known.configured)
        except InvalidOverride as exc:
            fail(str(exc), EXIT_USAGE)
        with_control(settings, lambda c: c.set_hash_fields(SECTION, {name: raw}))
        return views.override_document(known.where, name, raw, True)

    remote = lambda c: dict(c.override_deprecation(name, {"phase": phase}))  # noqa: E731
    doc = _override(config, redis_url, url, token, settings, local, remote)
    if as_json:
        print(json.dumps(doc))
        return
    console.print(f"deprecation rule [bold]{name}[/bold]: phase [bold]{phase}[/bold]")


@deprecations_app.command("clear")
def clear(
    name: Annotated[str, typer.Argument(help="Rule name.")],
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: AdminUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Drop a rule's live override (back to its configured values); an unknown rule: exit 2."""
    settings = settings_from(config, redis_url=redis_url)

    def local(settings: Settings) -> dict[str, Any]:
        from proxy.traffic.deprecation import SECTION

        known = _known_rules(settings)
        known.refuse_unknown(name)
        changed = name in known.overrides
        if changed:
            with_control(settings, lambda c: c.set_hash_fields(SECTION, {name: None}))
        return views.override_document(known.where, name, None, changed)

    remote = lambda c: dict(c.clear_deprecation(name))  # noqa: E731
    doc = _override(config, redis_url, url, token, settings, local, remote)
    if as_json:
        print(json.dumps(doc))
        return
    if doc["changed"]:
        console.print(f"deprecation rule [bold]{name}[/bold]: live override removed")
    else:
        console.print(f"deprecation rule [bold]{name}[/bold]: no live override (it follows its config)")


def _override(
    config: Any,
    redis_url: str | None,
    url: str | None,
    token: str | None,
    settings: Settings,
    local: Callable[[Settings], dict[str, Any]],
    remote: Callable[[AdminClient], dict[str, Any]],
) -> dict[str, Any]:
    """A live override, through the proxy named by ``--url`` or Redis (``redis_or_api``); over the
    API the document's ``source`` is the API's, as the CLI reached it."""
    doc, where = redis_or_api(
        config, redis_url, url, token, local, remote, settings=settings, prefix=settings.admin_prefix
    )
    return {**doc, "source": where}


@dataclass
class KnownRules:
    """The deprecation rules a name may refer to, read where ``strangler deprecations`` reads them."""

    configured: dict[str, DeprecationRule]  # this CLI's config and every running proxy's (registered)
    overrides: dict[str, str]  # the live overrides in Redis (some define whole rules)
    where: dict[str, str]

    def refuse_unknown(self, name: str) -> None:
        if name not in self.configured and name not in self.overrides:
            fail(
                f"unknown deprecation rule {name!r}: not in this config, not registered by a running proxy "
                f"nor defined live in Redis at {self.where['url']}",
                EXIT_USAGE,
            )


def _merged(known: KnownRules, name: str, phase: str) -> str:
    """A phase for a rule defined live in Redis goes into its JSON definition."""
    try:
        base = json.loads(known.overrides.get(name) or "{}")
    except ValueError:
        base = {}
    return json.dumps({**(base if isinstance(base, dict) else {}), "phase": phase})


def _known_rules(settings: Settings, strict: bool = True) -> KnownRules:
    """Strict: Redis unreachable is an error (exit 1). Not strict (a listing): this config's rules."""
    from proxy.redis_url import describe
    from proxy.traffic.deprecation import SECTION

    async def read(control: ControlClient) -> tuple[dict[str, str], dict[str, str]]:
        return await control.get_hash(DEPRECATIONS_REGISTERED), await control.get_hash(SECTION)

    registered: dict[str, str] = {}
    overrides: dict[str, str] = {}
    url = settings.redis_url or read_url(settings.embedded_redis_dir)
    if strict:
        url = resolve_redis_url(settings)
        registered, overrides = with_control(settings, read)
    elif url is not None:
        registered, overrides = _read_quietly(settings, url, read)
    configured: dict[str, DeprecationRule] = {}
    for name, value in sorted(registered.items()):
        try:
            configured[name] = DeprecationRule.model_validate_json(value)
        except ValueError:
            continue  # a registration this CLI cannot read (another version)
    configured.update({rule.name: rule for rule in settings.deprecations})
    where = views.source(views.REDIS, describe(url) if url else "none (no Redis configured or running)")
    return KnownRules(configured, overrides, where)


def _read_quietly(settings: Settings, url: str, read: Callable[[ControlClient], Any]) -> Any:
    import asyncio

    from redis.exceptions import RedisError

    from proxy.control.connect import connect

    async def go() -> Any:
        redis = connect(url, 2)
        try:
            return await read(ControlClient(redis, Keys.for_settings(settings)))
        finally:
            await redis.aclose()

    try:
        return asyncio.run(go())
    except (RedisError, OSError):
        return {}, {}


def _rules_from_redis(settings: Settings) -> dict[str, Any]:
    """The deprecations view from Redis: the rules of this config and of the running proxies
    (registered), with the live overrides applied, as a proxy would see them; no counts."""
    from proxy.metrics import Metrics
    from proxy.traffic.deprecation import SECTION, DeprecationRules

    known = _known_rules(settings, strict=False)
    rules = DeprecationRules(known.configured.values(), Metrics())
    ruleset, _ = rules.parse(known.overrides, None)
    listed = rules.describe(ruleset)
    for item in listed:
        item["hits"] = None  # counts live in a proxy's memory
    return views.deprecations_document(known.where, Keys.for_settings(settings).hash(SECTION), listed)
