"""The CLI through the admin API (--url/--token, or STRANGLER_ADMIN_URL/STRANGLER_ADMIN_TOKEN)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.clirun import strangler
from tests.support import Backend, ProxyProcess, RedisServer

TOKEN = "cli-token"
RULE = {
    "name": "old-orders",
    "methods": ["GET"],
    "pattern": "/orders/**",
    "deprecated_at": "2025-01-01",
    "sunset_at": "2099-01-01",
    "migration_guide": "https://docs.example.com/orders",
    "replacement": "/v2/orders",
}


@pytest.fixture()
def token_proxy(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> ProxyProcess:
    v1, v2 = v1v2
    return proxy_factory(
        v1_url=v1.url, v2_url=v2.url, redis_url=redis_url, admin_token=TOKEN, deprecations=[RULE]
    )


def test_set_status_rollback_through_the_admin_api(
    token_proxy: ProxyProcess, redis_server: RedisServer
) -> None:
    redis = redis_server.client()
    denied = strangler("set", "25", "--url", token_proxy.url, "--token", "wrong")
    assert denied.returncode == 2  # a refusal, as through Redis (with a hint about the token)
    assert "401" in denied.stderr and "unauthorized" in denied.stderr
    assert redis.get("feature:v2_traffic_percentage") is None

    env = {"STRANGLER_ADMIN_URL": token_proxy.admin, "STRANGLER_ADMIN_TOKEN": TOKEN}
    done = strangler("set", "25", env=env)
    assert done.returncode == 0, done.stderr
    assert "25%" in done.stdout and redis.get("feature:v2_traffic_percentage") == "25"
    bad = strangler("set", "250", env=env)
    assert bad.returncode == 2 and "invalid percentage" in bad.stderr

    status = strangler("status", "--json", "--url", token_proxy.url)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["groups"][0]["group"] == "default" and data["groups"][0]["percentage"] == 25.0

    back = strangler("rollback", env=env)
    assert back.returncode == 0 and redis.get("feature:v2_traffic_percentage") == "0"


def test_deprecations_lists_rules_with_hit_counts(token_proxy: ProxyProcess) -> None:
    import httpx

    for _ in range(3):
        assert httpx.get(token_proxy.url + "/orders/1").headers["deprecation"] == "@1735689600"
    listed = strangler("deprecations", "--json", "--url", token_proxy.url)
    assert listed.returncode == 0, listed.stderr
    (rule,) = json.loads(listed.stdout)["rules"]
    assert rule["name"] == "old-orders" and rule["effective_phase"] == "warn"
    assert rule["hits"] == {"warn": 3, "gone": 0}
    table = strangler("deprecations", "--url", token_proxy.url)
    assert "old-orders" in table.stdout and "/orders/**" in table.stdout

    gone = strangler(
        "deprecations", "phase", "old-orders", "gone", "--url", token_proxy.url, "--token", TOKEN
    )
    assert gone.returncode == 0, gone.stderr
    assert httpx.get(token_proxy.url + "/orders/1").status_code == 410
