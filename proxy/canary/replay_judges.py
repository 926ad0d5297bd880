"""The backtest's judges beyond the built-in thresholds: metric gates (and, once merged, the
statistical judge).

They are ``backtest.Judge`` steps (pure, state in the closure, reset by a fresh history) so the
replay applies them as the leader does after ``assess``. The one I/O, re-asking Prometheus about
each stored check's time (``time=``), is ``gate_answers``: done before the replay, bounded, every
failure an inconclusive answer. An HTTP gate has no past: its answer is the one the leader
recorded at that check (same gate name), or inconclusive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from proxy.canary.analysis import Verdict
from proxy.canary.backtest import Candidate, Judge, Judging
from proxy.canary.gates import decide
from proxy.canary.gates.result import GateResult
from proxy.canary.history import Check
from proxy.settings import HttpGate, PrometheusGate

GateKey = tuple[str, float, str]  # group, the check's time, gate name
MAX_QUERIES = 20_000
CONCURRENCY = 8


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
