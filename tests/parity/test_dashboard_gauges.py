"""The last parity result per table reaches every proxy's /metrics (and so the dashboard)."""

from __future__ import annotations

import json
from collections.abc import Callable

from tests.support import ProxyProcess, RedisServer, wait_until


def test_parity_results_in_redis_become_gauges_on_every_proxy(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    proxy = start_proxy(key_prefix="pg:", split_key="pg:split", poll_interval_seconds=0.2)
    client = redis_server.client()
    client.hset("pg:parity:last", mapping={
        "orders": json.dumps({"status": "different", "missing": 2, "extra": 1, "changed": 4}),
        "users": json.dumps({"status": "equal", "missing": 0, "extra": 0, "changed": 0}),
        "broken": "not json",
    })  # fmt: skip
    wait_until(lambda: proxy.metric("strangler_parity_differences", table="orders") == 7, timeout=5)
    assert proxy.metric("strangler_parity_in_sync", table="orders") == 0
    assert proxy.metric("strangler_parity_in_sync", table="users") == 1
    assert 'table="broken"' not in proxy.metrics()
    assert proxy.metric("strangler_invalid_control_values_total", key="parity:last") >= 1
    client.hdel("pg:parity:last", "orders")  # a table dropped from the results leaves the dashboard
    wait_until(lambda: 'strangler_parity_in_sync{table="orders"}' not in proxy.metrics(), timeout=5)
