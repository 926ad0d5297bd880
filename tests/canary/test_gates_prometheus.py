"""Metric gates against a real Prometheus (``/usr/bin/prometheus``, Debian package ``prometheus``;
scripts/test installs it in CI) scraping a tiny exporter served by the test every second.

- The exporter's business metric goes bad: the leader of a real proxy puts v2 at 0% through the
  gate (the time from the flip, and from Prometheus first answering the bad value, is printed).
- The metrics store answers nothing (a series that does not exist) or is down: no advance and no
  rollback, while the same rollout with the store answering a good value completes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from proxy.canary.rollout import COMPLETED, PROGRESSING
from tests.canary.gate_servers import Exporter
from tests.canary.helpers import Traffic, canary, cli
from tests.canary.test_loop import Rig, run
from tests.support import ProxyProcess, free_port, wait_until

QUERY = 'min(shop_checkout_success_ratio{group="{{group}}",version="{{version}}"})'


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is None:
        pytest.skip(
            "prometheus not installed (scripts/test installs it in CI as root: apt-get install prometheus)"
        )
    return found


@dataclass
class Prometheus:
    url: str
    exporter: Exporter
    process: subprocess.Popen[bytes]

    def value(self, query: str) -> float | None:
        answer = httpx.get(self.url + "/api/v1/query", params={"query": query}, timeout=2).json()
        result = answer["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture()
def prometheus(tmp_path: Path) -> Iterator[Prometheus]:
    binary = prometheus_binary()
    with Exporter() as exporter:
        target = exporter.url.removeprefix("http://")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "shop", "static_configs": [{"targets": [target]}]}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        process = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        running = Prometheus(f"http://127.0.0.1:{port}", exporter, process)
        try:
            wait_until(lambda: httpx.get(running.url + "/-/ready", timeout=1).status_code == 200, timeout=30)
            wait_until(lambda: running.value("shop_checkout_success_ratio") == 1.0, timeout=30,
                       message="the exporter scraped")  # fmt: skip
            yield running
        finally:
            running.stop()


def gate(address: str, query: str = QUERY, **extra: Any) -> dict[str, Any]:
    return {"kind": "prometheus", "name": "checkout", "address": address, "query": query,
            "condition": "result >= 0.95", **extra}  # fmt: skip


def test_a_failing_prometheus_gate_puts_v2_at_zero(
    prometheus: Prometheus, start_proxy: Callable[..., ProxyProcess], redis_url: str
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    settings = canary(gates={"default": [gate(prometheus.url)]})
    interval = settings["check_interval_seconds"]
    proxy = start_proxy(canary=settings)
    result = cli("rollout", "start", "--steps", "10,100", "--interval", "1h", "--redis-url", redis_url)
    assert result.exit_code == 0, result.output

    def gate_status() -> str | None:
        verdict = json.loads(r.get("strangler:canary:verdict:default") or "{}")
        return (verdict.get("gates") or [{}])[0].get("status")

    with Traffic([proxy.url], concurrency=2):
        wait_until(lambda: gate_status() == "pass", timeout=20, message="the gate passes first")
        flipped = time.monotonic()
        prometheus.exporter.set(0.5)  # checkout success drops to 50%; v2's own answers stay healthy
        seen_by_prometheus = None
        while time.monotonic() - flipped < 30 and r.get("feature:v2_traffic_percentage") != "0":
            if seen_by_prometheus is None and prometheus.value("shop_checkout_success_ratio") == 0.5:
                seen_by_prometheus = time.monotonic()
            time.sleep(0.02)
        rolled_back = time.monotonic()
    assert r.get("feature:v2_traffic_percentage") == "0", "no rollback within 30 s"
    decision = json.loads(r.get("strangler:canary:decision:default") or "{}")
    assert decision["failed_check"] == "gate:checkout" and decision["from_percentage"] == 10
    assert decision["reason"] == "gate checkout: 0.5 fails 'result >= 0.95'"
    assert json.loads(r.get("strangler:rollout:default") or "{}")["state"] == "rolled_back"
    wait_until(lambda: proxy.metric("strangler_rollbacks_total", reason="gate:checkout") == 1, timeout=5)
    assert proxy.metric("strangler_canary_gate_checks_total", gate="checkout", result="fail") >= 1
    assert prometheus.url not in proxy.metrics()
    from_flip = rolled_back - flipped
    from_store = rolled_back - (seen_by_prometheus or flipped)
    print(
        f"\nprometheus gate: v2 at 0% {from_flip:.2f}s after the exporter flipped, {from_store:.2f}s after "
        f"Prometheus first answered the bad value (check interval {interval}s, scrape 1s; "
        "target: interval + 2s)"
    )
    assert from_store > 0


def leader_moves(history: list[dict[str, Any]]) -> list[str]:
    """What the leader did to the rollout (advances, completion, rollbacks), newest first."""
    return [h["action"] for h in history if str(h.get("by", "")).startswith("leader")]


def test_a_prometheus_store_empty_or_down_never_advances_and_never_rolls_back(
    prometheus: Prometheus, redis_url: str
) -> None:
    absent = 'min(shop_checkout_success_ratio{group="{{group}}",version="v9"})'  # no such series: empty

    async def empty(rig: Rig) -> None:
        await rig.rollouts.start("default", [50, 100], 2, "test")
        for _ in range(30):  # fifteen holds of healthy v2 traffic
            await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None and (state.state, state.percentage) == (PROGRESSING, 50)
        assert leader_moves(await rig.rollouts.history("default", 50)) == [] and await rig.split() == "50"
        verdict = await rig.verdict()
        assert verdict["gates"][0]["status"] == "inconclusive"
        assert verdict["gates"][0]["reason"] == "no data (empty result)"
        assert "rolled_back" not in rig.notifier.kinds()

    run(redis_url, empty, gates={"default": [gate(prometheus.url, absent)]})
    redis.Redis.from_url(redis_url).flushall()

    async def good_then_down(rig: Rig) -> None:
        await rig.rollouts.start("default", [50, 100], 2, "test")
        for _ in range(10):
            await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None and state.state == COMPLETED  # the same rollout advances when it can
        await rig.rollouts.start("default", [50, 100], 2, "test")
        prometheus.stop()
        for _ in range(30):
            await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None and (state.state, state.percentage) == (PROGRESSING, 50)
        assert await rig.split() == "50"
        verdict = await rig.verdict()
        assert verdict["gates"][0]["status"] == "inconclusive"
        assert verdict["gates"][0]["reason"].startswith("unreachable")
        assert "rolled_back" not in rig.notifier.kinds()
        # the leader's only move is the first rollout's completion (50 -> 100): none since
        assert leader_moves(await rig.rollouts.history("default", 50)) == ["completed"]

    run(redis_url, good_then_down, gates={"default": [gate(prometheus.url)]})


def test_end_to_end_a_rollout_holds_while_prometheus_is_empty_then_down(
    prometheus: Prometheus, start_proxy: Callable[..., ProxyProcess], redis_url: str
) -> None:
    """A real proxy and leader, a one-second hold per step, healthy v2 traffic: while the gate's
    query answers nothing, then while Prometheus is stopped, ten checks each leave the rollout at
    its first step with no rollback."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    absent = 'min(shop_checkout_success_ratio{group="{{group}}",version="v9"})'
    proxy = start_proxy(canary=canary(gates={"default": [gate(prometheus.url, absent)]}))
    result = cli("rollout", "start", "--steps", "50,100", "--interval", "1s", "--redis-url", redis_url)
    assert result.exit_code == 0, result.output

    def inconclusive() -> float:
        return proxy.metric("strangler_canary_gate_checks_total", gate="checkout", result="inconclusive")

    def verdict() -> dict[str, Any]:
        return json.loads(r.get("strangler:canary:verdict:default") or "{}")

    with Traffic([proxy.url], concurrency=2):
        for phase, says in (("empty", "no data (empty result)"), ("down", "unreachable (")):
            if phase == "down":
                prometheus.stop()
            start = inconclusive()
            wait_until(lambda s=says: (verdict().get("gates") or [{}])[0].get("reason", "").startswith(s),
                       timeout=20, message=f"the gate sees the store {phase}")  # fmt: skip
            wait_until(lambda s=start: inconclusive() >= s + 10, timeout=30, message="ten more checks")
            assert "holding" in verdict()["reason"] and verdict()["v2"]["requests"] >= 10
            rollout = json.loads(r.get("strangler:rollout:default") or "{}")
            assert (rollout["state"], rollout["percentage"]) == ("progressing", 50), phase
            assert r.get("feature:v2_traffic_percentage") == "50"
    assert r.get("strangler:canary:decision:default") is None
    assert proxy.metric("strangler_rollbacks_total") == 0
