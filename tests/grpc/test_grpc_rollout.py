"""The canary over gRPC: the ladder advances while v2 answers well, and a v2 that answers
UNAVAILABLE (in its trailers, HTTP 200) for 10% of calls is rolled back, the decision recorded."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis

from tests.canary.helpers import canary, cli
from tests.grpc.interop import InteropServer
from tests.grpc.traffic import GrpcTraffic
from tests.support import ProxyProcess, wait_until


def state(r: redis.Redis, key: str) -> dict[str, Any] | None:
    raw = r.get(key)
    return json.loads(raw) if raw else None


def test_the_ladder_advances_on_a_healthy_grpc_v2(
    grpc_proxy: Callable[..., ProxyProcess], redis_url: str
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    proxy = grpc_proxy(canary=canary())
    result = cli("rollout", "start", "--steps", "50,100", "--interval", "1s", "--redis-url", redis_url)
    assert result.exit_code == 0, result.output
    with GrpcTraffic(proxy.url) as traffic:
        wait_until(
            lambda: (state(r, "strangler:rollout:default") or {}).get("state") == "completed",
            timeout=30, message="the rollout completes",
        )  # fmt: skip
    assert r.get("feature:v2_traffic_percentage") == "100"
    assert traffic.versions["v2"] > 0
    assert proxy.metric("strangler_grpc_requests_total", version="v2", grpc_code="OK") > 0
    assert proxy.metric("strangler_grpc_requests_total", grpc_code="UNAVAILABLE") == 0
    assert r.get("strangler:canary:decision:default") is None


def test_a_grpc_v2_failing_ten_percent_with_unavailable_is_rolled_back(
    grpc_proxy: Callable[..., ProxyProcess], grpc_v1v2: tuple[InteropServer, InteropServer], redis_url: str
) -> None:
    _, v2 = grpc_v1v2
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    proxy = grpc_proxy(canary=canary())
    result = cli("rollout", "start", "--steps", "50,100", "--interval", "1h", "--redis-url", redis_url)
    assert result.exit_code == 0, result.output
    with GrpcTraffic(proxy.url):
        wait_until(
            lambda: (state(r, "strangler:canary:verdict:default") or {}).get("status") == "pass",
            timeout=20, message="a passing check with enough data",
        )  # fmt: skip
        v2.servicer.fail_share = 0.1
        wait_until(lambda: r.get("feature:v2_traffic_percentage") == "0", timeout=30)
    decision = state(r, "strangler:canary:decision:default")
    assert decision is not None
    assert decision["failed_check"] in ("error_rate", "error_rate_ratio"), decision["failed_check"]
    assert decision["v2"]["error_rate"] > 0.05 and decision["v1"]["error_rate"] == 0
    rollout = state(r, "strangler:rollout:default")
    assert rollout is not None and rollout["state"] == "rolled_back"
    assert proxy.metric("strangler_grpc_requests_total", version="v2", grpc_code="UNAVAILABLE") > 0
