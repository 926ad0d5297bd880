"""The leader with metric gates, driven by ``tick()`` with an injected clock against real Redis and
a real HTTP metrics server: a gate at its failure limit rolls back through the same transaction as
the built-in checks; a failing (below its limit) or inconclusive gate holds (no advance, no
rollback); a dry-run gate is shown and alerted once per failing streak, never acted on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from proxy.canary import records
from proxy.canary.rollout import COMPLETED, PROGRESSING, ROLLED_BACK
from tests.canary.gate_servers import Answer, AnswerServer
from tests.canary.helpers import cli
from tests.canary.test_loop import Rig, run
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def kpi() -> Iterator[AnswerServer]:
    with AnswerServer() as server:
        server.answer = ratio(0.99)
        yield server


def ratio(value: float) -> Answer:
    return Answer(body=json.dumps({"checkout": {"success_ratio": value}}).encode())


def gate(url: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "http", "name": "checkout", "url": url + "/kpi?group={{group}}",
            "json_path": "$.checkout.success_ratio", "condition": "result >= 0.95", **extra}  # fmt: skip


def leader_moves(history: list[dict[str, Any]]) -> list[str]:
    return [h["action"] for h in history if str(h.get("by", "")).startswith("leader")]


def check_schema(verdict: dict[str, Any]) -> None:
    """The verdict record (gates included) is what docs/schemas/rollout-status.json promises."""
    schema = json.loads((ROOT / "docs/schemas/rollout-status.json").read_text())
    jsonschema.validate(verdict, {**schema["properties"]["verdict"], "$defs": schema.get("$defs", {})})


def test_a_gate_failing_to_its_limit_rolls_back_through_the_same_path(
    redis_url: str, kpi: AnswerServer
) -> None:
    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", [10, 100], 3600, "test")
        await rig.second()
        await rig.second()
        verdict = await rig.verdict()
        assert verdict["status"] == "pass"
        assert verdict["gates"][0] | {"checked_at": 0} == {
            "name": "checkout", "kind": "http", "status": "pass", "value": 0.99, "dry_run": False,
            "reason": "0.99 meets 'result >= 0.95'", "consecutive_failures": 0, "failure_limit": 2,
            "checked_at": 0,
        }  # fmt: skip
        check_schema(verdict)
        kpi.answer = ratio(0.5)  # the business metric goes bad; v2's own traffic stays healthy
        await rig.second()
        verdict = await rig.verdict()
        assert verdict["status"] == "fail" and not verdict["rollback"] and await rig.split() == "10"
        assert verdict["failed_check"] == "gate:checkout" and "(1/2)" in verdict["reason"]
        await rig.second()
        assert await rig.split() == "0"
        state = await rig.rollouts.get("default")
        assert state is not None and state.state == ROLLED_BACK
        decision = json.loads(await rig.redis.get(records.decision_key(rig.keys, "default")))
        assert decision["failed_check"] == "gate:checkout" and decision["from_percentage"] == 10
        assert decision["reason"] == "gate checkout: 0.5 fails 'result >= 0.95'"
        assert decision["thresholds"]["gate"] == "checkout" and decision["thresholds"]["gate_value"] == 0.5
        assert rig.metrics.rollbacks.labels("default", "gate:checkout")._value.get() == 1
        assert rig.notifier.kinds()[-1] == "rolled_back"
        verdict = await rig.verdict()
        assert verdict["action"] == "rolled_back" and verdict["gates"][0]["consecutive_failures"] == 0
        check_schema(verdict)
        for _ in range(3):  # still bad, but v2 is at 0%: nothing more to do
            await rig.second(v2=0)
        assert rig.notifier.kinds().count("rolled_back") == 1

    run(redis_url, body, gates={"default": [gate(kpi.url, failure_limit=2)]})


@pytest.mark.parametrize("trouble", ["unreachable", "empty", "http 500", "html"])
def test_an_inconclusive_gate_never_advances_and_never_rolls_back(
    redis_url: str, kpi: AnswerServer, trouble: str
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    gates = {
        "unreachable": [{"kind": "prometheus", "name": "errors", "address": down, "query": "up",
                         "condition": "result < 0.05"}],
        "empty": [{"kind": "prometheus", "name": "errors", "address": kpi.url, "query": "up",
                   "condition": "result < 0.05"}],
        "http 500": [gate(kpi.url)],
        "html": [gate(kpi.url)],
    }[trouble]  # fmt: skip
    kpi.answer = {
        "unreachable": ratio(1),
        "empty": Answer(body=b'{"status":"success","data":{"resultType":"vector","result":[]}}'),
        "http 500": Answer(status=500, body=b"{}"),
        "html": Answer(body=b"<html>sign in</html>", headers={"Content-Type": "text/html"}),
    }[trouble]

    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", [50, 100], 2, "test")
        for _ in range(30):  # fifteen holds' worth of healthy v2 traffic
            await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None and (state.state, state.percentage) == (PROGRESSING, 50)
        assert await rig.split() == "50"
        assert leader_moves(await rig.rollouts.history("default", 50)) == []
        verdict = await rig.verdict()
        assert verdict["status"] == "error" and not verdict["rollback"]
        assert verdict["gates"][0]["status"] == "inconclusive" and "holding" in verdict["reason"]
        assert verdict["gates"][0]["consecutive_failures"] == 0
        check_schema(verdict)
        assert "rolled_back" not in rig.notifier.kinds()
        counted = rig.metrics.gate_checks.labels("default", gates[0]["name"], "inconclusive")
        assert counted._value.get() >= 30
        # the store answers again with a good value: the hold ends and the rollout completes
        kpi.answer = (
            Answer(body=b'{"status":"success","data":{"resultType":"scalar","result":[1,"0.01"]}}')
            if gates[0]["kind"] == "prometheus"
            else ratio(0.99)
        )
        if trouble == "unreachable":
            return  # nothing listens there; the other cases show the recovery
        for _ in range(10):
            await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None and state.state == COMPLETED

    run(redis_url, body, gates={"default": gates})


def test_a_dry_run_gate_is_shown_and_alerted_once_and_never_acted_on(
    redis_url: str, kpi: AnswerServer
) -> None:
    kpi.answer = ratio(0.5)

    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", [50, 100], 3, "test")
        for _ in range(4):
            await rig.second()
        verdict = await rig.verdict()
        assert verdict["status"] == "pass"
        shown = verdict["gates"][0]
        assert (shown["status"], shown["dry_run"], shown["value"]) == ("fail", True, 0.5)
        assert shown["consecutive_failures"] >= 2
        for _ in range(10):
            await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None and state.state == COMPLETED  # it never held the rollout either
        assert await rig.split() == "100"
        assert rig.notifier.kinds().count("gate_dry_run_failed") == 1
        alert = next(e for e in rig.notifier.events if e.kind == "gate_dry_run_failed")
        assert alert.severity == "warning" and alert.fields["gate"] == "checkout"
        assert "not acted on" in alert.message and kpi.url not in alert.message
        assert "rolled_back" not in rig.notifier.kinds()

    run(redis_url, body, gates={"*": [gate(kpi.url, dry_run=True, failure_limit=2)]})

    # shown: a line per gate in `rollout status`, `rollout watch` and `status`; the JSON view's schema
    shown = cli("rollout", "status", "--redis-url", redis_url)
    assert (
        shown.exit_code == 0 and "  gate checkout: fail 0.5 (" in shown.output and "dry-run" in shown.output
    )
    assert kpi.url not in shown.output
    doc = json.loads(cli("rollout", "status", "--json", "--redis-url", redis_url).output)
    schema = json.loads((ROOT / "docs/schemas/rollout-status.json").read_text())
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
    assert doc["verdict"]["gates"][0]["dry_run"] is True
    watched = cli("rollout", "watch", "--redis-url", redis_url)
    assert "gate checkout: fail 0.5" in watched.output and "completed" in watched.output
    status = cli("status", "--redis-url", redis_url)
    assert "default gate checkout: fail 0.5" in status.output
