"""Deprecation lifecycle: headers before the sunset, 410 from it on, live overrides, hit counts."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx
import orjson
import pytest

from proxy.control.snapshot import Snapshot
from proxy.metrics import Metrics
from proxy.settings import ConfigError, DeprecationRule, load_settings
from proxy.traffic.deprecation import SECTION, DeprecationRules, InvalidOverride, parse_override
from tests.support import Backend, ProxyProcess, RedisServer, wait_refreshed, wait_until

IMF_FIXDATE = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$")
GUIDE = "https://docs.example.com/migrate/users"

WARNED = {
    "name": "old-users",
    "methods": ["GET"],
    "pattern": "/old/users/**",
    "deprecated_at": "2025-01-01",
    "sunset_at": "2099-06-01T12:00:00Z",
    "migration_guide": GUIDE,
    "replacement": "/v2/users",
}
GONE = {
    "name": "legacy-export",
    "pattern": "/legacy/export",
    "deprecated_at": "2024-01-01T00:00:00+00:00",
    "sunset_at": "2025-01-01",
    "migration_guide": "https://docs.example.com/migrate/export",
    "replacement": "/v2/export",
}


def rules_for(*rules: dict[str, object]) -> DeprecationRules:
    return DeprecationRules([DeprecationRule.model_validate(r) for r in rules], Metrics())


# --- pure: rules compiled once, checked against a snapshot ------------------------------------------


def test_headers_and_gone_body_are_built_in_the_right_formats() -> None:
    rules = rules_for(WARNED, GONE)
    snap = Snapshot(0.0, sections={SECTION: rules.config_set})
    warn = rules.check("GET", "/old/users/7", snap)
    assert warn is not None and warn.gone_body is None
    headers = dict(warn.headers)
    assert headers[b"deprecation"] == b"@1735689600"  # RFC 9745: @ + unix seconds of 2025-01-01Z
    sunset = headers[b"sunset"].decode()
    assert IMF_FIXDATE.match(sunset), sunset
    assert sunset == "Mon, 01 Jun 2099 12:00:00 GMT"
    assert parsedate_to_datetime(sunset) == datetime(2099, 6, 1, 12, tzinfo=UTC)
    assert headers[b"link"] == f'<{GUIDE}>; rel="deprecation"'.encode()

    gone = rules.check("POST", "/legacy/export", snap)
    assert gone is not None and gone.gone_body is not None
    assert orjson.loads(gone.gone_body) == {
        "error": "Endpoint deprecated",
        "message": "Use /v2/export instead",
        "migration_guide": "https://docs.example.com/migrate/export",
        "sunset_date": "2025-01-01",
    }
    assert rules.check("POST", "/old/users/7", snap) is None  # method not listed
    assert rules.check("HEAD", "/old/users/7", snap) is not None  # GET implies HEAD
    assert rules.check("GET", "/old/usersX", snap) is None
    # the same objects every time: nothing is built per request
    assert rules.check("GET", "/old/users/8", snap) is warn


def test_sunset_is_a_timestamp_comparison() -> None:
    soon = {**WARNED, "sunset_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() + 1.5))}
    rules = rules_for(soon)
    snap = Snapshot(0.0, sections={SECTION: rules.config_set})
    action = rules.check("GET", "/old/users", snap)
    assert action is not None and action.gone_body is None
    wait_until(
        lambda: (a := rules.check("GET", "/old/users", snap)) is not None and a.gone_body is not None,
        timeout=5,
        message="rule turns gone at its sunset",
    )


def test_live_overrides_parse_and_bad_values_keep_the_last_good() -> None:
    rules = rules_for(WARNED)
    first, problems = rules.parse({"old-users": "gone"}, None)
    assert problems == []
    assert first.rules[0].rule.phase == "gone" and first.rules[0].source == "config+redis"
    new_rule = orjson.dumps({"pattern": "/beta/**", "deprecated_at": "2025-02-01"}).decode()
    second, problems = rules.parse({"old-users": "nonsense", "beta": new_rule}, first)
    assert len(problems) == 1 and "old-users" in problems[0]
    by_name = {r.rule.name: r for r in second.rules}
    assert by_name["old-users"].rule.phase == "gone"  # last good kept
    assert by_name["beta"].source == "redis"
    off, _ = rules.parse({"old-users": "off"}, second)
    assert [r.rule.name for r in off.active] == []
    assert rules.check("GET", "/old/users/1", Snapshot(0.0, sections={SECTION: off})) is None
    with pytest.raises(InvalidOverride, match="not configured"):
        parse_override("unknown", "gone", rules.configured)
    with pytest.raises(InvalidOverride, match="sunset_at"):
        parse_override("old-users", '{"sunset_at": "next tuesday"}', rules.configured)


def test_bad_rules_are_one_clear_config_error() -> None:
    with pytest.raises(ConfigError, match="deprecated_at"):
        load_settings(deprecations=[{**WARNED, "deprecated_at": "soon"}])
    with pytest.raises(ConfigError, match="methods"):
        load_settings(deprecations=[{**WARNED, "methods": ["FETCH"]}])
    with pytest.raises(ConfigError, match="unique"):
        load_settings(deprecations=[WARNED, WARNED])


# --- end to end: a real proxy, real backends --------------------------------------------------------


@pytest.fixture()
def deprecating_proxy(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> ProxyProcess:
    v1, v2 = v1v2
    return proxy_factory(
        v1_url=v1.url, v2_url=v2.url, redis_url=redis_url, deprecations=[WARNED, GONE], default_percentage=50
    )


def test_warned_endpoint_is_served_with_the_three_headers(
    deprecating_proxy: ProxyProcess, v1v2: tuple[Backend, Backend]
) -> None:
    for spelling in ("/old/users/42", "//old/users/42", "/./old/users/42", "/old/x/../users/42"):
        response = httpx.get(deprecating_proxy.url + spelling, headers={"X-Strangler-Version": "v1"})
        assert response.status_code == 200, spelling
        assert response.json()["version"] == "v1"
        assert response.headers["deprecation"] == "@1735689600"
        assert IMF_FIXDATE.match(response.headers["sunset"])
        assert response.headers["link"] == f'<{GUIDE}>; rel="deprecation"'
    plain = httpx.get(deprecating_proxy.url + "/users/42")
    assert "deprecation" not in plain.headers and "sunset" not in plain.headers
    assert (
        deprecating_proxy.metric("strangler_deprecated_requests_total", rule="old-users", phase="warn") == 4
    )


def test_gone_endpoint_answers_410_and_no_backend_sees_it(
    deprecating_proxy: ProxyProcess, v1v2: tuple[Backend, Backend]
) -> None:
    for backend in v1v2:
        backend.log(clear=True)
    spellings = ["/legacy/export", "//legacy/export", "/./legacy/export", "/legacy//export"]
    for spelling in spellings:
        for method in ("GET", "POST", "DELETE"):
            response = httpx.request(method, deprecating_proxy.url + spelling, headers={"X-User-ID": "u1"})
            assert response.status_code == 410, (method, spelling)
            assert response.headers["content-type"] == "application/json"
            assert response.json() == {
                "error": "Endpoint deprecated",
                "message": "Use /v2/export instead",
                "migration_guide": "https://docs.example.com/migrate/export",
                "sunset_date": "2025-01-01",
            }
            assert response.headers["deprecation"] == "@1704067200"
    # a request that does reach a backend, so an empty log is not just a slow log
    assert httpx.get(deprecating_proxy.url + "/users/1").status_code == 200
    seen = [entry["raw_path"] for backend in v1v2 for entry in backend.log()]
    assert seen == ["/users/1"]
    hits = deprecating_proxy.metric("strangler_deprecated_requests_total", rule="legacy-export", phase="gone")
    assert hits == len(spellings) * 3


def test_phase_override_from_redis_and_admin_listing(
    deprecating_proxy: ProxyProcess, redis_server: RedisServer, v1v2: tuple[Backend, Backend]
) -> None:
    url = deprecating_proxy.url + "/old/users/1"
    assert httpx.get(url).status_code == 200
    client = redis_server.client()
    client.hset("strangler:deprecations", "old-users", "gone")
    wait_until(lambda: httpx.get(url).status_code == 410, timeout=5, message="override to gone applies")
    client.hset("strangler:deprecations", "old-users", "bogus")  # rejected: the last good value stays
    wait_refreshed(deprecating_proxy)  # it has read the bogus value
    assert httpx.get(url).status_code == 410
    assert deprecating_proxy.metric("strangler_invalid_control_values_total", key="deprecations") == 1

    listing = httpx.get(deprecating_proxy.admin + "/deprecations").json()
    rules = {rule["name"]: rule for rule in listing["rules"]}
    assert rules["old-users"]["effective_phase"] == "gone"
    assert rules["old-users"]["source"] == "config+redis"
    assert rules["old-users"]["hits"]["warn"] >= 1 and rules["old-users"]["hits"]["gone"] >= 2
    warned = deprecating_proxy.metric("strangler_deprecated_requests_total", rule="old-users", phase="warn")
    assert rules["old-users"]["hits"]["warn"] == warned
    assert rules["legacy-export"]["effective_phase"] == "gone"

    # back to warn through the admin API (no token configured: the generated one)
    auth = deprecating_proxy.auth
    rule = deprecating_proxy.admin + "/deprecations/old-users"
    response = httpx.put(rule, json={"phase": "warn"}, headers=auth)
    assert response.status_code == 200, response.text
    assert httpx.get(url).status_code == 200
    bad = httpx.put(rule, json={"phase": "later"}, headers=auth)
    assert bad.status_code == 422 and "old-users" in bad.json()["detail"]
    assert client.hget("strangler:deprecations", "old-users") == "warn"
    assert httpx.delete(deprecating_proxy.admin + "/deprecations/old-users", headers=auth).status_code == 200
    assert client.hget("strangler:deprecations", "old-users") is None
