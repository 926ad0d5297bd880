"""What operators and the leader can rely on."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
import redis.asyncio as aioredis

from proxy.canary import events, records, statusview
from proxy.canary.analysis import History, Status, Window, assess
from proxy.canary.commands import summarize
from proxy.canary.rollout import COMPLETED, PAUSED, PROGRESSING, ROLLED_BACK
from proxy.canary.windows import read_windows
from proxy.control.keys import Keys
from proxy.control.store import ControlStore
from proxy.metrics import Metrics
from proxy.settings import CanaryThresholds, Settings
from tests.canary.helpers import canary, cli, refused_url
from tests.canary.test_loop import Rig, run
from tests.support import Backend, ProxyProcess, wait_until


def test_resume_after_a_manual_rollback_is_refused_and_after_a_manual_set_is_true(redis_url: str) -> None:
    """No more "progressing at 20%" while the split stays 0."""

    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", [10, 20, 40, 100], 60, "test")
        await rig.rollouts.promote("default", "test")
        await rig.control.set_split(0)  # `strangler rollback`
        state = await rig.rollouts.get("default")
        assert state is not None and (state.state, state.percentage) == (ROLLED_BACK, 0)
        try:
            await rig.rollouts.resume("default", "op")
            raise AssertionError("resume after a rollback must be refused")
        except Exception as exc:  # noqa: BLE001
            assert "start a new one" in str(exc)
        assert await rig.split() == "0"
        # a hand-set share pauses; resume carries on at the highest step not above it, and says so
        await rig.rollouts.start("default", [10, 20, 40, 100], 60, "test")
        await rig.control.set_split(30)
        state = await rig.rollouts.get("default")
        assert state is not None and (state.state, state.percentage, await rig.split()) == (PAUSED, 30, "30")
        resumed = await rig.rollouts.resume("default", "op")
        assert (resumed.state, resumed.percentage, await rig.split()) == (PROGRESSING, 20, "20")
        # promote after a hand-set 0 goes to the first step, not two steps up
        await rig.rollouts.pause("default", "op")
        await rig.redis.set("feature:v2_traffic_percentage", "0")
        for _ in range(2):
            await rig.second()
        promoted = await rig.rollouts.promote("default", "op")
        assert (promoted.percentage, await rig.split()) == (10, "10")

    run(redis_url, body)


def test_a_step_advances_only_after_its_hold_was_judged(redis_url: str) -> None:
    """Insufficient data adds no hold time; a returning v2 is judged first."""

    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", [10, 50, 100], 3, "test")
        for _ in range(10):  # v2 down: nothing reaches it (10 s, three holds' worth)
            await rig.second(v2=0)
        state = await rig.rollouts.get("default")
        assert state is not None and state.percentage == 10
        await rig.second()  # v2 back: only now does the hold start counting
        await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None and state.percentage == 10
        for _ in range(3):
            await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None and state.percentage == 50
        assert state.last["figures"]["judged_seconds"] >= 3

    run(redis_url, body)


def test_fallbacks_to_v1_count_against_v2(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    """v2 cannot be connected to, users get v1, the canary sees v2 failing."""
    v1, _ = v1v2
    proxy = proxy_factory(v1_url=v1.url, v2_url=refused_url(), redis_url=redis_url, canary=canary())
    r = redis.Redis.from_url(redis_url)
    r.set("feature:v2_traffic_percentage", "100")

    async def windows() -> tuple[int, int]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            w = (await read_windows(client, Keys(), ["default"], time.time() + 1, 30))["default"]["v2"]
            return w.requests, w.errors
        finally:
            await client.aclose()

    def failing_v2_counted() -> bool:
        for i in range(5):  # every user still gets an answer, from v1
            answer = httpx.get(proxy.url + "/t", headers={"X-User-ID": f"u{i}"})
            assert answer.status_code == 200 and answer.headers["x-api-version"] == "v1"
        return asyncio.run(windows())[1] >= 20

    wait_until(failing_v2_counted, timeout=20)
    requests, errors = asyncio.run(windows())
    assert requests == errors >= 20


def test_lost_redis_data_keeps_the_split_alerts_and_status_says_so(redis_url: str) -> None:
    """A FLUSHALL does not send a finished migration back to v1."""

    async def body(rig: Rig) -> None:
        store = ControlStore(Settings(redis_url=redis_url), rig.redis, Metrics())
        await rig.rollouts.start("default", [50, 100], 60, "test")
        await rig.rollouts.promote("default", "test")
        assert await store.refresh() and store.current.percentage("default") == 100
        await rig.second()  # the leader has seen the completed rollout
        await rig.redis.flushall()  # Redis restarted without its data
        assert await store.refresh()
        assert store.current.percentage("default") == 100  # still served
        assert store.state_lost_at is not None  # the admin /status shows it
        assert await rig.split() == "100"  # and written back
        await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None and (state.state, state.percentage) == (COMPLETED, 100)
        alerts = [e for e in rig.notifier.events if e.kind == "state_lost"]
        assert len(alerts) == 1 and alerts[0].severity == "critical"
        await rig.second()
        assert len([e for e in rig.notifier.events if e.kind == "state_lost"]) == 1
        status = await statusview.read_status(rig.redis, rig.keys, ["default"])
        line = summarize(status["groups"]["default"])["rollout"]
        assert line.startswith("REDIS LOST ITS DATA") and "default" in line
        await rig.control.set_split(100)  # a person acknowledges by setting the split
        status = await statusview.read_status(rig.redis, rig.keys, ["default"])
        assert summarize(status["groups"]["default"])["rollout"].startswith("completed")

    run(redis_url, body)


def test_the_lock_is_kept_through_a_check_longer_than_its_lifetime(redis_url: str) -> None:
    """The lock is renewed by its own task, not by the check."""

    async def body(rig: Rig) -> None:
        controller = rig.controller
        holders: list[str | None] = []

        async def slow_check(name: str, group: str) -> None:
            for _ in range(6):
                await asyncio.sleep(0.2)  # the check takes 1.2 s; the lock lives 0.3 s
                holders.append((await rig.redis.get(records.leader_key(rig.keys)) or b"").decode() or None)

        controller.race_hook = slow_check
        await rig.rollouts.start("default", [10, 100], 60, "test")
        await controller.start()
        try:
            await asyncio.sleep(0.05)
            assert controller.is_leader
            await controller.check_all()
        finally:
            await controller.stop()
        assert len(holders) >= 6 and set(holders) == {"test-leader"}

    run(redis_url, body, leader_lock_ttl_seconds=0.3, check_interval_seconds=60)


def test_a_proxy_wide_stall_is_an_error_not_a_failure() -> None:
    """Both versions above the absolute p95 limit says nothing about v2."""
    t = CanaryThresholds(min_requests=10, max_p95_seconds=0.5)
    slow = Window.of(100, 0, [2.0] * 100)
    assert assess(slow, slow, t, History()).status is Status.ERROR
    assert assess(Window.of(100, 0, [0.01] * 100), slow, t, History()).status is Status.FAIL
    assert assess(Window.of(3, 0, [2.0] * 3), slow, t, History()).status is Status.FAIL


def test_abort_on_a_completed_rollout_changes_nothing(redis_url: str) -> None:
    """Refused because of state: nothing written, one clear line, non-zero."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    base = ["--redis-url", redis_url]
    assert cli("rollout", "start", "--steps", "50,100", "--interval", "1h", *base).exit_code == 0
    assert cli("rollout", "promote", *base).exit_code == 0
    before = (r.get("strangler:rollout:default"), r.lrange("strangler:rollout:default:log", 0, -1))
    outbox = r.hlen(events.alerts_key(Keys()))
    result = cli("rollout", "abort", *base)
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "nothing to abort" in result.output
    assert "completed" in result.output and "100%" in result.output
    assert r.get("feature:v2_traffic_percentage") == "100"
    assert (r.get("strangler:rollout:default"), r.lrange("strangler:rollout:default:log", 0, -1)) == before
    assert r.hlen(events.alerts_key(Keys())) == outbox


def test_a_new_rollout_or_a_manual_change_starts_a_fresh_history(redis_url: str) -> None:
    """Failures and window seconds from before do not count."""

    async def body(rig: Rig) -> None:
        await rig.control.set_split(10)
        await rig.second()
        for _ in range(2):  # two failed checks: one short of a rollback
            await rig.second(v2_errors=20)
        assert (await rig.verdict())["consecutive_failures"] == 2
        await rig.rollouts.start("default", [10, 100], 3600, "test")
        await rig.second(v2=0, v1=0)  # the second the rollout started in
        await rig.second(v2_errors=20)  # one fresh failure: no rollback from the old streak
        verdict = await rig.verdict()
        assert verdict["consecutive_failures"] == 1 and verdict["v2"]["requests"] == 50
        state = await rig.rollouts.get("default")
        assert state is not None and state.state == PROGRESSING and await rig.split() == "10"
        await rig.second(v2_errors=20)
        assert (await rig.verdict())["consecutive_failures"] == 2
        await rig.control.set_split(20)  # a manual change: fresh again
        await rig.second(v2=0, v1=0)
        await rig.second(v2_errors=20)
        assert (await rig.verdict())["consecutive_failures"] == 1
        assert await rig.split() == "20"

    run(redis_url, body)


def test_the_embedded_redis_keeps_its_data_across_a_restart(tmp_path: Path) -> None:
    """A Redis restart must not lose the split: the product needs AOF persistence, and the embedded
    Redis has it."""
    from proxy.control.embedded import EmbeddedRedis

    first = EmbeddedRedis(tmp_path / "redis")
    client = redis.Redis.from_url(first.start())
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.set("feature:v2_traffic_percentage", "100")
    finally:
        client.close()
        first.stop()
    second = EmbeddedRedis(tmp_path / "redis")
    client = redis.Redis.from_url(second.start())
    try:
        assert client.get("feature:v2_traffic_percentage") == b"100"
    finally:
        client.close()
        second.stop()


def test_the_cli_rollback_and_set_during_a_rollout_end_or_pause_it(redis_url: str) -> None:
    """Through the real commands: the rollout state says what is served."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    base = ["--redis-url", redis_url]
    assert cli("rollout", "start", "--steps", "20,50,100", "--interval", "1h", *base).exit_code == 0
    assert cli("set", "35", *base).exit_code == 0
    state = json.loads(r.get("strangler:rollout:default") or "null")
    assert (state["state"], state["percentage"], r.get("feature:v2_traffic_percentage")) == (
        "paused",
        35,
        "35",
    )
    assert cli("rollback", *base).exit_code == 0
    state = json.loads(r.get("strangler:rollout:default") or "null")
    assert (state["state"], state["percentage"], r.get("feature:v2_traffic_percentage")) == (
        "rolled_back",
        0,
        "0",
    )
    resumed = cli("rollout", "resume", *base)
    assert resumed.exit_code == 2 and "start a new one" in resumed.output
    assert r.get("feature:v2_traffic_percentage") == "0"
