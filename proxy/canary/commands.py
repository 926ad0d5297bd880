"""``strangler rollout ...`` and the helpers ``strangler set --verify`` and ``strangler status`` use.

Thin like the rest of the CLI: it talks to Redis through the same ``Rollouts`` object the leader
uses, so a transition made here is the same transaction (state + split + log + alert outbox).
``proxy.cli`` is imported inside the commands, not at import time, because ``proxy.cli`` imports
this module while it is itself being loaded (and again as ``__main__`` under ``python -m``).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from proxy.canary import records
from proxy.canary.rollout import COMPLETED, ROLLED_BACK, RolloutError, Rollouts, parse_duration, parse_steps

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file.")]
RedisOpt = Annotated[str | None, typer.Option("--redis-url", help="Redis URL (default: the embedded one).")]
GroupOpt = Annotated[
    str | None, typer.Option("--group", "-g", help="Route group (default: the global split).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]

rollout_app = typer.Typer(no_args_is_help=True, help="Progressive rollout: step v2 up while the checks pass.")


def register(app: typer.Typer) -> None:
    app.add_typer(rollout_app, name="rollout")


def who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "?"
    return f"cli {user}@{socket.gethostname()}"


def _transition(config: Path | None, redis_url: str | None, group: str | None, action: Any) -> dict[str, Any]:
    """Run one Rollouts call; a refused transition is exit code 2 with the reason."""
    from proxy import cli

    settings = cli.settings_from(config, redis_url=redis_url)
    name = cli.check_group(settings, group)

    async def go(control: Any) -> dict[str, Any]:
        state = await action(Rollouts(control.redis, control.keys), name, settings)
        return dict(state.as_dict())

    try:
        return cli.with_control(settings, go)
    except RolloutError as exc:
        cli.fail(str(exc), 2)
        raise


def _print_state(state: dict[str, Any], as_json: bool) -> None:
    from proxy import cli

    if as_json:
        print(json.dumps(state, default=str))
        return
    steps = ", ".join(f"{s:g}" for s in state["steps"])
    cli.console.print(
        f"rollout [bold]{state['group']}[/bold]: {state['state']} at [bold]{state['percentage']:g}%[/bold] "
        f"(step {state['index'] + 1}/{len(state['steps'])}: {steps}; hold {state['interval_seconds']:g}s)"
    )


@rollout_app.command("start")
def start(
    group: GroupOpt = None,
    steps: Annotated[str | None, typer.Option(help="Ladder, e.g. 1,5,10,25,50,75,90,95,100.")] = None,
    interval: Annotated[str | None, typer.Option(help="Hold per step, e.g. 30s, 5m.")] = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start at the first step; the leader advances while the checks pass."""

    async def action(r: Rollouts, name: str, settings: Any) -> Any:
        ladder = parse_steps(steps) if steps else list(settings.canary.steps)
        hold = parse_duration(interval) if interval else settings.canary.step_interval_seconds
        return await r.start(name, ladder, hold, who())

    _print_state(_transition(config, redis_url, group, action), as_json)


@rollout_app.command("pause")
def pause(
    group: GroupOpt = None, config: ConfigOpt = None, redis_url: RedisOpt = None, as_json: JsonOpt = False
) -> None:
    """Hold at the current step (checks and automatic rollback keep running)."""
    _print_state(_transition(config, redis_url, group, lambda r, n, s: r.pause(n, who())), as_json)


@rollout_app.command("resume")
def resume(
    group: GroupOpt = None, config: ConfigOpt = None, redis_url: RedisOpt = None, as_json: JsonOpt = False
) -> None:
    """Carry on; the current step is held for a full interval again."""
    _print_state(_transition(config, redis_url, group, lambda r, n, s: r.resume(n, who())), as_json)


@rollout_app.command("abort")
def abort(
    group: GroupOpt = None, config: ConfigOpt = None, redis_url: RedisOpt = None, as_json: JsonOpt = False
) -> None:
    """Roll back to 0% now and stop the rollout."""
    _print_state(_transition(config, redis_url, group, lambda r, n, s: r.abort(n, who())), as_json)


@rollout_app.command("promote")
def promote(
    group: GroupOpt = None,
    full: Annotated[bool, typer.Option("--full", help="Straight to 100%.")] = False,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Go to the next step now (``--full``: to 100%), without waiting for the hold."""
    _print_state(
        _transition(config, redis_url, group, lambda r, n, s: r.promote(n, who(), full=full)), as_json
    )


@rollout_app.command("status")
def status(
    group: GroupOpt = None, config: ConfigOpt = None, redis_url: RedisOpt = None, as_json: JsonOpt = False
) -> None:
    """The rollout, the last check and the last decision for a group."""
    from proxy import cli

    settings = cli.settings_from(config, redis_url=redis_url)
    name = cli.check_group(settings, group)
    data = cli.with_control(settings, lambda c: records.read_status(c.redis, c.keys, [name]))
    entry = data["groups"][name]
    if as_json:
        print(json.dumps({"group": name, "leader": data["leader"], **entry}, default=str))
        return
    summary = summarize(entry)
    cli.console.print(f"group [bold]{name}[/bold] (leader: {data['leader'] or 'none'})")
    for label in ("rollout", "verdict", "decision"):
        cli.console.print(f"  {label}: {summary[label]}")


@rollout_app.command("watch")
def watch(
    group: GroupOpt = None,
    timeout: Annotated[str | None, typer.Option(help="Give up after this long (e.g. 10m).")] = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Follow a rollout live with a progress bar until it completes or is rolled back."""
    from rich.progress import BarColumn, Progress, TextColumn

    from proxy import cli

    settings = cli.settings_from(config, redis_url=redis_url)
    name = cli.check_group(settings, group)
    limit = parse_duration(timeout) if timeout else None

    async def follow(control: Any) -> str:
        started = time.monotonic()
        with Progress(
            TextColumn("[bold]{task.fields[group]}"),
            BarColumn(),
            TextColumn("{task.completed:>5.1f}%"),
            TextColumn("{task.fields[detail]}"),
            console=cli.console,
        ) as bar:
            task = bar.add_task("rollout", total=100, group=name, detail="")
            while True:
                data = await records.read_status(control.redis, control.keys, [name])
                entry = data["groups"][name]
                rollout = entry["rollout"]
                if rollout is None:
                    return "no rollout"
                summary = summarize(entry)
                bar.update(
                    task, completed=rollout["percentage"], detail=f"{rollout['state']} | {summary['verdict']}"
                )
                if rollout["state"] in (COMPLETED, ROLLED_BACK):
                    return str(rollout["state"])
                if limit is not None and time.monotonic() - started > limit:
                    return "timeout"
                await asyncio.sleep(0.5)

    outcome = cli.with_control(settings, follow)
    cli.console.print(f"rollout of {name}: {outcome}")
    if outcome == ROLLED_BACK:
        raise typer.Exit(1)


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
    data = await records.read_status(control.redis, control.keys, groups)
    return {group: summarize(entry) for group, entry in data["groups"].items()}


def verified_set(settings: Any, group: str, percentage: str, duration: str) -> None:
    """``strangler set P --verify D``: set P, watch the leader's checks for D, restore on failure.

    Stricter than the automatic rollback on purpose: a person asked to verify, so the first failed
    check restores the previous value (not 0). Needs a running proxy (the leader writes verdicts).
    """
    from proxy import cli
    from proxy.control.client import InvalidValue

    try:
        hold = parse_duration(duration)
    except RolloutError as exc:
        cli.fail(str(exc), 2)
        return

    async def go(control: Any) -> tuple[str, Any, float, dict[str, Any] | None]:
        before = (await control.get_split([group]))[group]
        value = await control.set_split(percentage, group)
        cli.console.print(
            f"v2 share for [bold]{group}[/bold] set to [bold]{value:g}%[/bold] (was {before or 'unset'}); "
            f"verifying for {hold:g}s"
        )
        started = time.time()
        seen_at = None
        while time.time() - started < hold:
            verdict, decision = await records.read_many(
                control.redis,
                [records.verdict_key(control.keys, group), records.decision_key(control.keys, group)],
            )
            if decision and float(decision.get("at", 0)) > started:
                await _restore(control, group, before)
                return "rolled_back", before, value, decision
            if verdict and float(verdict.get("at", 0)) > started and verdict.get("at") != seen_at:
                seen_at = verdict.get("at")
                cli.console.print(f"  check: {summarize({'verdict': verdict})['verdict']}")
                if verdict.get("status") == "fail":
                    await _restore(control, group, before)
                    return "failed", before, value, verdict
            await asyncio.sleep(0.25)
        return "ok" if seen_at is not None else "unchecked", before, value, None

    try:
        outcome, before, value, why = cli.with_control(settings, go)
    except InvalidValue as exc:
        cli.fail(str(exc), 2)
        return
    if outcome == "ok":
        cli.console.print(f"[green]verified[/green]: {group} stays at {value:g}%")
    elif outcome == "unchecked":
        cli.console.print(
            f"[yellow]no check ran in {hold:g}s[/yellow] (is a proxy running?); {group} stays at {value:g}%"
        )
    else:
        reason = (why or {}).get("reason", "")
        cli.fail(f"checks failed ({reason}); {group} restored to {before or 'unset'}")


async def _restore(control: Any, group: str, before: str | None) -> None:
    if before is None:
        await control.clear_split(group)
    else:
        await control.set_split(before, group)
