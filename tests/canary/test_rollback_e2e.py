"""Acceptance with real processes: backends, Redis and ``strangler serve``, test-sized intervals."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import redis

from tests.canary.helpers import Receiver, Traffic, canary, cli
from tests.support import Backend, ProxyProcess, wait_until

INTERVAL = 0.5
FAILURES = 3


def state(r: redis.Redis, key: str) -> dict[str, Any] | None:
    raw = r.get(key)
    return json.loads(raw) if raw else None


def test_error_rate_rollback_during_rollout_records_decision_and_alerts(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    with Receiver() as receiver:
        notifiers = [
            {"kind": "slack", "url": receiver.url + "/slack"},
            {"kind": "pagerduty", "url": receiver.url + "/pd", "routing_key": "R0UT1NGKEY"},
            {"kind": "webhook", "url": receiver.url + "/hook", "min_severity": "warning"},
        ]
        proxy = proxy_factory(
            v1_url=v1.url, v2_url=v2.url, redis_url=redis_url, canary=canary(notifiers=notifiers)
        )
        result = cli("rollout", "start", "--steps", "10,100", "--interval", "1h", "--redis-url", redis_url)
        assert result.exit_code == 0, result.output
        assert r.get("feature:v2_traffic_percentage") == "10"
        with Traffic([proxy.url]) as traffic:
            wait_until(
                lambda: (state(r, "strangler:canary:verdict:default") or {}).get("status") == "pass",
                timeout=20, message="a passing check with enough data",
            )  # fmt: skip
            started = time.monotonic()
            v2.control(error_rate=0.2)
            wait_until(lambda: r.get("feature:v2_traffic_percentage") == "0", timeout=20, interval=0.02)
            elapsed = time.monotonic() - started
            # every request goes to v1 within a second of the rollback
            wait_until(lambda: httpx.get(proxy.url + "/t", headers={"X-User-ID": "u9"}).headers[
                "x-api-version"] == "v1", timeout=3)  # fmt: skip
            seen_v2 = traffic.versions["v2"]
            time.sleep(0.5)
            assert traffic.versions["v2"] - seen_v2 <= traffic.concurrency  # at most those in flight
            print(f"rolled back {elapsed:.2f}s after v2 started failing")
        decision = state(r, "strangler:canary:decision:default")
        assert decision is not None
        # v2's error rate over the window: above the absolute 5%, or (the window still holds answers
        # from before the failures began, so it may sit at 5.00%) above 2x v1's, the next check
        check = decision["failed_check"]
        assert check in ("error_rate", "error_rate_ratio"), check
        # at the first check allowed to act (not a wall-clock bound: a loaded machine checks late)
        assert decision["consecutive_failures"] == FAILURES
        assert decision["v2"]["error_rate"] > 0.02 and decision["v2"]["requests"] >= 10
        assert decision["v1"]["requests"] >= 10 and decision["v1"]["error_rate"] < 0.05
        assert decision["thresholds"]["max_error_rate"] == 0.05 and decision["from_percentage"] == 10
        rollout = state(r, "strangler:rollout:default")
        assert rollout is not None and rollout["state"] == "rolled_back"
        wait_until(lambda: proxy.metric("strangler_rollbacks_total", reason=check) == 1, timeout=5)

        # alerts, in each target's documented format
        wait_until(lambda: receiver.bodies("/pd"), timeout=10, message="pagerduty trigger")
        wait_until(lambda: any("rolled back" in b["text"] for b in receiver.bodies("/slack")), timeout=10)
        wait_until(lambda: receiver.bodies("/hook"), timeout=10, message="generic webhook")
        pd = receiver.bodies("/pd")[0]
        assert pd["routing_key"] == "R0UT1NGKEY" and pd["event_action"] == "trigger"
        assert pd["dedup_key"] == "strangler-rollback-default"
        assert pd["payload"]["severity"] == "critical" and pd["payload"]["source"]
        assert "error rate" in pd["payload"]["summary"]
        assert pd["payload"]["custom_details"]["failed_check"] == check
        slack = [b for b in receiver.bodies("/slack") if "rolled back" in b["text"]][0]
        assert slack["attachments"][0]["color"] and slack["attachments"][0]["fields"]
        assert any(
            b["text"].startswith("[strangler] rollout of default started") for b in receiver.bodies("/slack")
        )
        hooks = receiver.bodies("/hook")
        assert [h["event"] for h in hooks] == ["rolled_back"]  # min_severity warning: "started" filtered
        assert hooks[0]["group"] == "default" and hooks[0]["severity"] == "critical"
        assert hooks[0]["fields"]["v1"]["requests"] >= 10 and hooks[0]["fields"]["v2"]["error_rate"] > 0.02
        wait_until(lambda: proxy.metric("strangler_alerts_total", target="pagerduty", outcome="sent") >= 1)


def test_three_times_slower_v2_is_rolled_back_by_the_latency_check(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    v1.control(delay_ms=50)
    v2.control(delay_ms=50)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    proxy = proxy_factory(
        v1_url=v1.url,
        v2_url=v2.url,
        redis_url=redis_url,
        # the absolute limit out of reach (a busy machine's stall): only the ratio to v1 can fail
        canary=canary(thresholds={"p95_floor_seconds": 0.05, "max_p95_seconds": 5.0}),
    )
    r.set("feature:v2_traffic_percentage", "20")
    with Traffic([proxy.url], concurrency=12):
        wait_until(
            lambda: (state(r, "strangler:canary:verdict:default") or {}).get("status") == "pass",
            timeout=20, message="a passing check with enough data",
        )  # fmt: skip
        v2.control(delay_ms=150)
        wait_until(lambda: r.get("feature:v2_traffic_percentage") == "0", timeout=20)
    decision = state(r, "strangler:canary:decision:default")
    assert decision is not None and decision["failed_check"] == "p95_ratio"
    assert decision["v2"]["p95_seconds"] > decision["v1"]["p95_seconds"]
    assert decision["thresholds"]["max_p95_ratio"] == 1.5


def test_almost_no_traffic_is_insufficient_data_no_rollback_no_advance(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    v2.control(error_rate=1.0)  # every v2 answer fails, but there are far too few to judge
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    proxy = proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=redis_url, canary=canary())
    assert (
        cli("rollout", "start", "--steps", "50,100", "--interval", "0.5s", "--redis-url", redis_url).exit_code
        == 0
    )
    with httpx.Client() as client:  # a trickle (4 requests/s) until four checks have judged it
        n = 0
        while proxy.metric("strangler_check_verdicts_total", verdict="insufficient_data") < 4:
            assert n < 60, "four checks did not come in 15 s"
            n += 1
            client.get(proxy.url + "/t", headers={"X-User-ID": f"few-{n}"})
            time.sleep(0.25)
    verdict = state(r, "strangler:canary:verdict:default")
    assert verdict is not None and verdict["status"] == "insufficient_data", verdict
    assert proxy.metric("strangler_check_verdicts_total", verdict="fail") == 0
    assert r.get("feature:v2_traffic_percentage") == "50"
    rollout = state(r, "strangler:rollout:default")
    assert rollout is not None and (rollout["state"], rollout["percentage"]) == ("progressing", 50)
    assert r.get("strangler:canary:decision:default") is None


def test_two_proxies_one_leader_both_follow_the_rollback_and_failover(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    settings = {"v1_url": v1.url, "v2_url": v2.url, "redis_url": redis_url, "canary": canary()}
    proxies = [proxy_factory(process=True, **settings) for _ in range(2)]  # the leader is SIGKILLed

    def status(p: ProxyProcess) -> dict[str, Any]:
        return dict(httpx.get(p.admin + "/canary/status", timeout=2).json()["this_process"])

    def leaders() -> list[ProxyProcess]:
        alive = [p for p in proxies if p.process is not None and p.process.poll() is None]
        return [p for p in alive if status(p)["leader"]]

    leader = wait_until(lambda: leaders() if len(leaders()) == 1 else None, timeout=10)[0]
    follower = next(p for p in proxies if p is not leader)
    r.set("feature:v2_traffic_percentage", "10")
    with Traffic([p.url for p in proxies]):
        wait_until(
            lambda: (state(r, "strangler:canary:verdict:default") or {}).get("status") == "pass", timeout=20
        )
        v2.control(error_rate=0.3)
        wait_until(lambda: r.get("feature:v2_traffic_percentage") == "0", timeout=20)
    assert leaders() == [leader]  # exactly one leader all along
    assert follower.metric("strangler_check_verdicts_total") == 0  # only the leader judges
    assert leader.metric("strangler_rollbacks_total", reason="error_rate") == 1
    with httpx.Client() as client:  # both route everything to v1
        for p in proxies:
            wait_until(
                lambda p=p: all(
                    client.get(p.url + "/t", headers={"X-User-ID": f"after-{i}"}).headers["x-api-version"]
                    == "v1"
                    for i in range(15)
                ),
                timeout=3,
            )

    leader.kill()  # SIGKILL: no release, the lock has to expire
    started = time.monotonic()
    wait_until(lambda: leaders() == [follower], timeout=10, interval=0.05)
    took = time.monotonic() - started
    assert took <= 1.5 + INTERVAL + 1.0, f"takeover after {took:.2f}s"  # TTL + one loop + slack
    me = status(follower)["identity"]
    wait_until(lambda: (state(r, "strangler:canary:verdict:default") or {}).get("leader") == me, timeout=5)
