"""The first end-to-end path: client -> proxy -> v1/v2, split from Redis."""

from __future__ import annotations

import httpx

from tests.support import ProxyProcess, RedisServer, wait_until


def test_forwards_to_v1_by_default_and_v2_when_split_is_100(
    proxy: ProxyProcess, redis_server: RedisServer
) -> None:
    response = httpx.get(proxy.url + "/echo/a?x=1", headers={"X-User-ID": "u1"})
    assert response.status_code == 200
    assert response.headers["x-api-version"] == "v1"
    assert response.json()["version"] == "v1"
    redis_server.client().set("feature:v2_traffic_percentage", "100")
    wait_until(lambda: httpx.get(proxy.url + "/echo").headers["x-api-version"] == "v2", timeout=3)
