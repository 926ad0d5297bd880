"""``strangler rollout ...`` and the helpers ``strangler set --verify`` and ``strangler status`` use.

Thin like the rest of the CLI: it talks to Redis through the same ``Rollouts`` object the leader
uses, so a transition made here is the same transaction (state + split + log + alert outbox).
``proxy/cli.py`` adds ``rollout_app`` to the root; the shared options and helpers come from the
leaf ``proxy.cliutil``.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
from pathlib import Path
from typing import Annotated, Any

import redis.asyncio as aioredis
import typer

from proxy.canary import records, statusview
from proxy.canary.rollout import (
    ACTIVE,
    COMPLETED,
    ROLLED_BACK,
    RolloutError,
    Rollouts,
    parse_duration,
    parse_steps,
)
from proxy.cliutil import (
    EXIT_USAGE,
    AdminTokenOpt,
    ConfigOpt,
    GroupOpt,
    JsonOpt,
    RedisOpt,
    RemoteUrlOpt,
    check_group,
    console,
    fail,
    redis_or_api,
    settings_from,
    with_control,
)
from proxy.control.client import SplitWriter
from proxy.control.keys import Keys
from proxy.settings import format_ladder

rollout_app = typer.Typer(no_args_is_help=True, help="Progressive rollout: step v2 up while the checks pass.")


def rollout_writer(redis: aioredis.Redis, keys: Keys) -> SplitWriter:
    """The split writer for commands that set a share by hand: through the rollout's transaction."""
    return Rollouts(redis, keys).manual_split


def who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "?"
    return f"cli {user}@{socket.gethostname()}"


def _transition(
    config: Path | None,
    redis_url: str | None,
    url: str | None,
    token: str | None,
    group: str | None,
    action: Any,
    remote: tuple[str, dict[str, Any]],
) -> dict[str, Any]:
    """Run one Rollouts call (Redis) or its admin API twin (``--url``); refused: exit code 2.
    Returns the rollout view (docs/schemas/rollout.json): the state, and where it was written."""

    def local(settings: Any) -> dict[str, Any]:
        name = check_group(settings, group)

        async def go(control: Any) -> dict[str, Any]:
            state = await action(Rollouts(control.redis, control.keys), name, settings)
            return dict(state.as_dict())

        try:
            return with_control(settings, go)
        except RolloutError as exc:
            fail(str(exc), EXIT_USAGE)

    def remote_call(client: Any) -> dict[str, Any]:
        return client.rollout(remote[0], group, remote[1])

    state, where = redis_or_api(config, redis_url, url, token, local, remote_call)
    return {"source": where, **state}


def _print_state(state: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(state, default=str))
        return
    steps = format_ladder(state["steps"], state.get("approval_steps") or []).replace(",", ", ")
    console.print(
        f"rollout [bold]{state['group']}[/bold]: {state['state']} at [bold]{state['percentage']:g}%[/bold] "
        f"(step {state['index'] + 1}/{len(state['steps'])}: {steps}; hold {state['interval_seconds']:g}s)"
    )


@rollout_app.command("start")
def start(
    group: GroupOpt = None,
    steps: Annotated[
        str | None,
        typer.Option(help="Ladder, e.g. 1,5,10,25!,50,75,90,95,100 (25!: hold at 25% until approved)."),
    ] = None,
    interval: Annotated[str | None, typer.Option(help="Hold per step, e.g. 30s, 5m.")] = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: RemoteUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start at the first step; the leader advances while the checks pass."""

    async def action(r: Rollouts, name: str, settings: Any) -> Any:
        if steps:
            ladder, approvals = parse_steps(steps)
        else:
            ladder, approvals = list(settings.canary.steps), list(settings.canary.approval_steps)
        hold = parse_duration(interval) if interval else settings.canary.step_interval_seconds
        return await r.start(name, ladder, hold, who(), approvals)

    body = {k: v for k, v in (("steps", steps), ("interval", interval)) if v}
    _print_state(_transition(config, redis_url, url, token, group, action, ("start", body)), as_json)


@rollout_app.command("pause")
def pause(
    group: GroupOpt = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: RemoteUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Hold at the current step (checks and automatic rollback keep running)."""
    state = _transition(
        config, redis_url, url, token, group, lambda r, n, s: r.pause(n, who()), ("pause", {})
    )
    _print_state(state, as_json)


@rollout_app.command("resume")
def resume(
    group: GroupOpt = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: RemoteUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Carry on; the current step is held for a full interval again."""
    action = lambda r, n, s: r.resume(n, who())  # noqa: E731
    _print_state(_transition(config, redis_url, url, token, group, action, ("resume", {})), as_json)


@rollout_app.command("abort")
def abort(
    group: GroupOpt = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: RemoteUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Roll back to 0% now and stop the rollout."""
    action = lambda r, n, s: r.abort(n, who())  # noqa: E731
    _print_state(_transition(config, redis_url, url, token, group, action, ("abort", {})), as_json)


@rollout_app.command("promote")
def promote(
    group: GroupOpt = None,
    full: Annotated[bool, typer.Option("--full", help="Straight to 100%.")] = False,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: RemoteUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Go to the next step now (with --full: to 100%), without waiting for the hold."""
    action = lambda r, n, s: r.promote(n, who(), full=full)  # noqa: E731
    body = {"full": True} if full else {}
    _print_state(_transition(config, redis_url, url, token, group, action, ("promote", body)), as_json)


@rollout_app.command("approve")
def approve(
    group: GroupOpt = None,
    by: Annotated[str | None, typer.Option("--by", help="Who approves (default: user@host).")] = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: RemoteUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve the current approval hold (a step written N!): the rollout leaves it once the checks
    have passed for the hold. Refused (exit 2) when the rollout is not held at an approval step."""
    if by is not None and not 0 < len(by.strip()) <= 100:
        fail("--by must be a name of 1 to 100 characters", EXIT_USAGE)
    name = by.strip() if by else None
    action = lambda r, n, s: r.approve(n, f"{name} ({who()})" if name else who())  # noqa: E731
    body = {"by": name} if name else {}
    state = _transition(config, redis_url, url, token, group, action, ("approve", body))
    if as_json:
        _print_state(state, True)
        return
    _print_state(state, False)
    console.print(f"  {approval_line(state)}", markup=False)


def approval_line(rollout: dict[str, Any]) -> str:
    """``awaiting approval since 12:00:00 UTC`` / ``approved by X at 12:01:00 UTC`` / ``""``: the
    current hold's approval, as status, rollout status and watch show it."""
    approval = rollout.get("approval")
    if rollout.get("awaiting_approval"):
        since = time.strftime("%H:%M:%S", time.gmtime(float(rollout.get("awaiting_since") or 0)))
        paused = " (paused: resume first)" if rollout.get("state") == "paused" else ""
        return f"awaiting approval since {since} UTC{paused}"
    if approval and approval.get("hold_id") == rollout.get("hold_id") and rollout.get("state") in ACTIVE:
        when = time.strftime("%H:%M:%S", time.gmtime(float(approval["at"])))
        return f"approved by {approval['by']} at {when} UTC"
    return ""


def _status_reader(
    config: Path | None, redis_url: str | None, url: str | None, token: str | None, group: str | None
) -> tuple[str, Any]:
    """The group name and a function returning ``statusview.read_status`` for it, from Redis or the
    API (with ``source``: where it was read)."""
    name, settings = group or "default", None
    if not url:  # an unknown group is refused before the first read
        settings = settings_from(config, redis_url=redis_url)
        name = check_group(settings, group)

    def local(settings: Any) -> dict[str, Any]:
        return with_control(settings, lambda c: statusview.read_status(c.redis, c.keys, [name]))

    def remote(client: Any) -> dict[str, Any]:
        data = client.canary_status()
        if name not in data.get("groups", {}):
            fail(
                f"unknown group {name!r}; the proxy serves: {', '.join(data.get('groups', {}))}",
                EXIT_USAGE,
            )
        return {"leader": data.get("leader"), "groups": {name: data["groups"][name]}}

    def read() -> dict[str, Any]:
        data, where = redis_or_api(config, redis_url, url, token, local, remote, settings=settings)
        return {"source": where, **data}

    return name, read


@rollout_app.command("status")
def status(
    group: GroupOpt = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: RemoteUrlOpt = None,
    token: AdminTokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The rollout, the last check and the last decision for a group."""
    name, read = _status_reader(config, redis_url, url, token, group)
    data = read()
    entry = data["groups"][name]
    if as_json:
        print(
            json.dumps(
                {"source": data["source"], "group": name, "leader": data["leader"], **entry}, default=str
            )
        )
        return
    summary = summarize(entry)
    console.print(f"group [bold]{name}[/bold] (leader: {data['leader'] or 'none'})")
    for label in ("rollout", "verdict", "decision"):
        console.print(f"  {label}: {summary[label]}", markup=False)
    for line in gate_lines(entry.get("verdict")):
        console.print(f"  {line}", markup=False)


def watch_line(rollout: dict[str, Any], width: int = 20) -> str:
    """``[#####...............]  25% progressing, step 4/6``: fits 80 columns for any group name
    up to 20 characters."""
    filled = round(width * float(rollout["percentage"]) / 100)
    bar = "#" * filled + "." * (width - filled)
    step = f"step {rollout['index'] + 1}/{len(rollout['steps'])}"
    approval = approval_line(rollout)
    line = f"[{bar}] {rollout['percentage']:>5g}% {rollout['state']}, {step}"
    return (
        f"{line}; {approval.split(':')[0] if approval.startswith('awaiting') else approval}"
        if approval
        else line
    )


def check_line(verdict: dict[str, Any]) -> str:
    """The last check on one short line: status, then v2's and v1's figures."""
    v1, v2 = verdict.get("v1") or {}, verdict.get("v2") or {}
    line = f"check {verdict.get('status')}: v2 {_short(v2)}; v1 {_short(v1)}"
    stats = verdict.get("statistics")
    if isinstance(stats, dict):  # the statistical judge: share of its rollback threshold reached
        parts = []
        for test in ("errors", "latency"):
            part = stats.get(test)
            evidence = part.get("evidence") if isinstance(part, dict) else None
            if isinstance(evidence, int | float) and isinstance(part, dict):
                little = "" if part.get("enough_data") else " (little data)"
                parts.append(f"{test} {max(0.0, evidence):.0%}{little}")
        if parts:
            line += f"; evidence {', '.join(parts)}"
    return line


def gate_lines(verdict: dict[str, Any] | None) -> list[str]:
    """One line per metric gate of the last check: ``gate checkout: fail 0.5 (1/2 in a row,
    dry-run): 0.5 fails 'result >= 0.95'``. The reason never holds a URL or a secret."""
    lines = []
    for gate in (verdict or {}).get("gates") or []:
        if not isinstance(gate, dict):
            continue
        value = gate.get("value")
        shown = "-" if value is None else f"{value:g}" if isinstance(value, int | float) else "?"
        streak = f"{gate.get('consecutive_failures', 0)}/{gate.get('failure_limit', '?')} in a row"
        tags = ", ".join([streak, *(["dry-run"] if gate.get("dry_run") else [])])
        lines.append(f"gate {gate.get('name')}: {gate.get('status')} {shown} ({tags}): {gate.get('reason')}")
    return lines


def _short(figures: dict[str, Any]) -> str:
    if not figures:
        return "n/a"
    return (
        f"{figures['requests']} req {figures['error_rate']:.1%} err p95 {figures['p95_seconds'] * 1000:.0f}ms"
    )


@rollout_app.command("watch")
def watch(
    group: GroupOpt = None,
    timeout: Annotated[str | None, typer.Option(help="Give up after this long (e.g. 10m); exit 1.")] = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    url: RemoteUrlOpt = None,
    token: AdminTokenOpt = None,
) -> None:
    """Follow a rollout, one line per change, until it completes (exit 0), is rolled back or the
    timeout passes (exit 1)."""
    limit = None
    if timeout:
        try:
            limit = parse_duration(timeout)
        except RolloutError as exc:
            fail(str(exc), EXIT_USAGE)
    name, read = _status_reader(config, redis_url, url, token, group)
    started = time.monotonic()
    last: tuple[str, str, str] = ("", "", "")
    console.print(f"watching the rollout of {name} (Ctrl-C stops watching, not the rollout)")
    while True:
        entry = read()["groups"][name]
        rollout = entry["rollout"]
        if rollout is None:
            fail(f"no rollout for {name} (start one: strangler rollout start --group {name})")
        verdict = entry.get("verdict")
        checks = [check_line(verdict), *gate_lines(verdict)] if verdict else []
        lines = (watch_line(rollout), "\n".join(checks), approval_line(rollout))
        stamp = time.strftime("%H:%M:%S")
        if lines[0] != last[0]:
            console.print(f"{stamp} {lines[0]}", markup=False, soft_wrap=True)
        for shown, before in zip(lines[1:], last[1:], strict=True):
            if shown and shown != before:
                for line in shown.split("\n"):
                    console.print(f"{stamp}   {line}", markup=False, soft_wrap=True)
        last = lines
        if rollout["state"] == COMPLETED:
            console.print(f"rollout of {name}: completed at {rollout['percentage']:g}%")
            return
        if rollout["state"] == ROLLED_BACK:
            fail(f"rollout of {name}: rolled back to 0%")
        if limit is not None and time.monotonic() - started > limit:
            where = f"{rollout['state']} at {rollout['percentage']:g}%"
            fail(f"rollout of {name}: timed out after {timeout}, still {where}")
        time.sleep(0.5)


# --- helpers for proxy/cli.py ------------------------------------------------------------------


def summarize(entry: dict[str, Any]) -> dict[str, str]:
    """One short line each for the rollout, the last verdict and the last decision."""
    rollout = entry.get("rollout")
    verdict = entry.get("verdict")
    decision = entry.get("decision")
    r = (
        "-"
        if not rollout
        else f"{rollout['state']} {rollout['percentage']:g}% "
        f"(step {rollout['index'] + 1}/{len(rollout['steps'])})"
    )
    approval = approval_line(rollout) if rollout else ""
    if approval:
        r = f"{r}; {approval}"
    lost = entry.get("state_lost")
    if lost:
        when = time.strftime("%H:%M:%S", time.localtime(float(lost.get("at", 0))))
        r = (
            f"REDIS LOST ITS DATA at {when}: proxies kept their last split and wrote it back "
            f"(rollouts restored: {', '.join(lost.get('rollouts_restored') or []) or 'none'}); "
            f"setting a split by hand clears this | {r}"
        )
    if verdict:
        v1, v2 = verdict.get("v1") or {}, verdict.get("v2") or {}
        v = f"{verdict['status']}: v1 {_fig(v1)} | v2 {_fig(v2)}" + (
            f" ({verdict['reason']})" if verdict["status"] != "pass" else ""
        )
    else:
        v = "-"
    if decision:
        when = time.strftime("%H:%M:%S", time.localtime(float(decision["at"])))
        start = decision.get("from_percentage", "?")
        d = f"{decision['action']} at {when} from {start}%: {decision['reason']}"
    else:
        d = "-"
    return {"rollout": r, "verdict": v, "decision": d}


def _fig(figures: dict[str, Any]) -> str:
    if not figures:
        return "n/a"
    p95_ms = figures["p95_seconds"] * 1000
    return f"{figures['requests']} req, {figures['error_rate']:.2%} err, p95 {p95_ms:.0f} ms"


async def canary_status(control: Any, groups: list[str]) -> dict[str, dict[str, str]]:
    """Per group summary lines for ``strangler status``."""
    data = await statusview.read_status(control.redis, control.keys, groups)
    return {group: summarize(entry) for group, entry in data["groups"].items()}


class _SplitOps:
    """What ``set --verify`` needs, over Redis or over the admin API (``--url``)."""

    def before(self) -> str | None:
        raise NotImplementedError

    def set(self, percentage: str) -> float:
        raise NotImplementedError

    def checks(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The group's last verdict and last rollback decision."""
        raise NotImplementedError

    def restore(self, before: str | None) -> None:
        raise NotImplementedError


class _RedisOps(_SplitOps):
    def __init__(self, settings: Any, group: str) -> None:
        self.run = lambda action: with_control(settings, action, rollout_writer)
        self.group = group

    def before(self) -> str | None:
        async def go(c: Any) -> str | None:
            return (await c.get_split([self.group]))[self.group]  # type: ignore[no-any-return]

        return self.run(go)  # type: ignore[no-any-return]

    def set(self, percentage: str) -> float:
        return float(self.run(lambda c: c.set_split(percentage, self.group)))

    def checks(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        async def go(c: Any) -> list[dict[str, Any] | None]:
            keys = [records.verdict_key(c.keys, self.group), records.decision_key(c.keys, self.group)]
            return await records.read_many(c.redis, keys)

        verdict, decision = self.run(go)
        return verdict, decision

    def restore(self, before: str | None) -> None:
        self.run(lambda c: _restore(c, self.group, before))


class _AdminOps(_SplitOps):
    def __init__(self, url: str, token: str | None, group: str) -> None:
        from proxy.cliutil.remote import AdminClient

        self.client = AdminClient(url, token)
        self.group = group

    def before(self) -> str | None:
        rows = {row["group"]: row for row in self.client.status().get("groups", [])}  # the status view
        info = rows.get(self.group)
        if info is None:
            fail(f"unknown group {self.group!r}; the proxy serves: {', '.join(rows)}", EXIT_USAGE)
        return None if info["percentage"] is None else f"{info['percentage']:g}"

    def set(self, percentage: str) -> float:
        return float(self.client.set_split(percentage, self.group)["percentage"])

    def checks(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        entry = self.client.canary_status().get("groups", {}).get(self.group) or {}
        return entry.get("verdict"), entry.get("decision")

    def restore(self, before: str | None) -> None:
        self.client.set_split(before or "0", self.group)


def verified_set(
    config: Path | None,
    redis_url: str | None,
    url: str | None,
    token: str | None,
    group: str | None,
    percentage: str,
    duration: str,
) -> None:
    """``strangler set P --verify D``: set P, watch the leader's checks for D, restore on failure.

    Stricter than the automatic rollback on purpose: a person asked to verify, so the first failed
    check restores the previous value (not 0). "verified" needs at least one passing check and no
    failed one; checks that only said "insufficient data", or no check at all, are "not verified"
    (exit 1, the new value stays). Over ``--url`` the previous value restored is the share that
    was in force (the admin API sets, it does not delete a group's key).
    """
    try:
        hold = parse_duration(duration)
    except RolloutError as exc:
        fail(str(exc), EXIT_USAGE)
    ops: _SplitOps
    if url:
        name = group or "default"
        ops = _AdminOps(url, token, name)
    else:
        settings = settings_from(config, redis_url=redis_url)
        name = check_group(settings, group)
        ops = _RedisOps(settings, name)
    before = ops.before()
    value = ops.set(percentage)
    console.print(
        f"v2 share for [bold]{name}[/bold] set to [bold]{value:g}%[/bold] (was {before or 'unset'}); "
        f"verifying for {hold:g}s"
    )
    started = time.time()
    seen_at: Any = None
    statuses: list[str] = []
    while time.time() - started < hold:
        verdict, decision = ops.checks()
        if decision and float(decision.get("at", 0)) > started:
            ops.restore(before)
            why = decision.get("reason", "")
            fail(f"the canary rolled {name} back ({why}); restored to {before or 'unset'}")
        if verdict and float(verdict.get("at", 0)) > started and verdict.get("at") != seen_at:
            seen_at = verdict.get("at")
            statuses.append(str(verdict.get("status")))
            console.print(f"  {check_line(verdict)}", markup=False)
            if verdict.get("status") == "fail":
                ops.restore(before)
                fail(f"checks failed ({verdict.get('reason', '')}); {name} restored to {before or 'unset'}")
        time.sleep(0.25)
    if "pass" in statuses:
        console.print(f"[green]verified[/green]: {name} stays at {value:g}% ({len(statuses)} checks)")
        return
    stays = f"{name} stays at {value:g}%"
    if statuses and set(statuses) == {"insufficient_data"}:
        fail(f"not verified: insufficient data ({len(statuses)} checks, too few requests); {stays}")
    if statuses:
        fail(f"not verified: checks said {', '.join(sorted(set(statuses)))}; {stays}")
    fail(f"not verified: no check ran in {hold:g}s (is a proxy running, canary on?); {stays}")


async def _restore(control: Any, group: str, before: str | None) -> None:
    if before is None:
        await control.clear_split(group)
    else:
        await control.set_split(before, group)
