"""The split: share, stickiness, monotonicity, agreement between replicas, live changes."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.clirun import strangler
from tests.support import Backend, ProxyProcess, RedisServer, wait_until
from tests.support import versions_by_user as versions

KEY = "feature:v2_traffic_percentage"


def test_share_sticky_monotonic_and_same_on_two_replicas(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    redis_server.client().set(KEY, "30")
    first = start_proxy()
    second = start_proxy()

    at_30 = versions(first, range(3000))
    share = sum(v == "v2" for v in at_30.values()) / len(at_30)
    assert 0.27 <= share <= 0.33, share

    again = versions(first, range(500))
    assert again == {k: at_30[k] for k in again}, "a user key changed version without a change of split"
    assert versions(second, range(500)) == again, "two replicas disagree"

    redis_server.client().set(KEY, "50")
    wait_until(lambda: httpx.get(first.admin + "/split").json()["default"] == 50.0, timeout=3)
    at_50 = versions(first, range(3000))
    moved_back = [k for k, v in at_30.items() if v == "v2" and at_50[k] == "v1"]
    assert moved_back == []
    assert 0.47 <= sum(v == "v2" for v in at_50.values()) / 3000 <= 0.53


def test_group_key_overrides_global(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    client = redis_server.client()
    client.set(KEY, "0")
    client.set(KEY + ":orders", "100")
    proxy = start_proxy(
        routes=[{"name": "orders", "patterns": ["/orders/**", "/cart/*"]}],
    )
    assert set(versions(proxy, range(50), "/orders/7/items").values()) == {"v2"}
    assert set(versions(proxy, range(50), "/cart/1").values()) == {"v2"}
    assert set(versions(proxy, range(50), "/cart/1/x").values()) == {"v1"}
    assert set(versions(proxy, range(50), "/users/1").values()) == {"v1"}
    client.delete(KEY + ":orders")
    wait_until(lambda: set(versions(proxy, range(20), "/orders/1").values()) == {"v1"}, timeout=3)


def test_force_header_and_affinity_cookie(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(
        user_key_fallback="affinity_cookie",
        default_percentage=50,
    )
    forced = httpx.get(proxy.url + "/echo", headers={"X-Strangler-Version": "v2"})
    assert forced.headers["x-api-version"] == "v2"
    assert forced.json()["version"] == "v2"
    assert not any(k.lower() == "x-strangler-version" for k, _ in forced.json()["headers"])
    bad = httpx.get(proxy.url + "/echo", headers={"X-Strangler-Version": "v3"})
    assert bad.status_code == 400
    assert bad.json()["error"] == "bad force header"

    with httpx.Client(base_url=proxy.url) as client:
        first = client.get("/")
        cookie = first.headers["set-cookie"]
        assert cookie.startswith("strangler_uid=")
        seen = {client.get("/").headers["x-api-version"] for _ in range(30)}
    assert seen == {first.headers["x-api-version"]}


def test_redis_cli_set_is_picked_up_within_a_poll(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    proxy = start_proxy(poll_interval_seconds=0.5)
    redis_server.client().set(KEY, "100")  # a plain SET, no publish: only the poll sees it
    wait_until(
        lambda: httpx.get(proxy.url + "/").headers["x-api-version"] == "v2", timeout=1.0, interval=0.01
    )


def test_strangler_set_is_picked_up_at_once(start_proxy: Callable[..., ProxyProcess], redis_url: str) -> None:
    proxy = start_proxy(poll_interval_seconds=1.0)
    assert strangler("set", "100", "--redis-url", redis_url).returncode == 0
    # the CLI publishes the change; the proxy refreshes on the message instead of waiting for the poll
    wait_until(
        lambda: httpx.get(proxy.url + "/").headers["x-api-version"] == "v2", timeout=0.2, interval=0.01
    )
    assert strangler("rollback", "--redis-url", redis_url).returncode == 0
    wait_until(
        lambda: httpx.get(proxy.url + "/").headers["x-api-version"] == "v1", timeout=0.2, interval=0.01
    )


def test_invalid_values_keep_the_last_good_one_and_are_counted(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    client = redis_server.client()
    client.set(KEY, "100")
    proxy = start_proxy()
    assert httpx.get(proxy.url + "/").headers["x-api-version"] == "v2"
    for bad in ("abc", "150", "-1", "nan"):
        before = proxy.metric("strangler_invalid_control_values_total", key="split")
        client.set(KEY, bad)
        wait_until(
            lambda b=before: proxy.metric("strangler_invalid_control_values_total", key="split") > b,
            timeout=3,
        )
        assert {proxy.http.get(proxy.url + "/").headers["x-api-version"] for _ in range(20)} == {"v2"}
    assert proxy.output().count("ignored invalid control value") == 4  # once per distinct bad value
    client.set(KEY, "0")
    wait_until(lambda: httpx.get(proxy.url + "/").headers["x-api-version"] == "v1", timeout=3)


def test_the_affinity_cookie_is_secure_over_tls(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str, tmp_path: Path
) -> None:
    """A client on TLS gets ``Secure`` affinity (and pin) cookies."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    v1, v2 = v1v2
    proxy = proxy_factory(
        wait=False, process=True, v1_url=v1.url, v2_url=v2.url, redis_url=redis_url,
        tls_cert_file=str(cert), tls_key_file=str(key), user_key_fallback="affinity_cookie",
        default_percentage=50, session_pinning={"groups": ["*"], "secret": "tls-test-pin-secret-0123456"},
    )  # fmt: skip
    context = ssl.create_default_context()
    ca.configure_trust(context)
    url = f"https://127.0.0.1:{proxy.port}"
    with httpx.Client(verify=context, timeout=5) as client:
        wait_until(lambda: client.get(url + "/_strangler/health").status_code == 200, timeout=20)
        cookies = client.get(url + "/").headers.get_list("set-cookie")
    assert len(cookies) == 2 and all(cookie.endswith("; Secure") for cookie in cookies), cookies
    assert "Max-Age=31536000" in cookies[0]
