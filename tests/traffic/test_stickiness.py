"""Issue 12: session pinning, JWT/query sticky keys and match rules, across a ramp and a rollback,
with two proxies that must agree."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from proxy.settings import ConfigError, load_settings
from tests.support import ProxyProcess, RedisServer, wait_until


def two_proxies(
    start_proxy: Callable[..., ProxyProcess], **settings: Any
) -> tuple[ProxyProcess, ProxyProcess, str]:
    key = f"stick{uuid.uuid4().hex[:8]}:split"
    return start_proxy(split_key=key, **settings), start_proxy(split_key=key, **settings), key


def set_split(redis_server: RedisServer, key: str, value: float, *proxies: ProxyProcess) -> None:
    redis_server.client().set(key, str(value))
    for proxy in proxies:
        wait_until(
            lambda p=proxy: httpx.get(p.admin + "/split", timeout=5).json()["default"] == value, timeout=5
        )  # type: ignore[misc]


_clients: dict[str, httpx.Client] = {}


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    for client in _clients.values():
        client.close()
    _clients.clear()


def get(
    proxy: ProxyProcess,
    path: str = "/",
    headers: dict[str, str] | None = None,
    cookies: dict[str, str] | None = None,
) -> httpx.Response:
    """One request on a kept-alive connection per proxy (a new client per request costs more than
    the request). Each request stands alone as from a new browser: the cookies given are sent as a
    header and whatever the answer sets is not kept."""
    client = _clients.get(proxy.url)
    if client is None:
        client = _clients[proxy.url] = httpx.Client(base_url=proxy.url, timeout=5)
    sent = dict(headers or {})
    if cookies:
        sent["Cookie"] = "; ".join(f"{name}={value}" for name, value in cookies.items())
    response = client.get(path, headers=sent)
    client.cookies.clear()
    assert response.status_code == 200, response.text
    return response


def pin_of(response: httpx.Response) -> str | None:
    for value in response.headers.get_list("set-cookie"):
        name, _, rest = value.partition("=")
        if name == "strangler_pin_default":
            assert "Max-Age=600" in rest and "HttpOnly" in rest
            return rest.split(";")[0]
    return None


def token(sub: str) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256'})}.{part({'sub': sub})}.not-a-real-signature"


def bearer(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub)}"}


def test_session_pins_hold_both_ways_across_a_ramp_and_a_rollback_wins(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    a, b, key = two_proxies(start_proxy, session_pinning={"groups": ["*"], "max_age_seconds": 600})
    set_split(redis_server, key, 30, a, b)
    pins: dict[int, tuple[str, str]] = {}
    for client in range(200):  # no key at all: the random fallback, then the pin keeps it
        answer = get(a)
        pin = pin_of(answer)
        assert pin is not None
        pins[client] = (answer.headers["x-api-version"], pin)
    share = sum(v == "v2" for v, _ in pins.values()) / len(pins)
    assert 0.18 <= share <= 0.42, share

    set_split(redis_server, key, 70, a, b)
    for version, pin in pins.values():  # the other replica honours the pin: both ways
        answer = get(b, cookies={"strangler_pin_default": pin})
        assert answer.headers["x-api-version"] == version
        assert pin_of(answer) is None  # not re-set: the session's max-age runs from its start
    fresh = [get(b).headers["x-api-version"] for _ in range(200)]
    assert 0.55 <= fresh.count("v2") / 200 <= 0.85  # only new sessions follow the ramp

    # a pin the proxy did not sign is ignored (it would be a force header by another name)
    forged = get(a, cookies={"strangler_pin_default": "v2.0123456789abcdef01"})
    assert pin_of(forged) is not None

    set_split(redis_server, key, 0, a, b)
    for version, pin in pins.values():  # a rollback wins over a v2 pin, and re-pins to v1
        answer = get(a, cookies={"strangler_pin_default": pin})
        assert answer.headers["x-api-version"] == "v1"
        if version == "v2":
            new_pin = pin_of(answer)
            assert new_pin is not None and new_pin.startswith("v1.")


def test_jwt_and_query_keys_are_sticky_monotonic_and_agree(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    a, b, key = two_proxies(start_proxy, user_key_sources=["jwt", "query", "header"], user_key_query="uid")
    set_split(redis_server, key, 30, a, b)

    def by_jwt(proxy: ProxyProcess) -> dict[int, str]:
        return {u: get(proxy, headers=bearer(f"user-{u}")).headers["x-api-version"] for u in range(300)}

    def by_query(proxy: ProxyProcess) -> dict[int, str]:
        return {u: get(proxy, f"/echo?uid=q-{u}").headers["x-api-version"] for u in range(300)}

    jwt_30, query_30 = by_jwt(a), by_query(a)
    assert by_jwt(b) == jwt_30 and by_query(b) == query_30, "two replicas disagree"
    assert by_jwt(a) == jwt_30, "the same sub changed version without a change of split"
    for seen in (jwt_30, query_30):
        assert 0.2 <= sum(v == "v2" for v in seen.values()) / 300 <= 0.4
    # the jwt source comes first: a header key does not move a token holder
    for u in range(50):
        answer = get(a, headers={"Authorization": f"Bearer {token(f'user-{u}')}", "X-User-ID": f"x{u}"})
        assert answer.headers["x-api-version"] == jwt_30[u]
    # a token that is not a JWT is skipped: the next source decides
    for u in range(50):
        answer = get(a, f"/echo?uid=q-{u}", headers={"Authorization": "Bearer garbage"})
        assert answer.headers["x-api-version"] == query_30[u]

    set_split(redis_server, key, 60, a, b)
    jwt_60, query_60 = by_jwt(b), by_query(b)
    for before, after in ((jwt_30, jwt_60), (query_30, query_60)):
        assert not [u for u, v in before.items() if v == "v2" and after[u] == "v1"], (
            "ramp moved v2 users back"
        )
        assert sum(v == "v2" for v in after.values()) > sum(v == "v2" for v in before.values())
    set_split(redis_server, key, 0, a, b)
    assert set(by_jwt(a).values()) == {"v1"}


def test_match_rules_route_testers_while_the_percentage_moves(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    rules = [
        {"header": "X-Beta-Tester", "value": "yes", "version": "v2"},
        {"cookie": "beta", "value": "1", "version": "v2"},
        {"query": "preview", "version": "v2"},  # any value
        {"group": "orders", "header": "X-Legacy", "version": "v1"},
    ]
    a, b, key = two_proxies(
        start_proxy, match_rules=rules, routes=[{"name": "orders", "patterns": ["/orders/**"]}]
    )

    def check(percentage: float) -> None:
        set_split(redis_server, key, percentage, a, b)
        for proxy in (a, b):
            for u in range(12):
                user = {"X-User-ID": f"u{u}"}
                assert get(proxy, headers={**user, "X-Beta-Tester": "yes"}).headers["x-api-version"] == "v2"
                assert get(proxy, cookies={"beta": "1"}, headers=user).headers["x-api-version"] == "v2"
                assert get(proxy, "/echo?preview=", headers=user).headers["x-api-version"] == "v2"
                legacy = get(proxy, "/orders/1", headers={**user, "X-Legacy": "1", "X-Beta-Tester": "yes"})
                assert legacy.headers["x-api-version"] == "v2"  # first matching rule wins
                assert (
                    get(proxy, "/orders/1", headers={**user, "X-Legacy": "1"}).headers["x-api-version"]
                    == "v1"
                )
                # a rule for another group, or another value, does not apply
                with_legacy = get(proxy, "/x", headers={**user, "X-Legacy": "1"}).headers["x-api-version"]
                assert with_legacy == get(proxy, "/x", headers=user).headers["x-api-version"]
                assert get(proxy, headers={"X-Beta-Tester": "no", "X-Strangler-Version": "v1"}).headers[
                    "x-api-version"
                ] == "v1"  # fmt: skip

    for percentage in (0, 25, 100, 0):  # before the ramp, during it, completed, rolled back
        check(percentage)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"match_rules": [{"header": "X-A", "cookie": "b", "version": "v2"}]}, "exactly one of"),
        ({"match_rules": [{"group": "nope", "header": "X-A", "version": "v2"}]}, "unknown route groups"),
        ({"session_pinning": {"groups": ["nope"]}}, "unknown route groups"),
        ({"user_key_sources": ["header", "header"]}, "twice"),
        ({"user_key_sources": ["header", "ip"]}, "user_key_sources"),
    ],
)
def test_bad_rules_are_one_config_error(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(**settings)
