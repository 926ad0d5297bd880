"""Approvals end to end: the admin API, the CLI (Redis and --url) and Slack's signed button against
a real proxy, the session Redis and real HTTP. Every refusal is one line and writes nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import redis

from proxy.canary.slack import button_value, sign
from tests.admin.test_views import valid
from tests.canary.helpers import Traffic, canary, cli
from tests.support import Backend, ProxyProcess, wait_until

TOKEN = "approve-token"
SECRET = "slack-signing-secret"
STATE_KEY = "strangler:rollout:default"


@pytest.fixture()
def slack_proxy(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> ProxyProcess:
    v1, v2 = v1v2
    return proxy_factory(
        v1_url=v1.url, v2_url=v2.url, redis_url=redis_url, admin_token=TOKEN,
        canary=canary(slack_signing_secret=SECRET, slack_approvers=["U1", "U2"]),
    )  # fmt: skip


def click(group: str, hold: int, user: str = "U1", name: str = "alice") -> bytes:
    payload = {
        "type": "block_actions",
        "user": {"id": user, "username": name},
        "actions": [{"action_id": "strangler_approve", "value": button_value(group, hold)}],
    }
    return urlencode({"payload": json.dumps(payload)}).encode()


def signed(body: bytes, at: float | None = None, secret: str = SECRET) -> dict[str, str]:
    stamp = str(int(time.time() if at is None else at))
    return {
        "X-Slack-Request-Timestamp": stamp,
        "X-Slack-Signature": sign(secret, stamp, body),
        "Content-Type": "application/x-www-form-urlencoded",
    }


def test_approve_through_the_admin_api_and_slack_with_hostile_requests(
    slack_proxy: ProxyProcess, redis_url: str
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    http, admin, auth = slack_proxy.http, slack_proxy.admin, slack_proxy.auth

    def approve(body: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
        return http.post(
            admin + "/rollout/approve", json=body or {}, headers=auth if headers is None else headers
        )

    # no token; nothing to approve; unknown group; wrong types
    assert approve(headers={}).status_code == 401
    refused = approve()
    assert (
        refused.status_code == 409
        and refused.json()["detail"] == "no rollout for default: nothing to approve"
    )
    assert approve({"group": "nosuch"}).status_code == 404
    assert "hold_id must be an integer" in approve({"hold_id": "7"}).json()["detail"]
    assert "by must be" in approve({"by": "x" * 500}).json()["detail"]
    assert r.get(STATE_KEY) is None

    started = http.post(admin + "/rollout/start", json={"steps": "5!,100", "interval": "1h"}, headers=auth)
    assert started.status_code == 200, started.text
    state = started.json()
    assert state["approval_steps"] == [5] and state["awaiting_approval"] and state["percentage"] == 5
    hold = state["hold_id"]
    for ladder in ("5!!,100", "!5,100", "5,100!", ["5", "x!"], [True, 100], "1," * 2000 + "100"):
        answer = http.post(admin + "/rollout/start", json={"steps": ladder, "group": "default"}, headers=auth)
        assert answer.status_code == 409 and "\n" not in answer.json()["detail"], answer.text
    status = http.get(admin + "/canary/status", headers=auth).json()["groups"]["default"]["rollout"]
    assert status["awaiting_approval"] and status["awaiting_since"] == state["step_started_at"]

    before = r.get(STATE_KEY)
    slack_url = admin + "/slack/interactions"
    body = click("default", hold)
    hostile: list[tuple[bytes, dict[str, str], int, str]] = [
        (body, {}, 401, "missing X-Slack-Request-Timestamp"),
        (body, signed(body, secret="forged"), 401, "signature does not match"),
        (body, signed(body, at=time.time() - 400), 401, "more than 5 minutes"),
        (body, signed(body, at=time.time() + 400), 401, "more than 5 minutes"),
        (body, {**signed(body), "X-Slack-Request-Timestamp": "NaN"}, 401, "not a unix time"),
        (body + b"&x=1", signed(body), 401, "signature does not match"),  # body changed after signing
        (b"payload=%7Bnot-json", signed(b"payload=%7Bnot-json"), 400, "holding JSON"),
        (b"\xff\xfe", signed(b"\xff\xfe"), 400, "holding JSON"),
        (b"payload=%5B1%5D", signed(b"payload=%5B1%5D"), 400, "JSON object"),
        (
            click("default", hold, user="U9"),
            signed(click("default", hold, user="U9")),
            403,
            "U9 may not approve",
        ),
        (click("nosuch", hold), signed(click("nosuch", hold)), 404, "unknown group"),
        (click("default", hold + 5), signed(click("default", hold + 5)), 409, "stale approval"),
    ]
    huge = b"payload=" + b"a" * 300_000
    hostile.append((huge, signed(huge), 413, "larger than"))
    no_action = urlencode({"payload": json.dumps({"user": {"id": "U1"}, "actions": [{"x": 1}]})}).encode()
    hostile.append((no_action, signed(no_action), 400, "no strangler_approve action"))
    for raw, headers, code, words in hostile:
        answer = http.post(slack_url, content=raw, headers=headers)
        assert answer.status_code == code, (words, answer.text)
        assert words in answer.json()["detail"] and "\n" not in answer.json()["detail"]
        assert r.get(STATE_KEY) == before  # nothing written
    assert SECRET not in slack_proxy.output()

    ok = http.post(slack_url, content=body, headers=signed(body))
    assert ok.status_code == 200, ok.text
    approval = json.loads(r.get(STATE_KEY) or "{}")["approval"]
    assert approval["by"] == "slack alice (U1)" and approval["hold_id"] == hold
    replay = http.post(slack_url, content=body, headers=signed(body))  # a replay within 5 minutes
    assert replay.status_code == 409 and "already approved by slack alice (U1)" in replay.json()["detail"]
    again = approve()
    assert again.status_code == 409 and "already approved" in again.json()["detail"]
    log = [json.loads(x) for x in r.lrange("strangler:rollout:default:log", 0, -1)]
    assert [x["action"] for x in log].count("approved") == 1

    doc = http.get(admin + "/openapi.json", headers=auth).json()["paths"]
    assert doc["/_strangler/rollout/approve"]["post"]["security"] == [{"bearer": []}]
    assert "hold_id" in json.dumps(doc["/_strangler/rollout/approve"]["post"]["requestBody"])
    assert doc["/_strangler/slack/interactions"]["post"]["security"] == []


def test_slack_approvals_are_off_without_a_signing_secret(proxy: ProxyProcess) -> None:
    body = click("default", 1)
    answer = proxy.http.post(proxy.admin + "/slack/interactions", content=body, headers=signed(body))
    assert answer.status_code == 404 and "slack_signing_secret" in answer.json()["detail"]


def test_cli_approve_over_redis_and_the_admin_api(slack_proxy: ProxyProcess, redis_url: str) -> None:
    base = ["--redis-url", redis_url]
    early = cli("rollout", "approve", *base)
    assert early.exit_code == 2 and "no rollout for default" in early.output
    assert cli("rollout", "approve", "--group", "nosuch", *base).exit_code == 2
    assert cli("rollout", "start", "--steps", "5!,50!,100", "--interval", "1h", *base).exit_code == 0
    shown = cli("rollout", "status", *base)
    assert "awaiting approval since" in shown.output, shown.output
    watched = cli("rollout", "watch", "--timeout", "0.5s", *base)
    assert watched.exit_code == 1 and "awaiting approval since" in watched.output, watched.output
    assert "awaiting approval since" in cli("status", *base).output
    done = cli("rollout", "approve", "--by", "alice", *base)
    assert done.exit_code == 0 and "approved by alice (cli " in done.output, done.output
    twice = cli("rollout", "approve", *base)
    assert twice.exit_code == 2 and "already approved by alice" in twice.output
    assert len(twice.output.strip().splitlines()) == 1
    assert "approved by alice" in cli("rollout", "status", *base).output
    remote = ["--url", slack_proxy.url, "--token", TOKEN]
    assert cli("rollout", "promote", *remote).exit_code == 0  # a person moves on to 50!
    as_json = cli("rollout", "status", "--json", *remote)
    assert valid("rollout-status", as_json.output)["rollout"]["awaiting_approval"] is True
    assert valid("rollout-status", cli("rollout", "status", "--json", *base).output)["rollout"]["approval"]
    via_api = cli("rollout", "approve", "--by", "bob", "--json", *remote)
    assert via_api.exit_code == 0, via_api.output
    state = valid("rollout", via_api.output)
    assert state["source"]["path"] == "admin_api" and state["approval"]["by"].startswith("bob via admin api")
    wrong = cli("rollout", "approve", *remote)
    assert wrong.exit_code == 2 and "already approved by bob" in wrong.output


@pytest.mark.slow
def test_two_real_leaders_hold_then_step_once_after_one_approval(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    """Item 4 across a change of canary leader, with real processes: A leads to the hold and is
    killed (no hand-over: its lock expires); B holds too; one approval; B steps 10 -> 50 once."""
    v1, v2 = v1v2
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    settings = {
        "v1_url": v1.url, "v2_url": v2.url, "redis_url": redis_url, "admin_token": TOKEN, "process": True,
        "canary": canary(check_interval_seconds=0.25, window_seconds=3, thresholds={"min_requests": 5}),
    }  # fmt: skip
    a = proxy_factory(**settings)
    wait_until(lambda: r.get("strangler:canary:leader") is not None, timeout=10, message="a leader")
    leader_a = r.get("strangler:canary:leader")
    b = proxy_factory(**settings)
    base = ["--redis-url", redis_url]

    def rollout() -> dict[str, Any]:
        return dict(json.loads(r.get(STATE_KEY) or "{}"))

    def verdict() -> dict[str, Any]:
        return dict(json.loads(r.get("strangler:canary:verdict:default") or "{}"))

    with Traffic([a.url, b.url]):
        assert cli("rollout", "start", "--steps", "10!,50,100", "--interval", "0.5s", *base).exit_code == 0
        wait_until(lambda: verdict().get("step_hold", "").startswith("awaiting approval"), timeout=20)
        assert verdict()["leader"] == leader_a and rollout()["percentage"] == 10
        a.kill()
        killed = time.monotonic()
        wait_until(lambda: verdict().get("leader") not in (None, leader_a), timeout=20, message="B leads")
        takeover = time.monotonic() - killed
        wait_until(lambda: verdict().get("step_hold", "").startswith("awaiting approval"), timeout=20)
        assert rollout()["percentage"] == 10  # B holds too
        done = cli("rollout", "approve", "--by", "carol", "--url", b.url, "--token", TOKEN)
        assert done.exit_code == 0, done.output
        approved = time.monotonic()
        wait_until(lambda: rollout()["percentage"] >= 50, timeout=30, message="the step after approval")
        stepped = time.monotonic() - approved
    print(f"approval across leaders: B judged {takeover:.2f} s after A was killed (lock TTL 1.5 s); "
          f"step taken {stepped:.2f} s after the approval (check interval 0.25 s)")  # fmt: skip
    history = [json.loads(h) for h in reversed(r.lrange("strangler:rollout:default:log", 0, -1))]
    assert [h["action"] for h in history].count("approved") == 1
    moves = [
        (h["from"]["percentage"], h["to"]["percentage"]) for h in history if h["action"] == "step_advanced"
    ]
    assert moves[0] == (10, 50)  # never skipped
    first = next(h for h in history if h["action"] == "step_advanced")
    assert first["by"] != f"leader {leader_a}"
