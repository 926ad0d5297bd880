"""The statistical judge with real processes: backends, Redis and the proxy, test-sized intervals."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis

from tests.canary.helpers import Traffic, canary
from tests.support import Backend, ProxyProcess, wait_until

VERDICT, DECISION, SPLIT = (
    "strangler:canary:verdict:default",
    "strangler:canary:decision:default",
    ("feature:v2_traffic_percentage"),
)


def state(r: redis.Redis, key: str) -> dict[str, Any] | None:
    raw = r.get(key)
    return json.loads(raw) if raw else None


def statistical(**thresholds: Any) -> dict[str, Any]:
    """The group's thresholds with the statistical judge; the absolute limits out of reach, so only
    the sequential tests can fail (a loaded test machine stalls now and then)."""
    group = {"judge": "statistical", "min_requests": 10, "max_error_rate": 0.9, "max_p95_seconds": 5.0}
    return canary(group_thresholds={"default": {**group, **thresholds}})


def test_more_v2_errors_are_rolled_back_by_the_error_evidence(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    for backend in v1v2:
        # both slow alike: without it, sub-millisecond answers on a loaded machine can differ by
        # which backend process the scheduler favours, and the latency evidence may act first
        backend.control(delay_ms=20)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    proxy = proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=redis_url, canary=statistical())
    r.set(SPLIT, "20")
    with Traffic([proxy.url], concurrency=12):
        wait_until(
            lambda: "statistics" in (state(r, VERDICT) or {}), timeout=20, message="a statistical check"
        )
        v2.control(delay_ms=20, error_rate=0.05)  # below every absolute limit: only the evidence can act
        wait_until(lambda: r.get(SPLIT) == "0", timeout=30, interval=0.05)
    decision = state(r, DECISION)
    assert decision is not None and decision["failed_check"] == "error_evidence", decision
    errors = decision["statistics"]["errors"]
    assert errors["log_lr"] >= errors["threshold"] and errors["v2_error_rate"] > errors["v1_error_rate"]
    assert "fails more often" in decision["reason"]
    wait_until(lambda: proxy.metric("strangler_rollbacks_total", reason="error_evidence") == 1, timeout=5)
    assert proxy.metric("strangler_canary_evidence", group="default", test="errors") >= 1.0
    verdict = state(r, VERDICT)
    assert verdict is not None and "tally" not in verdict  # the next attempt is a new judged period


def test_equal_versions_hold_or_pass_and_never_roll_back(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    for backend in v1v2:
        backend.control(delay_ms=20)  # both slow alike: scheduler noise is small beside the delay
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    # alpha 0.001: the judge's own bound makes a false rollback in this test a 1-in-1000 event
    proxy = proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=redis_url, canary=statistical(alpha=0.001))
    r.set(SPLIT, "20")
    with Traffic([proxy.url], concurrency=12):
        wait_until(
            lambda: proxy.metric("strangler_check_verdicts_total") >= 16, timeout=40, message="16 checks"
        )
    assert r.get(SPLIT) == "20" and r.get(DECISION) is None
    assert proxy.metric("strangler_check_verdicts_total", verdict="fail") == 0
    verdict = state(r, VERDICT)
    assert verdict is not None and verdict["status"] in ("pass", "insufficient_data"), verdict
    stats = verdict["statistics"]
    assert stats["requests"]["v1"] > stats["requests"]["v2"] > 0
    assert verdict["tally"]["n2"] == stats["requests"]["v2"]  # carried in the record for a new leader
    assert "strangler_canary_evidence{" in proxy.metrics()
    for test in ("errors", "latency"):
        assert stats[test]["log_lr"] < stats[test]["threshold"]
        assert proxy.metric("strangler_canary_evidence", group="default", test=test) < 1.0
