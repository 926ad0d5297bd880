"""The ladder end to end, driven from the CLI, with alert targets that are down or hanging."""

from __future__ import annotations

import json
from collections.abc import Callable

import redis

from tests.canary.helpers import Blackhole, Traffic, canary, cli, refused_url
from tests.clirun import strangler
from tests.support import Backend, ProxyProcess, wait_until

LADDER = [1, 5, 10, 25, 50, 75, 90, 95, 100]


def test_rollout_walks_the_ladder_and_cli_controls_it_while_alert_targets_are_down(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    hole = Blackhole()
    notifiers = [{"kind": "webhook", "url": hole.url}, {"kind": "slack", "url": refused_url()}]
    proxy = proxy_factory(
        v1_url=v1.url, v2_url=v2.url, redis_url=redis_url,
        # at the 1% step v2 sees 1 request in 100: a longer window and a smaller minimum keep the
        # test independent of how many requests/s a loaded machine manages
        canary=canary(
            notifiers=notifiers, check_interval_seconds=0.25,
            window_seconds=4, thresholds={"min_requests": 5},
        ),
    )  # fmt: skip
    base = ["--redis-url", redis_url]
    try:
        with Traffic([proxy.url]) as traffic:
            steps = ",".join(f"{s:g}" for s in LADDER)
            assert cli("rollout", "start", "--steps", steps, "--interval", "0.3s", *base).exit_code == 0
            # every alert hangs for the full timeout and is retried: if delivery blocked the leader or
            # the proxy, the ladder could not finish before the alerts give up
            watched = cli("rollout", "watch", "--timeout", "40s", *base)
            assert watched.exit_code == 0, watched.output
            assert "completed" in watched.output
        assert r.get("feature:v2_traffic_percentage") == "100"
        history = [json.loads(h) for h in reversed(r.lrange("strangler:rollout:default:log", 0, -1))]
        assert [h["to"]["percentage"] for h in history] == LADDER
        assert all(h["figures"]["verdict"] == "pass" for h in history[1:])  # advanced on PASS only
        assert traffic.statuses.keys() == {200} and traffic.failures == 0
        assert traffic.versions["v1"] > 0 and traffic.versions["v2"] > 0
        wait_until(
            lambda: proxy.metric("strangler_alerts_total", target="slack", outcome="failed") >= 1, timeout=10
        )
        assert proxy.metric("strangler_alerts_total", outcome="sent") == 0
        # nothing was lost: the alerts the targets never took are still in the durable outbox
        assert r.hlen("strangler:canary:alerts") >= 1
    finally:
        hole.close()

    # the manual controls
    def rollout() -> dict[str, object]:
        return json.loads(r.get("strangler:rollout:default") or "null")

    assert cli("rollout", "start", "--steps", "10,50,100", "--interval", "1h", *base).exit_code == 0
    assert cli("rollout", "start", "--steps", "10,100", *base).exit_code == 2  # one at a time
    assert cli("rollout", "promote", *base).exit_code == 0
    assert rollout()["percentage"] == 50 and r.get("feature:v2_traffic_percentage") == "50"
    assert cli("rollout", "pause", *base).exit_code == 0
    assert rollout()["state"] == "paused"
    assert cli("rollout", "pause", *base).exit_code == 2
    assert cli("rollout", "resume", *base).exit_code == 0
    assert rollout()["state"] == "progressing"
    assert cli("rollout", "promote", "--full", *base).exit_code == 0
    assert rollout()["state"] == "completed" and r.get("feature:v2_traffic_percentage") == "100"
    assert cli("rollout", "start", "--steps", "10,100", "--interval", "1h", *base).exit_code == 0
    aborted = cli("rollout", "abort", *base)
    assert aborted.exit_code == 0 and "rolled_back" in aborted.output
    assert rollout()["state"] == "rolled_back" and r.get("feature:v2_traffic_percentage") == "0"

    # status shows rollout, last check and last decision
    shown = strangler("rollout", "status", "--json", *base)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["rollout"]["state"] == "rolled_back" and status["leader"]
    assert status["verdict"]["status"] in ("pass", "insufficient_data")
    assert cli("status", *base).exit_code == 0
    rows = json.loads(cli("status", "--json", *base).output)["groups"]
    assert rows[0]["rollout"]["state"] == "rolled_back" and rows[0]["verdict"] is not None


def test_set_with_verify_keeps_a_healthy_value_and_restores_on_failure(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    proxy = proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=redis_url, canary=canary())
    base = ["--redis-url", redis_url]
    r.set("feature:v2_traffic_percentage", "5")
    with Traffic([proxy.url]):
        # the proxy's windows hold answers of both versions before the watch starts (on a loaded
        # machine the first flush can come after a 2 s watch: "insufficient data", not verified)
        wait_until(
            lambda: json.loads(r.get("strangler:canary:verdict:default") or "{}").get("status") == "pass",
            timeout=20, message="a passing check with enough data",
        )  # fmt: skip
        ok = cli("set", "30", "--verify", "2s", *base)
        assert ok.exit_code == 0, ok.output
        assert "verified" in ok.output and r.get("feature:v2_traffic_percentage") == "30"
        v2.control(error_rate=0.5)
        bad = cli("set", "50", "--verify", "5s", *base)
        assert bad.exit_code == 1
        assert r.get("feature:v2_traffic_percentage") in ("30", "0")  # restored (or the leader acted)


def test_admin_api_rollout_endpoints_are_token_protected(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    import httpx

    v1, v2 = v1v2
    proxy = proxy_factory(
        v1_url=v1.url, v2_url=v2.url, redis_url=redis_url, admin_token="s3cret", canary=canary()
    )
    auth = {"Authorization": "Bearer s3cret"}
    start = {"steps": [5, 50, 100], "interval": "1h"}
    assert httpx.post(proxy.admin + "/rollout/start", json=start).status_code == 401
    assert httpx.get(proxy.admin + "/rollout").status_code == 404  # reads need no token; none yet
    started = httpx.post(proxy.admin + "/rollout/start", json=start, headers=auth)
    assert started.status_code == 200 and started.json()["percentage"] == 5
    assert httpx.post(proxy.admin + "/rollout/start", json=start, headers=auth).status_code == 409
    assert httpx.post(proxy.admin + "/rollout/pause", json={"group": "nope"}, headers=auth).status_code == 404
    assert httpx.post(proxy.admin + "/rollout/pause", headers=auth).json()["state"] == "paused"
    assert httpx.post(proxy.admin + "/rollout/resume", headers=auth).json()["state"] == "progressing"
    assert httpx.post(proxy.admin + "/rollout/promote", headers=auth).json()["percentage"] == 50
    done = httpx.post(proxy.admin + "/rollout/promote", json={"full": True}, headers=auth).json()
    assert (done["state"], done["percentage"]) == ("completed", 100)
    assert httpx.get(proxy.admin + "/rollout").json()["state"] == "completed"
    wait_until(lambda: httpx.get(proxy.admin + "/canary/status").json()["this_process"]["leader"], timeout=5)
    status = httpx.get(proxy.admin + "/canary/status").json()
    assert status["groups"]["default"]["rollout"]["state"] == "completed"
    assert status["groups"]["default"]["split_raw"] == "100"
    assert httpx.post(proxy.admin + "/rollout/abort", headers=auth).status_code == 409  # nothing active
