"""The backtest's judges beyond the built-in thresholds: the statistical judge and metric gates.

They are ``backtest.Judge`` steps (pure, state in the closure, reset by a fresh history) so the
replay applies them as the leader does after ``assess``. The one I/O, re-asking Prometheus about
each stored check's time (``time=``), is ``gate_answers``: done before the replay, bounded, every
failure an inconclusive answer. An HTTP gate has no past: its answer is the one the leader
recorded at that check (same gate name), or inconclusive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from proxy.canary.analysis import History, Status, Verdict
from proxy.canary.backtest import Candidate, Judge, Judging
from proxy.canary.gates import decide
from proxy.canary.gates.result import GateResult
from proxy.canary.history import Check
from proxy.canary.judge import Tally, assess_statistical
from proxy.settings import HttpGate, PrometheusGate

GateKey = tuple[str, float, str]  # group, the check's time, gate name
MAX_QUERIES = 20_000
CONCURRENCY = 8


def statistical() -> Judge:
    """The statistical judge for groups whose candidate thresholds say ``judge: statistical``, fed
    each stored check's increment (the seconds no earlier check counted) with its tally carried
    from check to check, restarted by a fresh history and after a rollback, as the leader does.
    The first check of a judged period is fed the check's whole stored window (the leader feeds
    it the same seconds but the last two, which the next increment counts again: two seconds of
    a period counted twice)."""
    tally: dict[str, Tally | None] = {}

    def judge(j: Judging) -> Verdict:
        if j.thresholds.judge != "statistical":
            return j.verdict
        if j.check.fresh:
            tally[j.group] = None
        kept, inc = tally.get(j.group), j.check.increment
        if inc is None:
            reason = "no increment stored for this check: not judged statistically"
            return replace(j.verdict, status=Status.ERROR, reason=reason, failed_check=None,
                           consecutive_failures=j.streak, rollback=False)  # fmt: skip
        v1, v2 = (inc.v1, inc.v2) if kept is not None else (j.check.v1, j.check.v2)
        verdict, kept = assess_statistical(
            j.check.v1, j.check.v2, v1, v2, j.thresholds, History(j.streak), kept,
            now=j.check.at, until=inc.until, failures_to_act=j.failures_to_act,
        )  # fmt: skip
        tally[j.group] = None if verdict.rollback else kept  # a new judged period after acting
        return verdict

    return judge


def _recorded(check: Check, gate: PrometheusGate | HttpGate) -> GateResult:
    for record in check.extras.get("gates") or []:
        if isinstance(record, dict) and record.get("name") == gate.name and decide.well_formed(record):
            return GateResult(record["status"], record["value"], f"{record['reason']} (as recorded)")
    return GateResult("inconclusive", None, "an http gate cannot be asked about the past; none recorded")


def gates(candidate: Candidate, answers: Mapping[GateKey, GateResult]) -> Judge:
    """The candidate's gates (``Candidate.gates_for``) at each stored check: Prometheus answers from
    ``answers``, HTTP gates as recorded; streaks and failure limits as ``decide`` keeps them."""
    before: dict[str, dict[str, dict[str, Any]]] = {}

    def judge(j: Judging) -> Verdict:
        wanted = candidate.gates_for(j.group)
        if not wanted:
            return j.verdict
        previous = before.setdefault(j.group, {})
        if j.check.fresh:
            previous.clear()
        records = []
        for gate in wanted:
            if isinstance(gate, PrometheusGate):
                result = answers.get((j.group, j.check.at, gate.name)) or GateResult(
                    "inconclusive", None, "not asked (too many queries)"
                )
            else:
                result = _recorded(j.check, gate)
            records.append(decide.gate_record(gate, result, previous.get(gate.name), j.check.at))
        verdict = decide.combine(j.verdict, records)
        if verdict.rollback:
            for record in records:
                record["consecutive_failures"] = 0
        previous.update({r["name"]: r for r in records})
        return verdict

    return judge


async def gate_answers(
    candidate: Candidate, checks: Mapping[str, Sequence[Check]]
) -> dict[GateKey, GateResult]:
    """Ask each Prometheus gate about each stored check's time (at most ``MAX_QUERIES``, eight at
    a time); anything that goes wrong is an inconclusive answer, never an exception."""
    import httpx

    from proxy.canary.gates import providers

    plan = [
        (group, check, gate)
        for group, stored in checks.items()
        for gate in candidate.gates_for(group)
        if isinstance(gate, PrometheusGate)
        for check in stored
    ][:MAX_QUERIES]
    out: dict[GateKey, GateResult] = {}
    if not plan:
        return out
    gate_limit = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:

        async def ask(group: str, check: Check, gate: PrometheusGate) -> None:
            async with gate_limit:
                try:
                    result = await providers.evaluate(
                        client, gate, group, candidate.window_seconds, gate.timeout_seconds, wall=check.at
                    )
                except Exception as exc:  # noqa: BLE001 - one bad answer must not stop the replay
                    result = GateResult("inconclusive", None, f"evaluation failed ({type(exc).__name__})")
            out[(group, check.at, gate.name)] = result

        await asyncio.gather(*(ask(g, c, gate) for g, c, gate in plan))  # type: ignore[arg-type]
    return out
