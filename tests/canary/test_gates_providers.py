"""Providers and the runner against real HTTP servers on 127.0.0.1: good answers pass or fail on
the condition; hostile ones (HTML, a body claiming 5 GB, an endless body, NaN, strings, nested
arrays, a slow answer, a redirect, 5xx, nothing listening) are inconclusive with a one-line
reason that never carries the URL's credentials or a header's secret."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from proxy.canary.gates.providers import evaluate
from proxy.canary.gates.runner import GateRunner
from proxy.metrics import Metrics
from proxy.settings import HttpGate, PrometheusGate, Settings
from tests.canary.gate_servers import Answer, AnswerServer
from tests.support import free_port

SECRET = "s3cr3t-token-value"


@pytest.fixture()
def server() -> Iterator[AnswerServer]:
    with AnswerServer() as running:
        yield running


def http_gate(url: str, **extra: Any) -> HttpGate:
    gate = {"kind": "http", "name": "kpi", "url": url, "json_path": "$.data.ratio",
            "condition": "result >= 0.95", "headers": {"Authorization": f"Bearer {SECRET}"},
            **extra}  # fmt: skip
    found = Settings(canary={"gates": {"default": [gate]}}).canary.gates["default"][0]
    assert isinstance(found, HttpGate)
    return found


def prom_gate(address: str, **extra: Any) -> PrometheusGate:
    gate = {"kind": "prometheus", "name": "prom", "address": address, "condition": "result < 0.05",
            "query": 'sum(rate(errors{group="{{group}}",version="{{version}}"}[{{window}}]))',
            **extra}  # fmt: skip
    found = Settings(canary={"gates": {"default": [gate]}}).canary.gates["default"][0]
    assert isinstance(found, PrometheusGate)
    return found


def run(gate: HttpGate | PrometheusGate, timeout: float = 2.0) -> Any:
    async def go() -> Any:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
            return await evaluate(client, gate, "default", 60, timeout)

    return asyncio.run(go())


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_http_gate_passes_and_fails_on_its_condition_and_sends_its_headers(server: AnswerServer) -> None:
    server.answer = Answer(body=body({"data": {"ratio": 0.99}}))
    gate = http_gate(server.url + "/kpi/{{group}}?v={{version}}&w={{window}}")
    result = run(gate)
    assert (result.status, result.value) == ("pass", 0.99)
    path, headers = server.seen[-1]
    assert path == "/kpi/default?v=v2&w=60s"
    assert headers["Authorization"] == f"Bearer {SECRET}" and headers["Accept-Encoding"] == "identity"
    server.answer = Answer(body=body({"data": {"ratio": 0.5}}))
    result = run(gate)
    assert (result.status, result.value) == ("fail", 0.5) and "0.5 fails 'result >= 0.95'" in result.reason


def test_prometheus_gate_queries_the_instant_api_with_the_filled_template(server: AnswerServer) -> None:
    server.answer = Answer(body=body({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {}, "value": [1, "0.01"]}]}}))  # fmt: skip
    result = run(prom_gate(server.url + "/prom/"))
    assert result.status == "pass"
    path, _ = server.seen[-1]
    query = httpx.URL(path).params
    assert httpx.URL(path).path == "/prom/api/v1/query"
    assert query["query"] == 'sum(rate(errors{group="default",version="v2"}[60s]))'
    assert float(query["time"]) > 1_600_000_000


HTML = {"Content-Type": "text/html"}
ELSEWHERE = {"Location": "http://127.0.0.1:1/elsewhere"}
HOSTILE: list[tuple[str, Answer, str]] = [
    (
        "html",
        Answer(body=b"<html><body>login</body></html>", headers={"Content-Type": "text/html"}),
        "not JSON",
    ),
    ("claims 5 GB", Answer(body=b"{", claimed_length=5_000_000_000), "too large"),
    ("endless", Answer(endless=True), "too large"),
    ("NaN", Answer(body=b'{"data": {"ratio": NaN}}'), "not a finite number"),
    ("string", Answer(body=body({"data": {"ratio": "great"}})), "not a number"),
    ("nested arrays", Answer(body=body({"data": {"ratio": [[0.99]]}})), "list, not a number"),
    ("deep nesting", Answer(body=b"[" * 100_000), "not JSON"),
    ("missing key", Answer(body=body({"data": {}})), "finds nothing"),
    ("huge integer", Answer(body=b'{"data": {"ratio": 1' + b"0" * 5000 + b"}}"), "not JSON"),
    ("5xx", Answer(status=503, body=b"{}"), "HTTP 503"),
    (
        "redirect",
        Answer(status=302, body=b"", headers={"Location": "http://127.0.0.1:1/elsewhere"}),
        "not followed",
    ),
    (
        "gzip despite identity",
        Answer(body=b"\x1f\x8b\x08\x00", headers={"Content-Encoding": "gzip"}),
        "not JSON",
    ),
]


@pytest.mark.parametrize(("answer", "says"), [(a, s) for _, a, s in HOSTILE], ids=[n for n, _, _ in HOSTILE])
def test_hostile_answers_are_inconclusive_with_one_line(
    server: AnswerServer, answer: Answer, says: str
) -> None:
    server.answer = answer
    result = run(http_gate(f"http://user:{SECRET}@127.0.0.1:{server.url.rsplit(':', 1)[1]}/kpi"))
    assert result.status == "inconclusive" and result.value is None
    assert says in result.reason and "\n" not in result.reason and len(result.reason) < 120
    assert SECRET not in result.reason and "127.0.0.1" not in result.reason


def test_a_slow_answer_times_out_and_nothing_listening_is_unreachable(server: AnswerServer) -> None:
    server.answer = Answer(body=body({"data": {"ratio": 1}}), delay=3)
    result = run(http_gate(server.url + "/kpi"), timeout=0.3)
    assert (result.status, result.reason) == ("inconclusive", "no answer within 0.3s")
    result = run(prom_gate(f"http://user:{SECRET}@127.0.0.1:{free_port()}"))
    assert result.status == "inconclusive" and result.reason.startswith("unreachable (")
    assert SECRET not in result.reason


def test_runner_evaluates_every_gate_keeps_streaks_and_counts_metrics(server: AnswerServer) -> None:
    """Two gates of the group ("*"), each evaluated at each check; streaks carried from the
    previous records; results counted per gate and result, with no URL or secret in /metrics."""
    server.answer = Answer(body=body({"data": {"ratio": 0.5}}))
    gates = [
        {"kind": "http", "name": n, "url": server.url + "/k", "json_path": "$.data.ratio",
         "condition": "result > 0.9", "failure_limit": 2}
        for n in ("a", "b")
    ]  # fmt: skip
    settings = Settings(canary={"check_interval_seconds": 4, "gates": {"*": gates}})
    metrics = Metrics()
    runner = GateRunner(settings.canary, metrics)

    async def go() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        try:
            first = await runner.evaluate("default", None, 10.0)
            second = await runner.evaluate("default", first, 20.0)
            return first, second
        finally:
            await runner.close()

    first, second = asyncio.run(go())
    assert [r["consecutive_failures"] for r in first] == [1, 1]
    assert [r["consecutive_failures"] for r in second] == [2, 2]
    assert len(server.seen) == 4
    text = metrics.render().decode()
    assert 'strangler_canary_gate_checks_total{gate="a",group="default",result="fail"} 2.0' in text
    assert 'strangler_canary_gate_value{gate="b",group="default"} 0.5' in text
    assert SECRET not in text and server.url not in text


def test_a_gate_with_an_interval_keeps_its_record_until_due(server: AnswerServer) -> None:
    server.answer = Answer(body=body({"data": {"ratio": 1}}))
    gate = {"kind": "http", "name": "slow", "url": server.url + "/k", "json_path": "$.data.ratio",
            "condition": "result > 0.9", "interval_seconds": 30}  # fmt: skip
    runner = GateRunner(Settings(canary={"gates": {"default": [gate]}}).canary, Metrics())

    async def go() -> list[float]:
        try:
            record = await runner.evaluate("default", None, 100.0)
            kept = await runner.evaluate("default", record, 110.0)
            due = await runner.evaluate("default", kept, 131.0)
            return [r[0]["checked_at"] for r in (record, kept, due)]
        finally:
            await runner.close()

    assert asyncio.run(go()) == [100.0, 100.0, 131.0]
    assert len(server.seen) == 2


GARBAGE: list[Any] = [
    "abc", 7, None, {"name": "k"}, [1, "x", None],
    [{"name": "k", "consecutive_failures": "lots", "checked_at": "soon", "status": "pass", "reason": "r"}],
    [{"name": "k", "consecutive_failures": -5, "checked_at": float("inf"), "status": "pass", "reason": "r",
      "value": None}],
    [{"name": "k", "consecutive_failures": 10**12, "checked_at": 99.0, "status": "weird", "reason": 3}],
    [{"name": ["k"]}],
]  # fmt: skip


@pytest.mark.parametrize("previous", GARBAGE)
def test_garbage_gate_records_in_redis_are_evaluated_afresh(server: AnswerServer, previous: Any) -> None:
    """The verdict record comes back from Redis: whatever is there, the gate is evaluated again and
    its streak starts from 0 (never a crash, never a kept result that was not ours)."""
    server.answer = Answer(body=body({"data": {"ratio": 0.5}}))
    gate = {"kind": "http", "name": "k", "url": server.url + "/k", "json_path": "$.data.ratio",
            "condition": "result > 0.9", "interval_seconds": 1000, "failure_limit": 3}  # fmt: skip
    runner = GateRunner(Settings(canary={"gates": {"default": [gate]}}).canary, Metrics())

    async def go() -> list[dict[str, Any]]:
        try:
            return await runner.evaluate("default", previous, 100.0)
        finally:
            await runner.close()

    (record,) = asyncio.run(go())
    assert (record["status"], record["consecutive_failures"], record["checked_at"]) == ("fail", 1, 100.0)
    assert len(server.seen) == 1


def test_every_groups_gates_are_evaluated_at_once(server: AnswerServer) -> None:
    """The store answers only once three requests wait together (else 503 after 5 s): three
    groups' gates, evaluated one after the other, could never pass; at once, all pass. So a slow
    store costs a check one timeout, not one per group."""
    import threading

    server.answer = Answer(body=body({"data": {"ratio": 1}}), barrier=threading.Barrier(3, timeout=5))
    gate = {"kind": "http", "name": "k", "url": server.url + "/k/{{group}}", "json_path": "$.data.ratio",
            "condition": "result > 0.9", "timeout_seconds": 10}  # fmt: skip
    routes = [{"name": n, "patterns": [f"/{n}/**"]} for n in ("a", "b")]
    settings = Settings(routes=routes, canary={"check_interval_seconds": 20, "gates": {"*": [gate]}})
    runner = GateRunner(settings.canary, Metrics())

    async def go() -> dict[str, list[dict[str, Any]]]:
        try:
            return await runner.evaluate_all({g: {} for g in settings.group_names}, 1.0)
        finally:
            await runner.close()

    found = asyncio.run(go())
    assert {group: [r["status"] for r in records] for group, records in found.items()} == {
        "default": ["pass"], "a": ["pass"], "b": ["pass"],
    }  # fmt: skip
    assert sorted(path for path, _ in server.seen) == ["/k/a", "/k/b", "/k/default"]
