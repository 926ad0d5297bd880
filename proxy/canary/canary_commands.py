"""``strangler canary ...``: tools over the canary's stored evidence (``backtest``).

Thin: reads the stored checks (``history.read``), replays them (``backtest.replay``, pure) and
prints. ``proxy/cli.py`` adds ``canary_app`` to the root lazily (``LAZY_COMMANDS``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from proxy.canary import backtest, history
from proxy.canary.rollout import RolloutError, parse_duration
from proxy.cliutil import (
    EXIT_USAGE,
    AllGroupsOpt,
    ConfigOpt,
    JsonOpt,
    RedisOpt,
    check_group,
    console,
    fail,
    settings_from,
    with_control,
)
from proxy.settings import ConfigError, load_section_file

canary_app = typer.Typer(
    no_args_is_help=True, help="The canary's stored evidence: backtest candidate checks."
)

SinceOpt = Annotated[str, typer.Option("--since", help="How far back: 30m, 1h, 6h (stored checks only).")]
GatesOpt = Annotated[
    Path | None,
    typer.Option(
        "--gates",
        help="YAML: candidate thresholds, group_thresholds, consecutive_failures, gates (default: config).",
    ),
]


def _line(step: backtest.Step) -> str:
    actual = step.actual_action if step.actual_action != backtest.HOLD else "-"
    why = f" ({step.failed_check})" if step.failed_check else ""
    was = f" ({step.actual_failed_check})" if step.actual_failed_check and actual == backtest.ROLLBACK else ""
    return (
        f"  {backtest.clock(step.at)}  split {step.split:g}%  candidate {step.action}{why}"
        f"  actual {actual}{was}"
    )


@canary_app.command("backtest")
def backtest_command(
    since: SinceOpt = "1h",
    gates: GatesOpt = None,
    group: AllGroupsOpt = None,
    config: ConfigOpt = None,
    redis_url: RedisOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replay the stored checks through candidate checks: when each would have held, advanced or
    rolled back, next to what happened."""
    try:
        seconds = parse_duration(since)
    except RolloutError as exc:
        fail(f"--since: {exc}", EXIT_USAGE)
    settings = settings_from(config, redis_url=redis_url)
    given = None
    if gates is not None:
        try:
            given = load_section_file(gates, backtest.CandidateFile, ("canary",))
        except ConfigError as exc:
            fail(f"--gates: {exc}", EXIT_USAGE)
    candidate = backtest.Candidate.of(settings.canary, given)
    groups = [check_group(settings, group)] if group else settings.group_names
    start = time.time() - seconds

    async def read(control: Any) -> dict[str, history.Loaded]:
        return {g: await history.read(control.redis, control.keys, g, start) for g in groups}

    loaded = with_control(settings, read)
    from proxy.canary import replay_judges

    judges: list[backtest.Judge] = [replay_judges.statistical()]  # first: it replaces the verdict
    if any(candidate.gates_for(name) for name in groups):
        import asyncio

        stored = {name: loaded[name].checks for name in groups}
        answers = asyncio.run(replay_judges.gate_answers(candidate, stored))
        judges.append(replay_judges.gates(candidate, answers))
    views = []
    for name in groups:
        result = backtest.replay(name, loaded[name].checks, candidate, judges)
        views.append((result, backtest.view(result, candidate, start, loaded[name].skipped), loaded[name]))
    if as_json:
        from proxy.cliutil import resolve_redis_url
        from proxy.redis_url import describe
        from proxy.viewsource import REDIS, source

        where = source(REDIS, describe(resolve_redis_url(settings)))
        print(json.dumps({"source": where, "since": start, "groups": [v for _, v, _ in views]}))
        return
    for result, _, got in views:
        console.print(
            f"[bold]{result.group}[/bold]: {len(result.steps)} checks since {backtest.clock(start)} UTC"
        )
        if got.skipped:
            console.print(
                f"  {got.skipped} stored records skipped (first: {got.first_problem})", markup=False
            )
        for step in result.steps:
            if step.notable:
                console.print(_line(step), markup=False)
        console.print(backtest.summary(result), markup=False)
