"""Rollback from an alert: Alertmanager's webhook against a real proxy, real Redis, real backends.

A firing alert labelled with a route group puts v2 at 0% (split, rollout, decision, critical
alert) and every request goes to v1 within 2 s; a resolved one changes nothing; a repeated one is a
no-op. Hostile bodies get one clear refusal and change nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from proxy.canary.alertmanager import BadPayload, plan
from tests.canary.helpers import Receiver, Traffic, canary, cli
from tests.support import Backend, ProxyProcess, RedisServer, wait_until

TOKEN = "alert-test-token-0123456789"
SPLIT = "feature:v2_traffic_percentage"
GROUPS = [{"name": "tasks", "patterns": ["/tasks", "/tasks/**"]}]


def alert(status: str = "firing", group: str | None = "default", name: str = "V2ErrorBudgetBurn",
          **labels: Any) -> dict[str, Any]:  # fmt: skip
    all_labels = {"alertname": name, "instance": "10.1.2.3:9100", **labels}
    if group is not None:
        all_labels["strangler_group"] = group
    return {
        "status": status,
        "labels": all_labels,
        "annotations": {"summary": "v2 burns its error budget", "runbook_url": "http://wiki.internal/rb"},
        "startsAt": "2026-12-07T14:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.internal:9090/graph",
        "fingerprint": f"fp-{name}-{group}",
    }


def payload(*alerts: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": "4", "groupKey": "{}:{alertname=\"x\"}", "truncatedAlerts": 0,
        "status": "firing" if any(a["status"] == "firing" for a in alerts) else "resolved",
        "receiver": "strangler", "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://alertmanager.internal:9093", "alerts": list(alerts),
    }  # fmt: skip


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


@pytest.fixture()
def alert_proxy(
    proxy_factory: Callable[..., ProxyProcess],
    v1v2: tuple[Backend, Backend],
    redis_url: str,
    receiver: Receiver,
) -> ProxyProcess:
    v1, v2 = v1v2
    hook = [{"kind": "webhook", "url": receiver.url + "/hook", "min_severity": "critical"}]
    return proxy_factory(
        v1_url=v1.url, v2_url=v2.url, redis_url=redis_url, admin_token=TOKEN, routes=GROUPS, process=True,
        canary=canary(alert_max_body_bytes=1024 * 1024, notifiers=hook),
    )  # fmt: skip


def post(
    proxy: ProxyProcess, body: Any, token: str | None = TOKEN, raw: bytes | None = None
) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(proxy.admin + "/alerts/alertmanager", content=content, headers=headers, timeout=30)


def version(proxy: ProxyProcess, user: int, path: str = "/t") -> str:
    return httpx.get(proxy.url + path, headers={"X-User-ID": f"u{user}"}).headers["x-api-version"]


def served(proxy: ProxyProcess, n: int = 40, path: str = "/t") -> set[str]:
    return {
        httpx.get(proxy.url + path, headers={"X-User-ID": f"u{i}"}).headers["x-api-version"] for i in range(n)
    }


def test_firing_alert_sends_everyone_to_v1_within_2s_resolved_changes_nothing(
    alert_proxy: ProxyProcess, redis_url: str, receiver: Receiver
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    result = cli("rollout", "start", "--steps", "50,100", "--interval", "1h", "--redis-url", redis_url)
    assert result.exit_code == 0, result.output
    wait_until(lambda: served(alert_proxy) == {"v1", "v2"}, timeout=5, message="the proxy serves 50%")
    # resolved: nothing changes
    answer = post(alert_proxy, payload(alert("resolved")))
    assert answer.status_code == 200 and answer.json()["resolved"] == 1 and answer.json()["rolled_back"] == []
    assert (
        r.get(SPLIT) == "50"
        and json.loads(r.get("strangler:rollout:default") or "{}")["state"] == "progressing"
    )
    with Traffic([alert_proxy.url], concurrency=4) as traffic:
        on_v2 = [u for u in range(40) if version(alert_proxy, u) == "v2"][:5]
        assert on_v2
        started = time.monotonic()
        answer = post(alert_proxy, payload(alert(), alert(name="Other"), alert(group="nope")))
        assert answer.status_code == 200, answer.text
        answered = time.monotonic() - started
        body = answer.json()
        assert [b["group"] for b in body["rolled_back"]] == ["default"]
        assert body["rolled_back"][0]["from_percentage"] == 50
        assert body["rolled_back"][0]["alert"] == {
            "name": "V2ErrorBudgetBurn", "fingerprint": "fp-V2ErrorBudgetBurn-default",
            "starts_at": "2026-12-07T14:00:00Z", "alerts": 2,
        }  # fmt: skip
        assert body["unknown_groups"] == {"nope": 1} and body["firing"] == 3
        assert "10.1.2.3" not in answer.text and "internal" not in answer.text  # nothing echoed
        # users who were on v2, asked one at a time: the first time all of them answer v1
        wait_until(lambda: {version(alert_proxy, u) for u in on_v2} == {"v1"}, timeout=2, interval=0.01,
                   message="every request on v1 within 2 s")  # fmt: skip
        elapsed = time.monotonic() - started
        assert served(alert_proxy, 20) == {"v1"}
        seen = traffic.versions["v2"]
        time.sleep(0.5)
        assert traffic.versions["v2"] - seen <= traffic.concurrency
    print(f"alert answered in {answered:.3f}s, every request on v1 {elapsed:.3f}s after it was sent")
    assert r.get(SPLIT) == "0"
    rollout = json.loads(r.get("strangler:rollout:default") or "{}")
    assert rollout["state"] == "rolled_back" and rollout["last"]["by"] == "alertmanager"
    decision = json.loads(r.get("strangler:canary:decision:default") or "{}")
    assert decision["by"] == "alertmanager" and decision["failed_check"] == "alert"
    assert (
        decision["alert"]["fingerprint"] == "fp-V2ErrorBudgetBurn-default"
        and decision["from_percentage"] == 50
    )
    wait_until(lambda: receiver.bodies("/hook"), timeout=10, message="the critical alert delivered")
    rolled = receiver.bodies("/hook")
    assert [e["event"] for e in rolled] == ["rolled_back"] and rolled[0]["severity"] == "critical"
    assert "V2ErrorBudgetBurn" in rolled[0]["message"] and rolled[0]["by"] == "alertmanager"
    assert "10.1.2.3" not in json.dumps(decision) + json.dumps(rolled)
    wait_until(lambda: alert_proxy.metric("strangler_rollbacks_total", group="default", reason="alert") == 1)
    # the same alert again: a no-op, said so
    again = post(alert_proxy, payload(alert()))
    assert again.status_code == 200 and again.json()["already_at_zero"] == ["default"]
    assert again.json()["rolled_back"] == []
    assert json.loads(r.get("strangler:rollout:default") or "{}")["seq"] == rollout["seq"]
    # a person ramps again; a resolved alert does not touch it
    r.set(SPLIT, "30")
    post(alert_proxy, payload(alert("resolved")))
    assert r.get(SPLIT) == "30"


def test_a_group_following_the_global_split_is_rolled_back_on_its_own_key(
    alert_proxy: ProxyProcess, redis_url: str
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.set(SPLIT, "100")
    wait_until(lambda: served(alert_proxy, 10, "/tasks") == {"v2"}, timeout=5)
    answer = post(alert_proxy, payload(alert(group="tasks")))
    assert [b["group"] for b in answer.json()["rolled_back"]] == ["tasks"]
    assert answer.json()["rolled_back"][0]["from_percentage"] == 100
    assert r.get(SPLIT + ":tasks") == "0" and r.get(SPLIT) == "100"
    wait_until(lambda: served(alert_proxy, 10, "/tasks") == {"v1"}, timeout=2, interval=0.02)
    assert served(alert_proxy, 10) == {"v2"}  # the other group is untouched


def test_hostile_webhooks_are_refused_in_one_line_and_change_nothing(
    alert_proxy: ProxyProcess, redis_url: str
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.set(SPLIT, "40")
    doc = httpx.get(alert_proxy.admin + "/openapi.json").json()
    operation = doc["paths"]["/_strangler/alerts/alertmanager"]["post"]
    assert operation["security"] == [{"bearer": []}] and "Alertmanager" in operation["summary"]
    good = payload(alert())
    for token in (None, "wrong", TOKEN + "x"):
        answer = post(alert_proxy, good, token=token)
        assert answer.status_code == 401 and answer.json()["error"] == "unauthorized"
    refused = [
        (b"not json at all", 400),
        (b"\xff\xfe\x00", 400),
        (b'{"alerts": [' + b"[" * 10_000, 400),
        (b"NaN", 400),
        (json.dumps([good]).encode(), 422),
        (json.dumps({"alerts": "firing"}).encode(), 422),
        (json.dumps({"alerts": None}).encode(), 422),
        (b" " * (1024 * 1024 + 1), 413),
        (b'{"alerts": ["' + b"x" * (2 * 1024 * 1024) + b'"]}', 413),
    ]
    for raw, status in refused:
        answer = post(alert_proxy, None, raw=raw)
        assert answer.status_code == status, (raw[:40], answer.text)
        doc = answer.json()
        assert doc["error"] and "\n" not in doc.get("detail", "") and len(answer.text) < 500
    # malformed alerts: each reported, none acts
    bad = [
        {"status": "firing", "labels": "strangler_group=default"},
        {"status": "firing", "labels": {"strangler_group": 5}},
        {"status": "firing", "labels": {"strangler_group": ["default"]}},
        {"status": "firing", "labels": {"strangler_group": None}},
        {"status": "burning", "labels": {"strangler_group": "default"}},
        {"labels": {"strangler_group": "default"}},
        {"status": "firing", "labels": {"strangler_group": "default"}, "annotations": [1]},
        {"status": "firing", "labels": {"strangler_group": "default"}, "fingerprint": {"x": 1}},
        1, "x", None, [],
    ]  # fmt: skip
    answer = post(alert_proxy, {"alerts": bad})
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert doc["invalid_count"] == len(bad) and doc["rolled_back"] == [] and len(doc["invalid"]) == len(bad)
    assert all("\n" not in item["error"] for item in doc["invalid"])
    assert r.get(SPLIT) == "40"
    # 1,000 alerts: 999 for groups nobody serves, or without the label, and one real one
    many = [alert(group=f"g{i}") for i in range(900)] + [alert(group=None) for _ in range(99)] + [alert()]
    started = time.monotonic()
    answer = post(alert_proxy, payload(*many))
    took = time.monotonic() - started
    doc = answer.json()
    assert answer.status_code == 200 and [b["group"] for b in doc["rolled_back"]] == ["default"]
    assert doc["firing"] == 1000 and doc["without_group_label"] == 99 and len(doc["unknown_groups"]) == 20
    assert r.get(SPLIT) == "0"
    print(f"1,000 alerts answered in {took:.3f}s")


def test_plan_is_pure_and_strict() -> None:
    groups = ["default", "tasks"]
    for bad in (None, [], "x", {"alerts": {}}, {"alerts": [{}] * 10_001}):
        with pytest.raises(BadPayload):
            plan(bad, "strangler_group", groups)
    todo = plan(payload(alert(group="tasks", name="A\x1b[31m\n" + "y" * 500)), "strangler_group", groups)
    firing = todo.rollback["tasks"]
    assert firing.name.startswith("A?[31m?") and len(firing.name) == 200
    # a custom label
    todo = plan(payload(alert(group=None, team_group="tasks")), "team_group", groups)
    assert list(todo.rollback) == ["tasks"]


def test_the_documented_receiver_posts_to_the_route_with_a_bearer_token_from_a_file() -> None:
    import yaml

    from tests.support import ROOT

    config = yaml.safe_load((ROOT / "config" / "alertmanager.example.yml").read_text())
    hook = next(r for r in config["receivers"] if r["name"] == "strangler")["webhook_configs"][0]
    assert hook["url"].endswith("/_strangler/alerts/alertmanager") and hook["send_resolved"] is True
    auth = hook["http_config"]["authorization"]
    assert auth["type"] == "Bearer" and "credentials_file" in auth and "credentials" not in auth
    assert "strangler_group" in (ROOT / "docs" / "canary.md").read_text()


def test_redis_unreachable_is_a_503_alertmanager_retries_and_the_retry_rolls_back(
    proxy_factory: Callable[..., ProxyProcess],
    v1v2: tuple[Backend, Backend],
    redis_factory: Callable[[], RedisServer],
) -> None:
    server = redis_factory()
    v1, v2 = v1v2
    proxy = proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=server.url, admin_token=TOKEN,
                          canary=canary(), process=True)  # fmt: skip
    r = server.client()
    r.set(SPLIT, "20")
    server.freeze()
    try:
        answer = post(proxy, payload(alert()))
        assert answer.status_code == 503 and answer.json()["error"] == "redis unavailable"
    finally:
        server.thaw()
    assert r.get(SPLIT) == "20"
    answer = post(proxy, payload(alert()))  # Alertmanager retries a 5xx
    assert answer.status_code == 200 and answer.json()["rolled_back"][0]["from_percentage"] == 20
    assert r.get(SPLIT) == "0"
