"""The leader loop driven by ``tick()`` with injected clocks against a real Redis: a whole rollout
takes milliseconds. Traffic is fed through the real recorder and flusher."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.canary import records
from proxy.canary.controller import CanaryController
from proxy.canary.events import Event
from proxy.canary.leader import LeaderLock
from proxy.canary.notify.base import Outcome
from proxy.canary.notify.courier import Courier
from proxy.canary.rollout import COMPLETED, PAUSED, PROGRESSING, ROLLED_BACK, RolloutError, Rollouts
from proxy.canary.windows import WindowFlusher, WindowRecorder, read_windows
from proxy.control.client import ControlClient
from proxy.control.keys import Keys
from proxy.metrics import Metrics
from proxy.parity.store import tables_behind
from proxy.settings import Settings
from proxy.shadow.report import ReportStore

LADDER = [1, 5, 10, 25, 50, 75, 90, 95, 100]


class Clock:
    """One clock for monotonic and wall time; tests move it by hand."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Collected:
    """A Notifier with one target that takes every alert and keeps it."""

    targets = ("collect",)

    def __init__(self) -> None:
        self.events: list[Event] = []

    def wants(self, target: str, event: Event) -> bool:
        return True

    async def attempt(self, target: str, event: Event) -> Outcome:
        self.events.append(event)
        return "sent"

    def gave_up(self, target: str) -> None:
        raise AssertionError("never fails")

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


class Rig:
    def __init__(self, redis_url: str, **canary: Any) -> None:
        options = {
            "window_seconds": 5, "check_interval_seconds": 1, "consecutive_failures": 3,
            "step_interval_seconds": 10, "insufficient_data_alert_seconds": 30,
            "thresholds": {"min_requests": 20},
        }  # fmt: skip
        options.update(canary)
        self.settings = Settings(redis_url=redis_url, canary=options)
        self.redis = aioredis.Redis.from_url(redis_url)
        self.keys = Keys()
        self.clock = Clock()
        self.metrics = Metrics()
        self.notifier = Collected()
        self.rollouts = Rollouts(self.redis, self.keys, self.clock)
        self.control = ControlClient(self.redis, self.keys, self.rollouts.manual_split)
        self.recorder = WindowRecorder()
        self.flusher = WindowFlusher(self.recorder, self.redis, self.keys, self.settings.canary, self.clock)
        self.controller = self.new_controller()

    def new_controller(self, identity: str = "test-leader") -> CanaryController:
        """A leader process; building a new one is what a crash and restart looks like."""
        self.controller = CanaryController(
            self.settings, self.redis, self.keys, self.control, self.metrics,
            self.rollouts, clock=self.clock, wall=self.clock, identity=identity,
            shadow_totals=ReportStore(self.redis, self.keys).group_totals,
            parity_behind=functools.partial(tables_behind, self.redis, self.keys),
        )  # fmt: skip
        self.courier = Courier(
            self.redis, self.keys, self.notifier, self.settings.canary, self.metrics,
            lambda: self.controller.is_leader, wall=self.clock,
        )  # fmt: skip
        return self.controller

    async def tick(self) -> None:
        """The leader's tick and its courier's."""
        await self.controller.tick()
        await self.courier.tick()

    def traffic(self, v1: int, v2: int, v2_errors: int = 0, v2_seconds: float = 0.01) -> None:
        for _ in range(v1):
            self.recorder.record("default", "v1", 200, 0.01)
        for i in range(v2):
            self.recorder.record("default", "v2", 500 if i < v2_errors else 200, v2_seconds)

    async def second(self, v1: int = 50, v2: int = 50, **kw: Any) -> None:
        """One second of life: traffic, flush, clock, leader tick."""
        self.traffic(v1, v2, **kw)
        await self.flusher.tick()
        self.clock.advance(1)
        await self.tick()

    async def split(self) -> str | None:
        return (await self.control.get_split(["default"]))["default"]

    async def verdict(self) -> dict[str, Any]:
        return json.loads(await self.redis.get(records.verdict_key(self.keys, "default")))


def run(redis_url: str, body: Callable[[Rig], Awaitable[None]], **canary: Any) -> None:
    async def go() -> None:
        rig = Rig(redis_url, **canary)
        try:
            await body(rig)
        finally:
            await rig.redis.aclose()

    asyncio.run(go())


def test_windows_sum_every_replica_and_expire(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        other = WindowRecorder(count_4xx_as_errors=True)
        other_flusher = WindowFlusher(other, rig.redis, rig.keys, rig.settings.canary, rig.clock)
        rig.traffic(10, 10, v2_errors=2)
        other.record("default", "v2", 404, 0.2)
        other.record("default", "v2", 200, 0.2)
        assert await rig.flusher.tick() == 2 and await other_flusher.tick() == 1
        assert await rig.flusher.tick() == 0  # nothing new: no write
        windows = (await read_windows(rig.redis, rig.keys, ["default"], rig.clock() + 1, 5))["default"]
        assert (windows["v1"].requests, windows["v2"].requests, windows["v2"].errors) == (10, 12, 3)
        assert sum(windows["v2"].buckets) == 12
        key = f"strangler:win:default:v2:{int(rig.clock())}"
        assert 0 < await rig.redis.ttl(key) <= 2 * 5 + 1 + 10
        later = (await read_windows(rig.redis, rig.keys, ["default"], rig.clock() + 7, 5))["default"]
        assert later["v2"].requests == 0  # outside the window

    run(redis_url, body)


def test_leader_lock_is_exclusive_renewed_by_token_and_taken_over_after_expiry(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        a = LeaderLock(rig.redis, "strangler:canary:leader", 0.3, "a")
        b = LeaderLock(rig.redis, "strangler:canary:leader", 0.3, "b")
        assert await a.ensure() and not await b.ensure()
        assert await a.ensure()  # renewal
        await b.release()  # not b's: must not free a's lock
        assert await a.holder() == "a"
        await asyncio.sleep(0.4)  # a stops renewing (dies): b takes over after the TTL
        assert await b.ensure() and await b.holder() == "b"
        assert not await a.ensure()  # a's stale renewal fails and it knows it lost
        await b.release()
        assert await a.ensure()

    run(redis_url, body)


def test_rollout_walks_the_ladder_on_passing_checks(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", LADDER, 10, "test")
        assert await rig.split() == "1"
        seen = []
        for _ in range(200):
            await rig.second()
            state = await rig.rollouts.get("default")
            assert state is not None
            if not seen or seen[-1] != state.percentage:
                seen.append(state.percentage)
            if state.state == COMPLETED:
                break
        assert seen == LADDER
        assert await rig.split() == "100"
        history = await rig.rollouts.history("default", 50)
        advances = [h for h in history if h["by"].startswith("leader")]
        assert len(advances) == len(LADDER) - 1
        assert all(h["figures"]["verdict"] == "pass" and h["figures"]["v2"]["requests"] > 0 for h in advances)
        assert rig.notifier.kinds().count("step_advanced") == len(LADDER) - 2
        assert rig.notifier.kinds()[0] == "started" and rig.notifier.kinds()[-1] == "completed"
        assert rig.metrics.rollout_step.labels("default")._value.get() == 100

    run(redis_url, body)


def test_insufficient_data_neither_advances_nor_rolls_back_and_alerts_once(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", [50, 100], 2, "test")
        for _ in range(40):
            await rig.second(v1=3, v2=3, v2_errors=3)  # all failing, but far too few to judge
        state = await rig.rollouts.get("default")
        assert state is not None and state.state == PROGRESSING and state.percentage == 50
        assert await rig.split() == "50"
        verdict = await rig.verdict()
        assert verdict["status"] == "insufficient_data" and not verdict["rollback"]
        assert rig.notifier.kinds().count("insufficient_data") == 1

    run(redis_url, body)


def test_rollback_after_consecutive_failures_traffic_first_then_decision(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", [10, 100], 3600, "test")
        await rig.second()  # the second the rollout started in is not judged (fresh history)
        await rig.second()  # healthy
        assert (await rig.verdict())["status"] == "pass"
        for expected in (1, 2):
            await rig.second(v2_errors=15)
            assert (await rig.verdict())["consecutive_failures"] == expected
            assert await rig.split() == "10"
        await rig.second(v2_errors=15)
        assert await rig.split() == "0"
        state = await rig.rollouts.get("default")
        assert state is not None and state.state == ROLLED_BACK
        decision = json.loads(await rig.redis.get(records.decision_key(rig.keys, "default")))
        assert decision["failed_check"] == "error_rate" and decision["from_percentage"] == 10
        assert decision["v2"]["error_rate"] > 0.05 and decision["v1"]["error_rate"] == 0
        assert decision["thresholds"]["max_error_rate"] == 0.05
        assert rig.metrics.rollbacks.labels("default", "error_rate")._value.get() == 1
        assert rig.notifier.kinds()[-1] == "rolled_back"
        # the failing seconds are not judged again: no second rollback, and a retry that is
        # healthy resolves the incident
        for _ in range(3):
            await rig.second(v2=0)
        assert rig.notifier.kinds().count("rolled_back") == 1
        await rig.control.set_split(10)
        for _ in range(2):
            await rig.second()
        assert "recovered" in rig.notifier.kinds()

    run(redis_url, body)


def test_latency_rollback_and_pause_resume_promote_abort(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        r = rig.rollouts
        await r.start("default", [1, 5, 10, 100], 5, "test")
        with pytest.raises(RolloutError):
            await r.start("default", [1, 100], 5, "test")
        await r.pause("default", "test")
        for _ in range(10):
            await rig.second()
        state = await r.get("default")
        assert state is not None and (state.state, state.percentage) == (PAUSED, 1)
        with pytest.raises(RolloutError):
            await r.pause("default", "test")
        await r.resume("default", "test")
        assert (await r.promote("default", "test")).percentage == 5
        assert await rig.split() == "5"
        for _ in range(4):
            await rig.second(v2_seconds=0.3)  # 30x slower than v1: fails the 1.5x ratio
        assert await rig.split() == "0"
        decision = json.loads(await rig.redis.get(records.decision_key(rig.keys, "default")))
        assert decision["failed_check"] == "p95_ratio"
        await r.start("default", [1, 5, 10, 100], 5, "test")
        assert (await r.promote("default", "test", full=True)).state == COMPLETED
        assert await rig.split() == "100"
        await r.start("default", [1, 5, 10, 100], 5, "test")
        await r.promote("default", "test")
        aborted = await r.abort("default", "test")
        assert aborted.state == ROLLED_BACK and await rig.split() == "0"
        await rig.tick()  # the leader sends what people did, too
        assert {"paused", "resumed", "aborted"} <= set(rig.notifier.kinds())
        assert rig.metrics.rollbacks.labels("default", "aborted")._value.get() == 1

    run(redis_url, body)


def test_non_leader_does_nothing(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        other = LeaderLock(rig.redis, records.leader_key(rig.keys), 30, "someone-else")
        assert await other.ensure()
        await rig.rollouts.start("default", [10, 100], 1, "test")
        for _ in range(5):
            await rig.second(v2_errors=50)
        assert not rig.controller.is_leader
        assert await rig.split() == "10"
        assert await rig.redis.get(records.verdict_key(rig.keys, "default")) is None

    run(redis_url, body)


def test_shadow_mismatch_gate_reads_the_shadow_report_when_present(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        await rig.control.set_split(10)
        await rig.second()  # the second of the change is not judged (fresh history)
        await rig.second()
        assert (await rig.verdict())["status"] == "pass"  # gate configured, no report: ignored
        await rig.redis.sadd("strangler:diffs:endpoints", "GET /t", "GET /u")
        await rig.redis.hset(
            "strangler:diffs:counts:GET /t", mapping={"compared": 100, "mismatched": 30, "group": "default"}
        )
        await rig.redis.hset(
            "strangler:diffs:counts:GET /u", mapping={"compared": 100, "mismatched": 0, "group": "default"}
        )
        await rig.second()
        verdict = await rig.verdict()
        assert verdict["status"] == "fail" and verdict["failed_check"] == "shadow_mismatch", verdict

    run(redis_url, body, thresholds={"min_requests": 20, "max_shadow_mismatch_rate": 0.1})


def test_redis_down_holds_without_raising_and_keeps_counts(redis_factory: Callable[[], Any]) -> None:
    server = redis_factory()

    async def body(rig: Rig) -> None:
        await rig.second()
        assert rig.controller.is_leader
        server.kill()
        rig.traffic(7, 3)
        assert await rig.flusher.tick() == 0  # failed: counts kept for the next flush
        await rig.controller.tick()  # no exception, no decision
        assert not rig.controller.is_leader
        drained = rig.recorder.drain()
        assert drained["default"]["v1"][0] == 7 and drained["default"]["v2"][0] == 3

    async def go() -> None:
        rig = Rig(server.url)  # the client below times out at 0.3 s
        rig.redis = aioredis.Redis.from_url(server.url, socket_timeout=0.3, socket_connect_timeout=0.3)
        rig.flusher._redis = rig.redis
        rig.rollouts = Rollouts(rig.redis, rig.keys, rig.clock)
        rig.control = ControlClient(rig.redis, rig.keys, rig.rollouts.manual_split)
        rig.new_controller("t")
        try:
            await body(rig)
        finally:
            await rig.redis.aclose()

    asyncio.run(go())


def test_a_split_changed_by_hand_pauses_the_rollout_instead_of_raising_it_again(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", [10, 50, 100], 2, "test")
        await rig.second()
        await rig.redis.set("feature:v2_traffic_percentage", "0")  # redis-cli, not our tools
        for _ in range(5):
            await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None and state.state == PAUSED and state.last["by"] == "leader"
        assert state.percentage == 0 and await rig.split() == "0"
        assert "split was changed to 0" in rig.notifier.events[-1].message

    run(redis_url, body)
