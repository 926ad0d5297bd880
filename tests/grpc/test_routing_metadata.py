"""gRPC calls through the split as HTTP requests are: route groups match ``/package.Service/Method``
paths, and the sticky key comes from request metadata (a metadata key is a request header, so
``user_key_header`` names it)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import redis

from tests.grpc.interop import SERVICE, InteropServer
from tests.grpc.traffic import EMPTY_CALL, HEADERS
from tests.support import ProxyProcess, wait_refreshed

ROUTES = [
    {"name": "unary", "patterns": ["/grpc.testing.TestService/UnaryCall"]},
    {"name": "testing", "patterns": ["/grpc.testing.*/*"]},
]


def backend_of(client: httpx.Client, proxy: ProxyProcess, method: str, **metadata: str) -> str:
    response = client.post(proxy.url + SERVICE + method, content=EMPTY_CALL, headers={**HEADERS, **metadata})
    assert response.status_code == 200
    assert response.headers["x-api-version"] == response.headers["x-backend"]
    return response.headers["x-backend"]


def test_route_groups_match_service_and_method_paths(
    grpc_proxy: Callable[..., ProxyProcess], redis_url: str
) -> None:
    proxy = grpc_proxy(routes=ROUTES)
    r = redis.Redis.from_url(redis_url)
    r.set("feature:v2_traffic_percentage:unary", "100")  # UnaryCall's group only
    wait_refreshed(proxy)
    with httpx.Client(timeout=10) as client:
        assert backend_of(client, proxy, "UnaryCall") == "v2"
        assert backend_of(client, proxy, "EmptyCall") == "v1"
    assert proxy.metric("strangler_grpc_requests_total", group="unary", version="v2") == 1
    assert proxy.metric("strangler_grpc_requests_total", group="testing", version="v1") == 1


def test_the_sticky_key_comes_from_call_metadata(
    grpc_proxy: Callable[..., ProxyProcess], grpc_v1v2: tuple[InteropServer, InteropServer], redis_url: str
) -> None:
    proxy = grpc_proxy(user_key_header="x-tenant", user_key_fallback="random")
    r = redis.Redis.from_url(redis_url)
    r.set("feature:v2_traffic_percentage", "50")
    wait_refreshed(proxy)
    with httpx.Client(timeout=10) as client:
        keys = [f"tenant-{n}" for n in range(40)]
        first = {key: backend_of(client, proxy, "EmptyCall", **{"x-tenant": key}) for key in keys}
        again = {key: backend_of(client, proxy, "EmptyCall", **{"x-tenant": key}) for key in keys}
    assert first == again  # each caller keeps its version
    assert set(first.values()) == {"v1", "v2"}  # and callers are split
    # the key is still passed on as metadata: every call's backend saw it
    seen = [m.get("x-tenant", "") for server in grpc_v1v2 for m in server.servicer.metadata]
    assert len(seen) == 80 and all(value.startswith("tenant-") for value in seen)
