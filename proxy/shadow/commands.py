"""``strangler shadow ...`` and ``strangler diffs``: thin wrappers over ShadowControl and ReportStore."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from proxy.cliutil import (
    EXIT_FAILED,
    EXIT_USAGE,
    AdminTokenOpt,
    AllGroupsOpt,
    ConfigOpt,
    JsonOpt,
    RedisOpt,
    RemoteUrlOpt,
    console,
    fail,
    redis_or_api,
    with_control,
    with_registered_groups,
)
from proxy.control.client import ControlClient, InvalidValue
from proxy.shadow.control import ShadowControl
from proxy.shadow.report import COUNTERS, ReportStore

EndpointOpt = Annotated[
    str | None, typer.Option("--endpoint", "-e", help="Endpoint, e.g. 'GET /users/{id}' (default: all).")
]

shadow_app = typer.Typer(no_args_is_help=True, help="Mirror requests to v2 and compare (shadow traffic).")
ignore_app = typer.Typer(no_args_is_help=True, help="Ignore rules for comparisons (live, in Redis).")
shadow_app.add_typer(ignore_app, name="ignore")


def _run_at(
    config: Path | None,
    redis_url: str | None,
    action: Any,
    remote: Any,
    url: str | None = None,
    token: str | None = None,
) -> tuple[Any, dict[str, str]]:
    """Run ``action(ShadowControl, ReportStore)`` against Redis, or ``remote(AdminClient)`` with
    ``--url``; its result and where it ran (the ``source`` of the views' JSON documents).
    InvalidValue -> exit code 2. Groups registered in Redis by running proxies count as known
    groups, so a group missing from this CLI's config still works."""

    def local(loaded: Any) -> Any:
        settings = with_registered_groups(loaded)

        async def go(control: ControlClient) -> Any:
            shadow = ShadowControl(control, settings)
            report = ReportStore(
                control.redis, control.keys, settings.shadow.max_samples, settings.shadow.noise_threshold
            )
            return await action(shadow, report)

        try:
            return with_control(settings, go)
        except InvalidValue as exc:
            fail(str(exc), EXIT_USAGE)

    return redis_or_api(config, redis_url, url, token, local, remote)


REPLICA_FIELDS = (
    "in_force",
    "rules_in_force",
    "queue_depth",
    "buffered_bytes",
    "report_epoch",
    "noise_in_force",
    "pending",
)


def _shadow_document(status: dict[str, Any], where: dict[str, str]) -> dict[str, Any]:
    """One document for ``shadow status/on/off --json`` whichever path read it
    (docs/schemas/shadow.json): what Redis holds and means, plus ``replica``, the answering proxy's
    own state, which only the admin API path has (null through Redis)."""
    doc = {k: status[k] for k in ("redis", "problems", "groups", "rules")}
    has_replica = all(k in status for k in REPLICA_FIELDS)
    doc["replica"] = {k: status[k] for k in REPLICA_FIELDS} if has_replica else None
    return {"source": where, **doc}


@shadow_app.command("on")
def shadow_on(
    group: AllGroupsOpt = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: RemoteUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start mirroring (globally, or for one group while the global switch is on)."""

    async def switch_on(shadow: ShadowControl, report: ReportStore) -> dict[str, Any]:
        await shadow.set({"enabled": True}, group)
        return await shadow.status()

    def remote(client: Any) -> dict[str, Any]:
        client.set_shadow({"enabled": True}, group)
        return dict(client.shadow())

    status, where = _run_at(config, redis_url, switch_on, remote, url, token)
    if as_json:
        print(json.dumps(_shadow_document(status, where)))
        return
    console.print(f"shadow traffic [green]on[/green] for {group or 'all groups'}")
    if group is not None and not status["groups"][group]["enabled"]:
        console.print("[yellow]note:[/yellow] the global switch is off; `strangler shadow on` turns it on")
    for name, policy in status["groups"].items():
        if policy["enabled"] and policy["sample_percentage"] == 0 and name == (group or "default"):
            console.print(f"[yellow]note:[/yellow] {name} samples 0%; `strangler shadow set --sample P`")


@shadow_app.command("off")
def shadow_off(
    group: AllGroupsOpt = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: RemoteUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop mirroring. Without --group this is the kill switch: no group mirrors anything."""
    off = {"enabled": False}

    async def switch_off(shadow: ShadowControl, report: ReportStore) -> dict[str, Any]:
        await shadow.set(off, group)
        return await shadow.status()

    def remote(client: Any) -> dict[str, Any]:
        client.set_shadow(off, group)
        return dict(client.shadow())

    status, where = _run_at(config, redis_url, switch_off, remote, url, token)
    if as_json:
        print(json.dumps(_shadow_document(status, where)))
        return
    console.print(f"shadow traffic [yellow]off[/yellow] for {group or 'all groups (kill switch)'}")


@shadow_app.command("set")
def shadow_set(
    sample: Annotated[str | None, typer.Option("--sample", help="Percentage mirrored, 0-100.")] = None,
    methods: Annotated[str | None, typer.Option("--methods", help="e.g. GET,HEAD,POST")] = None,
    max_body: Annotated[str | None, typer.Option("--max-body", help="Largest request body mirrored.")] = None,
    compare_max: Annotated[str | None, typer.Option("--compare-max", help="Largest body compared.")] = None,
    calibration: Annotated[str | None, typer.Option("--calibration", help="Percentage calibrated.")] = None,
    reset: Annotated[bool, typer.Option("--reset", help="Forget the live values: back to config.")] = False,
    group: AllGroupsOpt = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: RemoteUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change shadow settings on every running proxy, live."""
    values: dict[str, Any] = {
        "sample_percentage": sample,
        "methods": methods,
        "max_body_bytes": max_body,
        "compare_max_bytes": compare_max,
        "calibration_percentage": calibration,
    }
    values = {k: v for k, v in values.items() if v is not None}
    if reset:
        values = dict.fromkeys(["enabled", "sample_percentage", "methods", "max_body_bytes"], None)
        if group is None:
            values.update(compare_max_bytes=None, calibration_percentage=None)
    if not values:
        fail("nothing to set: give --sample, --methods, --max-body, --compare-max or --calibration", 2)
    written, where = _run_at(
        config,
        redis_url,
        lambda s, r: s.set(values, group),
        lambda c: c.set_shadow(values, group),
        url,
        token,
    )
    if as_json:  # docs/schemas/shadow-set.json
        print(json.dumps({"source": where, "group": group or "all", "written": written}))
        return
    for name, value in written.items():
        console.print(f"{name} = {value if value is not None else '(config default)'}", markup=False)


@shadow_app.command("status")
def shadow_status(
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: RemoteUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Effective shadow settings per group, rejected values and ignore rules."""
    data, where = _run_at(config, redis_url, lambda s, r: s.status(), lambda c: c.shadow(), url, token)
    if as_json:
        print(json.dumps(_shadow_document(data, where)))
        return
    table = Table(title="Shadow traffic")
    for column in ("group", "enabled", "sample %", "methods", "max body", "compare max", "calibration %"):
        table.add_column(column)
    for group, gp in data["groups"].items():
        table.add_row(
            group, "on" if gp["enabled"] else "off", f"{gp['sample_percentage']:g}", ",".join(gp["methods"]),
            str(gp["max_body_bytes"]), str(gp["compare_max_bytes"]), f"{gp['calibration_percentage']:g}",
        )  # fmt: skip
    console.print(table)
    for problem in data["problems"]:
        console.print(f"[red]rejected in Redis (last good value kept):[/red] {problem}")
    if data["rules"]:
        _print_rules(data["rules"])


def _print_rules(rules: list[dict[str, Any]]) -> None:
    table = Table(title="Ignore rules")
    for column in ("kind", "endpoint", "value", "source"):
        table.add_column(column)
    for rule in rules:
        table.add_row(*(escape(rule[k]) for k in ("kind", "endpoint", "value", "source")))
    console.print(table)


def _rule_args(path: str | None, regex: str | None, order: bool, tolerance: str | None) -> tuple[str, Any]:
    given = [
        (k, v) for k, v in (("exclude_path", path), ("exclude_regex", regex), ("tolerance", tolerance)) if v
    ]
    if order:
        given.append(("ignore_order", ""))
    if len(given) != 1:
        fail("give exactly one of --path, --regex, --order, --tolerance", EXIT_USAGE)
    return given[0]


PathOpt = Annotated[str | None, typer.Option("--path", help="Exact or [*] path, e.g. root['data'][*]['id'].")]
RegexOpt = Annotated[str | None, typer.Option("--regex", help="deepdiff exclude_regex_paths regex.")]
OrderOpt = Annotated[bool, typer.Option("--order", help="Ignore list order.")]
ToleranceOpt = Annotated[str | None, typer.Option("--tolerance", help="Numeric tolerance (absolute).")]


@ignore_app.command("add")
def ignore_add(
    path: PathOpt = None,
    regex: RegexOpt = None,
    order: OrderOpt = False,
    tolerance: ToleranceOpt = None,
    endpoint: EndpointOpt = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: RemoteUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add an ignore rule; every proxy applies it to the next comparison."""
    kind, value = _rule_args(path, regex, order, tolerance)
    rule, where = _run_at(
        config,
        redis_url,
        lambda s, r: s.add_rule(kind, endpoint, value),
        lambda c: c.change_rule("PUT", kind, endpoint, value)["added"],
        url,
        token,
    )
    if as_json:  # docs/schemas/shadow-rule-change.json
        print(json.dumps({"source": where, "change": "added", "rule": rule}))
        return
    console.print(f"added {rule['kind']} {rule['value']!r} for {rule['endpoint']}", markup=False)


@ignore_app.command("remove")
def ignore_remove(
    path: PathOpt = None,
    regex: RegexOpt = None,
    order: OrderOpt = False,
    tolerance: ToleranceOpt = None,
    endpoint: EndpointOpt = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: RemoteUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove an ignore rule added earlier (config-file rules stay)."""
    kind, value = _rule_args(path, regex, order, tolerance)

    def remote(client: Any) -> bool:
        from proxy.cliutil.remote import AdminError

        try:
            return bool(client.change_rule("DELETE", kind, endpoint, value)["removed"])
        except AdminError as exc:
            if exc.status == 404:
                return False
            raise

    removed, where = _run_at(
        config, redis_url, lambda s, r: s.remove_rule(kind, endpoint, value), remote, url, token
    )
    if not removed:
        fail("no such rule in Redis (see `strangler shadow ignore list`)", EXIT_FAILED)
    if as_json:
        from proxy.shadow.policy import make_rule

        gone = make_rule(kind, endpoint, value)  # valid: it was just removed
        rule = {"kind": gone.kind, "endpoint": gone.endpoint, "value": gone.value}
        print(json.dumps({"source": where, "change": "removed", "rule": rule}))
        return
    console.print("removed")


@ignore_app.command("list")
def ignore_list(
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: RemoteUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ignore rules in force: from the config file and from Redis."""
    rules, _ = _run_at(config, redis_url, lambda s, r: s.rules(), lambda c: c.shadow_rules(), url, token)
    if as_json:
        print(json.dumps(rules))
        return
    if not rules:
        console.print("no ignore rules")
        return
    _print_rules(rules)


def diffs(
    endpoint: Annotated[str | None, typer.Argument(help="Show one endpoint's fields and samples.")] = None,
    as_json: JsonOpt = False,
    reset: Annotated[bool, typer.Option("--reset", help="Clear the report (all replicas).")] = False,
    forget_noise: Annotated[bool, typer.Option("--forget-noise", help="With --reset: noise too.")] = False,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: RemoteUrlOpt = None,
    token: AdminTokenOpt = None,
) -> None:
    """Where v2 answers differ from v1: worst endpoints first, or one endpoint in detail."""
    if reset:
        deleted, _ = _run_at(
            config,
            redis_url,
            lambda s, r: r.reset(forget_noise=forget_noise),
            lambda c: c.reset_diffs(forget_noise)["keys_deleted"],
            url,
            token,
        )
        if as_json:
            print(json.dumps({"reset": True, "keys_deleted": deleted}))
        else:
            console.print(f"diff report cleared ({deleted} keys)")
        return
    if endpoint:
        from proxy.cliutil.remote import AdminError

        def one(client: Any) -> Any:
            try:
                return client.diffs(endpoint)
            except AdminError as exc:
                if exc.status == 404:
                    return None
                raise

        detail, _ = _run_at(config, redis_url, lambda s, r: r.endpoint(endpoint), one, url, token)
        if detail is None:
            fail(f"no endpoint {endpoint!r} in the report (see `strangler diffs`)", EXIT_FAILED)
        if as_json:
            print(json.dumps(detail))
        else:
            _print_endpoint(detail)
        return
    summary, _ = _run_at(config, redis_url, lambda s, r: r.summary(), lambda c: c.diffs(), url, token)
    if as_json:
        print(json.dumps(summary))
        return
    _print_summary(summary)


def _print_summary(summary: dict[str, Any]) -> None:
    rows = summary["endpoints"]
    if not rows:
        console.print("no comparisons yet (is shadow traffic on? `strangler shadow status`)")
    else:
        table = Table(title="Shadow diffs (worst first)")
        for column in ("endpoint", "group", "compared", "matched", "mismatched", "noise", "skipped", "errors",
                       "pending", "mismatch %", "top fields"):  # fmt: skip
            table.add_column(column, overflow="fold")
        for row in rows:
            style = "red" if row["mismatched"] or row["errors"] else None
            fields = escape(", ".join(f"{name} ({count})" for name, count in row["top_fields"]))
            counts = [str(row[k]) for k in COUNTERS]
            table.add_row(
                escape(row["endpoint"]), row["group"], *counts, f"{100 * row['mismatch_rate']:.1f}", fields,
                style=style,
            )  # fmt: skip
        console.print(table)
    groups = summary["groups"]
    if groups:
        table = Table(title="Mirrored requests per group (all replicas)")
        outcomes = ("sent", "dropped", "skipped_method", "skipped_size", "error")
        table.add_column("group")
        for outcome in outcomes:
            table.add_column(outcome)
        for group, counts in sorted(groups.items()):
            table.add_row(group, *(str(counts.get(o, 0)) for o in outcomes))
        console.print(table)


def _print_endpoint(detail: dict[str, Any]) -> None:
    counts = ", ".join(
        f"{name} {detail[name]}"
        for name in ("compared", "matched", "mismatched", "noise", "skipped", "errors", "pending")
    )
    console.print(f"[bold]{escape(detail['endpoint'])}[/bold] (group {detail['group']}): {counts}")
    if detail["fields"]:
        table = Table(title="Fields that differ")
        table.add_column("field", overflow="fold")
        table.add_column("mismatches")
        for name, count in detail["fields"].items():
            table.add_row(escape(name), str(count))
        console.print(table)
    seen = detail.get("noise_seen", {})
    if detail["suppressed"] or seen:
        table = Table(title="Noise (varied between two v1 answers too)")
        table.add_column("field", overflow="fold")
        table.add_column("varied in calibrations")
        table.add_column("noise")
        table.add_column("suppressed")
        for name in sorted(set(seen) | set(detail["suppressed"])):
            noisy = "yes" if name in detail["noise_fields"] else "not yet"
            table.add_row(escape(name), str(seen.get(name, 0)), noisy, str(detail["suppressed"].get(name, 0)))
        console.print(table)
    for sample in detail["samples"]:
        console.print(
            f"- {sample['method']} {sample['path']} v1 {sample['v1_status']} v2 {sample['v2_status']} "
            f"[{sample['result']}] request {sample['request_id']}"
            + (f" ({sample['detail']})" if sample.get("detail") else ""),
            markup=False,
        )
        for diff in sample["diff"][:10]:
            console.print(f"    {diff['field']}: {diff['v1']} -> {diff['v2']}", markup=False)
