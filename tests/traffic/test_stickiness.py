"""Session pinning, JWT/query sticky keys and match rules, across a ramp and a rollback,
with two proxies that must agree."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Callable, Iterator
from hashlib import blake2b
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis.asyncio as aioredis

from proxy.canary.rollout import Rollouts
from proxy.control.keys import Keys
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


PIN_SECRET = "stickiness-test-pin-secret-0123"
PINNING = {"groups": ["*"], "max_age_seconds": 600, "secret": PIN_SECRET}


def admin_split(value: float, *proxies: ProxyProcess) -> None:
    """The split set through our tools (the admin API: the rollout-aware writer), as people do."""
    answer = httpx.post(proxies[0].admin + "/split", json={"percentage": value}, headers=proxies[0].auth)
    assert answer.status_code == 200, answer.text
    for proxy in proxies:
        wait_until(
            lambda p=proxy: httpx.get(p.admin + "/split", timeout=5).json()["default"] == value, timeout=5
        )  # type: ignore[misc]


def admin_rollback(*proxies: ProxyProcess) -> None:
    answer = httpx.post(proxies[0].admin + "/rollback", json={}, headers=proxies[0].auth, timeout=10)
    assert answer.status_code == 200, answer.text
    for proxy in proxies:
        wait_until(lambda p=proxy: httpx.get(p.admin + "/split", timeout=5).json()["default"] == 0, timeout=5)  # type: ignore[misc]


def test_session_pins_hold_while_the_split_moves_and_a_rollback_or_a_finished_rollout_wins(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    """Pins hold both ways while the split moves, on every replica; none is set or honoured at 0% or
    100%, and pins from before a rollback are void for the next ramp."""
    a, b, key = two_proxies(start_proxy, session_pinning=PINNING)
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

    # a completed rollout is v2 for everyone: no v1 pin holds anyone back, and nobody is pinned
    admin_split(100, a, b)
    for _version, pin in pins.values():
        answer = get(a, cookies={"strangler_pin_default": pin})
        assert answer.headers["x-api-version"] == "v2" and pin_of(answer) is None

    # keyed users pinned during a ramp; a rollback sends all to v1 without pinning anyone there...
    admin_split(30, a, b)
    users = {u: get(a, headers={"X-User-ID": f"user-{u}"}) for u in range(200)}
    user_pins = {u: pin_of(answer) for u, answer in users.items()}
    assert all(user_pins.values())
    admin_rollback(a, b)
    for u, pin in user_pins.items():
        answer = get(b, headers={"X-User-ID": f"user-{u}"}, cookies={"strangler_pin_default": pin or ""})
        assert answer.headers["x-api-version"] == "v1" and pin_of(answer) is None
    # ...and the next ramp places everyone by their bucket: pins from before the rollback are void
    admin_split(60, a, b)
    unpinned = {u: get(a, headers={"X-User-ID": f"user-{u}"}).headers["x-api-version"] for u in range(200)}
    for u, pin in user_pins.items():
        answer = get(b, headers={"X-User-ID": f"user-{u}"}, cookies={"strangler_pin_default": pin or ""})
        assert answer.headers["x-api-version"] == unpinned[u], u
        assert pin_of(answer) is not None  # pinned afresh, under the new epoch
    moved = [u for u in users if users[u].headers["x-api-version"] == "v1" and unpinned[u] == "v2"]
    assert moved, "a v1 pin from before the rollback held a user back"


def test_a_pin_is_worth_nothing_to_another_user_or_when_made_offline(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    """A copied v2 pin does not give v2 to another user; a pin made offline with
    the shipped default salt (the old shared format) does not work."""
    a, b, key = two_proxies(start_proxy, session_pinning=PINNING)
    set_split(redis_server, key, 10, a, b)
    v2_pin = None
    for u in range(200):
        answer = get(a, headers={"X-User-ID": f"owner-{u}"})
        if answer.headers["x-api-version"] == "v2":
            v2_pin = pin_of(answer)
            break
    assert v2_pin is not None
    old = blake2b(b"pin\0default\0v2", key=b"strangler", digest_size=9).hexdigest()
    for u in range(40):
        user = {"X-User-ID": f"other-{u}"}
        plain = get(b, headers=user).headers["x-api-version"]
        assert (
            get(b, headers=user, cookies={"strangler_pin_default": v2_pin}).headers["x-api-version"] == plain
        )
        offline = get(a, headers=user, cookies={"strangler_pin_default": f"v2.{old}"})
        assert offline.headers["x-api-version"] == plain
    with pytest.raises(ConfigError, match="session_pinning.secret"):
        load_settings(session_pinning={"groups": ["*"], "secret": "strangler"})


def test_a_rollback_sends_testers_back_to_v1_unless_their_rule_survives_it(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    """A rollback means everyone: "everyone back to v1, now" includes testers a match rule sends to
    v2, for the manual rollback and for a rollout ended by abort (the automatic rollback's transaction)."""
    rules = [
        {"header": "X-Beta-Tester", "value": "yes", "version": "v2"},
        {"cookie": "ops", "value": "1", "version": "v2", "survives_rollback": True},
    ]
    a, b, key = two_proxies(start_proxy, match_rules=rules)
    tester, ops = {"X-Beta-Tester": "yes", "X-User-ID": "t"}, {"ops": "1"}

    def versions() -> set[tuple[str, str]]:
        return {
            (get(p, headers=tester).headers["x-api-version"], get(p, cookies=ops).headers["x-api-version"])
            for p in (a, b)
        }

    set_split(redis_server, key, 0, a, b)
    assert versions() == {("v2", "v2")}  # 0% before a ramp is not a rollback: testers test
    admin_split(25, a, b)
    assert versions() == {("v2", "v2")}
    admin_rollback(a, b)
    assert versions() == {("v1", "v2")}  # the rollback wins, except over survives_rollback
    admin_split(5, a, b)
    assert versions() == {("v2", "v2")}  # set above 0 again: the rollback is over

    # the canary's rollout transaction (shared by the automatic rollback) marks it too
    async def rollout(action: str) -> None:
        client = aioredis.from_url(redis_server.url)
        try:
            rollouts = Rollouts(client, Keys(split_key=key))
            if action == "start":
                await rollouts.start("default", [10, 100], 60, "test")
            else:
                await rollouts.abort("default", "test")
        finally:
            await client.aclose()

    asyncio.run(rollout("start"))
    wait_until(lambda: httpx.get(a.admin + "/split", timeout=5).json()["default"] == 10, timeout=5)
    assert versions() == {("v2", "v2")}
    asyncio.run(rollout("abort"))
    for proxy in (a, b):
        wait_until(lambda p=proxy: httpx.get(p.admin + "/split", timeout=5).json()["default"] == 0, timeout=5)  # type: ignore[misc]
    assert versions() == {("v1", "v2")}


def test_one_user_one_version_whatever_the_source_group_or_proxy(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    """One user, one version, end to end: an e-mail id sent as a header, percent-encoded in the query
    (what encodeURIComponent sends), as a cookie or as a JWT sub gets one version on both proxies
    and in every group at the same percentage; a user on v2 at 30% is on v2 in a group at 50%;
    an empty X-User-ID is no key."""
    a, b, key = two_proxies(
        start_proxy,
        user_key_sources=["header", "cookie", "query", "jwt"],
        user_key_query="uid",
        routes=[{"name": "orders", "patterns": ["/orders/**"]}],
    )
    set_split(redis_server, key, 30, a, b)
    seen: dict[str, str] = {}
    for u in range(120):
        email = f"user.{u}+tag@example.com"
        answers = {
            get(a, headers={"X-User-ID": email}).headers["x-api-version"],
            get(b, f"/echo?uid={quote(email, safe='')}").headers["x-api-version"],
            get(a, "/orders/1", cookies={"user_id": quote(email, safe="@+")}).headers["x-api-version"],
            get(b, "/orders/2", headers=bearer(email)).headers["x-api-version"],
        }
        assert len(answers) == 1, (email, answers)
        seen[email] = answers.pop()
    assert 0.15 <= sum(v == "v2" for v in seen.values()) / len(seen) <= 0.45
    redis_server.client().set(f"{key}:orders", "50")
    for proxy in (a, b):
        wait_until(lambda p=proxy: httpx.get(p.admin + "/split", timeout=5).json()["orders"] == 50, timeout=5)  # type: ignore[misc]
    for email, version in seen.items():
        if version == "v2":
            assert get(b, "/orders/3", headers={"X-User-ID": email}).headers["x-api-version"] == "v2"
    # an empty header is no key: the random fallback, not one bucket shared by every such client
    empty = {get(a, headers={"X-User-ID": ""}).headers["x-api-version"] for _ in range(60)}
    assert empty == {"v1", "v2"}


def test_the_affinity_cookie_outlives_the_browser_session(start_proxy: Callable[..., ProxyProcess]) -> None:
    """Max-Age (a year by default), so a browser restart keeps the version; not
    Secure over plain HTTP (Secure over TLS: tests/traffic/test_decision.py and test_tls.py)."""
    proxy = start_proxy(user_key_fallback="affinity_cookie", default_percentage=50)
    cookie = httpx.get(proxy.url + "/").headers["set-cookie"]
    assert cookie.startswith("strangler_uid=") and "; Max-Age=31536000" in cookie and "Secure" not in cookie
    short = start_proxy(user_key_fallback="affinity_cookie", affinity_cookie_max_age_seconds=120)
    assert "; Max-Age=120;" in httpx.get(short.url + "/").headers["set-cookie"]


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
