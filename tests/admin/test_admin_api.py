"""The admin API against a real proxy: who may change things, reads by setting, JSON errors, OpenAPI.

No peer address is trusted: clients from 127.0.0.1 and from 127.0.0.2 (a second loopback source
address, standing in for a remote peer) both need the token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.support import (
    Backend,
    ProxyProcess,
    RedisServer,
    free_port,
    generation,
    wait_refreshed,
    wait_until,
)

TOKEN = "s3cret-token-for-tests"
SPLIT_KEY = "feature:v2_traffic_percentage"


@pytest.fixture()
def outsider() -> Iterator[httpx.Client]:
    """An HTTP client whose connections come from 127.0.0.2 (a peer the proxy does not trust)."""
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=5) as client:
        yield client


@pytest.fixture()
def token_proxy(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> ProxyProcess:
    v1, v2 = v1v2
    return proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=redis_url, admin_token=TOKEN)


def test_changes_need_the_token_and_change_nothing_without_it(
    token_proxy: ProxyProcess, redis_server: RedisServer
) -> None:
    redis = redis_server.client()
    admin = token_proxy.admin
    attempts = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ]
    for headers in attempts:
        for method, path, body in (
            ("PUT", "/split", {"percentage": 40}),
            ("POST", "/split", {"percentage": 40}),
            ("POST", "/rollback", {}),
            ("PUT", "/deprecations/anything", {"phase": "gone"}),
        ):
            response = httpx.request(method, admin + path, json=body, headers=headers)
            assert response.status_code == 401, (headers, method, path)
            assert response.json()["error"] == "unauthorized"
    assert redis.get(SPLIT_KEY) is None
    assert token_proxy.metric("strangler_rollbacks_total") == 0

    good = {"Authorization": f"Bearer {TOKEN}"}
    response = httpx.put(admin + "/split", json={"percentage": 40}, headers=good)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "source": {"path": "admin_api", "url": admin},
        "group": "default",
        "percentage": 40.0,
    }  # fmt: skip  (the set view, docs/schemas/set.json)
    assert redis.get(SPLIT_KEY) == "40"
    response = httpx.post(admin + "/rollback", headers=good)
    assert response.status_code == 200 and redis.get(SPLIT_KEY) == "0"
    assert token_proxy.metric("strangler_rollbacks_total", group="default", reason="manual") == 1
    # reads are open by default, from anyone
    assert httpx.get(admin + "/status").status_code == 200


def test_status_generation_counts_refreshes_so_a_writer_can_wait_for_one(
    token_proxy: ProxyProcess, redis_server: RedisServer
) -> None:
    first = generation(token_proxy)
    assert first >= 1  # the start-up refresh
    wait_until(lambda: generation(token_proxy) > first, timeout=5, message="the poll refreshes")
    redis_server.client().set(SPLIT_KEY, "35")  # a plain SET: no change message, only a poll sees it
    wait_refreshed(token_proxy)
    assert httpx.get(token_proxy.admin + "/split", timeout=5).json()["default"] == 35.0
    redis_server.client().set(SPLIT_KEY, "abc")  # rejected: the count still moves, the split does not
    wait_refreshed(token_proxy)
    assert httpx.get(token_proxy.admin + "/split", timeout=5).json()["default"] == 35.0


def test_without_a_configured_token_one_is_generated_and_loopback_is_not_trusted(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer, outsider: httpx.Client
) -> None:
    """A TLS terminator on the same host makes every client look like 127.0.0.1: no peer address
    may change anything without the token, which `serve` generated for the local CLI."""
    proxy = start_proxy(process=True)  # `strangler serve` itself: its output must not show the token
    redis = redis_server.client()
    token_file = proxy.workdir / ".strangler" / "admin-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    for client in (outsider, httpx.Client(timeout=5)):  # 127.0.0.2 and 127.0.0.1 alike
        response = client.put(proxy.admin + "/split", json={"percentage": 30})
        assert response.status_code == 401
        assert "admin token" in response.json()["detail"]
        assert client.post(proxy.admin + "/rollback").status_code == 401
        forged = client.put(
            proxy.admin + "/split", json={"percentage": 30}, headers={"Authorization": "Bearer x"}
        )
        assert forged.status_code == 401
        assert redis.get(SPLIT_KEY) is None
        assert client.get(proxy.admin + "/split").status_code == 200  # reads stay open
    # the generated token works, from any peer
    granted = outsider.put(proxy.admin + "/split", json={"percentage": 30}, headers=proxy.auth)
    assert granted.status_code == 200
    assert redis.get(SPLIT_KEY) == "30"
    assert proxy.token not in proxy.output()  # the log names the file, never the token


def test_reads_follow_the_setting(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    proxy = proxy_factory(
        v1_url=v1.url, v2_url=v2.url, redis_url=redis_url, admin_token=TOKEN, admin_reads_require_token=True
    )
    good = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/status", "/split", "/metrics", "/deprecations", "/openapi.json"):
        assert httpx.get(proxy.admin + path).status_code == 401, path
        assert httpx.get(proxy.admin + path, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(proxy.admin + path, headers=good).status_code == 200, path
    # probes stay open so load balancers and the Docker HEALTHCHECK need no secret
    assert httpx.get(proxy.admin + "/health").status_code == 200
    assert httpx.get(proxy.admin + "/ready").status_code == 200


def test_errors_are_json_with_a_clear_message(proxy: ProxyProcess) -> None:
    admin = proxy.admin
    httpx = _Authed(proxy.auth)  # validation errors are for callers who may change things
    missing = httpx.get(admin + "/nope")
    assert missing.status_code == 404 and missing.json()["error"] == "not found"
    wrong_method = httpx.delete(admin + "/status")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"] == "method not allowed"
    assert "GET" in wrong_method.headers["allow"]
    patch = httpx.patch(admin + "/split", json={"percentage": 5})
    assert patch.status_code == 405
    assert {"GET", "PUT", "POST"} <= {m.strip() for m in patch.headers["allow"].split(",")}
    invalid = httpx.put(admin + "/split", json={"percentage": 150})
    assert invalid.status_code == 422
    assert invalid.json()["error"] == "invalid percentage" and "150" in invalid.json()["detail"]
    assert httpx.put(admin + "/split", json={"percentage": "abc"}).status_code == 422
    assert httpx.put(admin + "/split", json={}).status_code == 422
    unparsable = httpx.put(admin + "/split", content=b"{not json")
    assert unparsable.status_code == 400 and "JSON" in unparsable.json()["error"]
    unknown_group = httpx.put(admin + "/split", json={"percentage": 5, "group": "nope"})
    assert unknown_group.status_code == 404 and unknown_group.json()["error"] == "unknown group"
    for response in (missing, wrong_method, invalid, unparsable, unknown_group):
        assert response.headers["content-type"].startswith("application/json")


def test_openapi_document_lists_every_route(proxy: ProxyProcess) -> None:
    doc = httpx.get(proxy.admin + "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for path in ("/health", "/ready", "/metrics", "/status", "/split", "/rollback", "/deprecations"):
        assert "/_strangler" + path in paths, path
    assert "/_strangler/deprecations/{name}" in paths
    assert paths["/_strangler/split"]["put"]["security"] == [{"bearer": []}]
    assert "security" not in paths["/_strangler/status"]["get"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for item in paths.values():
        for operation in item.values():
            assert operation["summary"], operation["operationId"]


def test_admin_on_its_own_port_is_not_on_the_main_one(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    admin_port = free_port()
    proxy = proxy_factory(
        wait=False, v1_url=v1.url, v2_url=v2.url, redis_url=redis_url, admin_port=admin_port
    )
    admin = f"http://127.0.0.1:{admin_port}/_strangler"
    from tests.support import wait_until

    wait_until(lambda: httpx.get(admin + "/health", timeout=1).status_code == 200, timeout=20)
    for backend in v1v2:
        backend.log(clear=True)
    on_main = httpx.get(proxy.url + "/_strangler/status")
    assert on_main.status_code == 404 and on_main.json()["error"] == "not found"
    assert httpx.put(proxy.url + "/_strangler/split", json={"percentage": 50}).status_code == 404
    assert [e for b in v1v2 for e in b.log()] == []  # not forwarded either: the prefix stays reserved
    assert httpx.get(admin + "/status").status_code == 200
    assert httpx.get(f"http://127.0.0.1:{admin_port}/other").status_code == 404
    assert httpx.put(admin + "/split", json={"percentage": 5}, headers=proxy.auth).status_code == 200
    assert httpx.get(proxy.url + "/echo").status_code == 200  # the main port still proxies


class _Authed:
    """httpx's module functions with the admin token on every call."""

    def __init__(self, auth: dict[str, str]) -> None:
        self._client = httpx.Client(headers=auth, timeout=5)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)
