"""Pure: a gate's new record from its result and its previous record, and the verdict the leader
acts on from the built-in verdict and the gate records.

- A failure adds one to the gate's streak, a pass resets it, an inconclusive result leaves it as
  it was (a metrics store that blinks between two bad answers does not reset the count).
- A non-dry-run gate whose streak reaches ``failure_limit`` rolls back (``failed_check`` =
  ``gate:<name>``), whatever the built-in checks say (unless they roll back themselves).
- Otherwise, when the built-in checks pass, a non-dry-run gate that fails below its limit makes
  the verdict FAIL without rollback, and an inconclusive one makes it ERROR: both hold (no judged
  time, no advance, no rollback). Dry-run gates never change the verdict.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from proxy.canary.analysis import Status, Verdict
from proxy.canary.gates.result import GateResult
from proxy.settings import HttpGate, PrometheusGate


def gate_record(
    gate: PrometheusGate | HttpGate, result: GateResult, previous: dict[str, Any] | None, now: float
) -> dict[str, Any]:
    """What status shows for the gate and what the next check carries on from."""
    streak = _count((previous or {}).get("consecutive_failures"))
    if result.status == "fail":
        streak += 1
    elif result.status == "pass":
        streak = 0
    return {
        "name": gate.name,
        "kind": gate.kind,
        "status": result.status,
        "value": result.value,
        "reason": result.reason,
        "dry_run": gate.dry_run,
        "consecutive_failures": streak,
        "failure_limit": gate.failure_limit,
        "checked_at": now,
    }


def _count(raw: Any) -> int:
    """A streak read back from Redis: a non-negative int, anything else counts as 0."""
    return raw if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < 1_000_000 else 0


def well_formed(record: Any) -> bool:
    """A gate record read back from Redis that can stand for this check (kept by
    ``interval_seconds``): anything else is evaluated afresh."""
    if not isinstance(record, dict):
        return False
    at, value = record.get("checked_at"), record.get("value")
    return (
        record.get("status") in ("pass", "fail", "inconclusive")
        and isinstance(record.get("reason"), str)
        and isinstance(at, int | float) and not isinstance(at, bool) and math.isfinite(at)
        and (value is None or isinstance(value, int | float) and not isinstance(value, bool))
        and _count(record.get("consecutive_failures")) == record.get("consecutive_failures")
    )  # fmt: skip


def tripped(record: dict[str, Any]) -> bool:
    """Failed ``failure_limit`` times in a row (acted on unless dry-run)."""
    return record["status"] == "fail" and record["consecutive_failures"] >= record["failure_limit"]


def combine(verdict: Verdict, records: list[dict[str, Any]]) -> Verdict:
    if verdict.rollback:
        return verdict
    acting = [r for r in records if not r["dry_run"]]
    for record in acting:
        if tripped(record):
            return dataclasses.replace(
                verdict,
                status=Status.FAIL,
                reason=f"gate {record['name']}: {record['reason']}",
                failed_check=f"gate:{record['name']}",
                limits={**verdict.limits, "gate": record["name"], "gate_value": record["value"]},
                rollback=True,
            )
    if verdict.status is not Status.PASS:
        return verdict
    for record in acting:
        if record["status"] == "fail":
            count = f"{record['consecutive_failures']}/{record['failure_limit']}"
            return dataclasses.replace(
                verdict, status=Status.FAIL, failed_check=f"gate:{record['name']}",
                reason=f"gate {record['name']} failed ({count}): {record['reason']}",
            )  # fmt: skip
    for record in acting:
        if record["status"] == "inconclusive":
            return dataclasses.replace(
                verdict, status=Status.ERROR,
                reason=f"gate {record['name']} inconclusive, holding: {record['reason']}",
            )  # fmt: skip
    return verdict


def dry_run_alerts(records: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """Dry-run gates that reached their limit at this check (evaluated ``now``, not a record kept
    from an earlier check): alerted once per failing streak, since the streak equals the limit
    exactly once however long it lasts."""
    return [
        r for r in records
        if r["dry_run"] and r["status"] == "fail" and r["checked_at"] == now
        and r["consecutive_failures"] == r["failure_limit"]
    ]  # fmt: skip
