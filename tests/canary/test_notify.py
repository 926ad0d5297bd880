"""Alert payloads, severity filters and the durable outbox (retries, backoff, critical first,
hand-over to the next leader), against a local receiver and the real session Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.canary import events
from proxy.canary.notify.base import NopNotifier
from proxy.canary.notify.courier import Courier
from proxy.canary.notify.dispatch import Dispatcher
from proxy.canary.notify.factory import build_notifier
from proxy.control.keys import Keys
from proxy.metrics import Metrics
from proxy.settings import CanarySettings, ConfigError, NotifierTarget, load_settings
from tests.canary.helpers import Receiver, refused_url


def rolled_back() -> events.Event:
    return events.make(
        "rolled_back", "api", "api rolled back from 10% to 0%: v2 error rate 20.00% above 5.00%", "leader x",
        failed_check="error_rate", v1={"requests": 900, "error_rate": 0.0},
        v2={"requests": 100, "error_rate": 0.2},
    )  # fmt: skip


def settings(*targets: dict[str, object], **extra: object) -> CanarySettings:
    options = {"notify_backoff_seconds": 0.05, "notify_timeout_seconds": 0.5, "notify_retries": 2, **extra}
    return CanarySettings(notifiers=[NotifierTarget(**t) for t in targets], **options)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def with_redis(redis_url: str, body: Callable[[aioredis.Redis, Keys], Awaitable[None]]) -> None:
    async def go() -> None:
        redis = aioredis.Redis.from_url(redis_url)
        try:
            await body(redis, Keys())
        finally:
            await redis.aclose()

    asyncio.run(go())


def courier(redis: aioredis.Redis, notifier: Any, canary: CanarySettings, clock: Clock) -> Courier:
    return Courier(redis, Keys(), notifier, canary, Metrics(), lambda: True, wall=clock)


def test_payload_formats_and_severity_filter(redis_url: str) -> None:
    metrics = Metrics()
    with Receiver() as rx:
        notifier = build_notifier(
            settings(
                {"kind": "slack", "url": rx.url + "/slack"},
                {"kind": "pagerduty", "url": rx.url + "/pd", "routing_key": "KEY"},
                {"kind": "webhook", "url": rx.url + "/hook", "min_severity": "critical"},
            ),
            metrics,
        )
        assert isinstance(notifier, Dispatcher)
        advanced = events.make("step_advanced", "api", "rollout of api advanced 5% -> 10%", "leader x")
        advanced = events.Event(**{**advanced.__dict__, "at": 1.0})
        recovered = events.make("recovered", "api", "v2 passes the checks again for api", "leader x")
        back = rolled_back()

        async def body(redis: aioredis.Redis, keys: Keys) -> None:
            for event in (advanced, back, recovered):
                await events.enqueue(redis, keys, event)
            c = Courier(redis, keys, notifier, settings(), Metrics(), lambda: True)
            assert await c.tick() == 3
            assert await events.pending(redis, keys) == []
            await notifier.stop()

        with_redis(redis_url, body)
    slack = rx.bodies("/slack")
    # critical first, then oldest first
    assert [b["attachments"][0]["title"].split()[0] for b in slack] == [
        "rolled_back",
        "step_advanced",
        "recovered",
    ]
    assert slack[0]["text"].startswith("[strangler] api rolled back")
    assert {"title": "group", "value": "api", "short": True} in slack[0]["attachments"][0]["fields"]
    trigger, resolve = rx.bodies("/pd")  # only incidents: trigger on rollback, resolve on recovery
    assert trigger["event_action"] == "trigger" and trigger["routing_key"] == "KEY"
    assert trigger["payload"]["severity"] == "critical" and trigger["payload"]["component"] == "api"
    assert trigger["payload"]["custom_details"]["v2"]["error_rate"] == 0.2
    assert resolve == {"routing_key": "KEY", "event_action": "resolve", "dedup_key": trigger["dedup_key"]}
    (hook,) = rx.bodies("/hook")  # min_severity critical: only the rollback
    assert hook["event"] == "rolled_back" and hook["source"] == "strangler" and hook["at"].endswith("+00:00")
    assert hook["id"] == back.id  # the dedup key
    assert metrics.alerts.labels("slack", "sent")._value.get() == 3


def test_a_critical_alert_survives_a_failing_target_and_the_leaders_death(redis_url: str) -> None:
    """An alert is removed only after delivery, picked up by the next leader, backoff kept
    in Redis across the hand-over, critical first, never given up; others give up after retries."""
    with Receiver() as rx:
        canary = settings({"kind": "webhook", "url": rx.url + "/hook"}, notify_retries=1)
        clock = Clock()
        critical = rolled_back()

        async def body(redis: aioredis.Redis, keys: Keys) -> None:
            rx.failing = True
            old_notifier = build_notifier(canary, Metrics())
            old = courier(redis, old_notifier, canary, clock)
            info = events.make("step_advanced", "api", "advanced", "leader x")
            await events.enqueue(redis, keys, info)
            await events.enqueue(redis, keys, critical)
            assert await old.tick() == 0
            queued = {p.event.id: p for p in await events.pending(redis, keys)}
            # critical first; a target that failed is probed once per round, so the info alert waits
            assert queued[critical.id].attempts == 1 and queued[info.id].attempts == 0
            next_due = await redis.zscore(events.due_key(keys), critical.id)
            assert next_due == pytest.approx(clock.now + 0.05)
            await old_notifier.stop()  # type: ignore[union-attr]
            del old  # the leader dies (SIGKILL: no shutdown, nothing flushed)

            new_notifier = build_notifier(canary, Metrics())
            new = courier(redis, new_notifier, canary, clock)
            clock.now += 0.01
            assert await new.tick() == 0
            assert (await redis.zscore(events.due_key(keys), critical.id)) == next_due  # backoff kept
            for _ in range(5):  # the target stays down: a critical alert is never given up
                clock.now += 100
                await new.tick()
            left = {p.event.id: p.attempts for p in await events.pending(redis, keys)}
            assert left[critical.id] == 6 and left[info.id] <= 1
            rx.failing = False
            clock.now += 100
            assert await new.tick() == 2
            assert await events.pending(redis, keys) == []
            await new_notifier.stop()  # type: ignore[union-attr]

        with_redis(redis_url, body)
    delivered = rx.bodies("/hook")
    assert [b["event"] for b in delivered] == ["rolled_back", "step_advanced"]
    assert delivered[0]["id"] == critical.id


def test_a_critical_alert_never_waits_behind_lower_alerts_retries(redis_url: str) -> None:
    with Receiver() as rx:
        canary = settings({"kind": "webhook", "url": rx.url + "/hook"}, notify_retries=5)
        clock = Clock()

        async def body(redis: aioredis.Redis, keys: Keys) -> None:
            notifier = build_notifier(canary, Metrics())
            c = courier(redis, notifier, canary, clock)
            rx.failing = True
            for i in range(3):
                await events.enqueue(redis, keys, events.make("paused", "api", f"paused {i}", "cli"))
            await c.tick()  # three warnings now in backoff
            rx.failing = False
            await events.enqueue(redis, keys, rolled_back())
            await c.tick()  # the critical one goes at once (first), not after the warning's backoff
            assert rx.bodies("/hook")[0]["event"] == "rolled_back"
            clock.now += 100
            await c.tick()
            assert await events.pending(redis, keys) == []
            await notifier.stop()  # type: ignore[union-attr]

        with_redis(redis_url, body)
    assert [b["event"] for b in rx.bodies("/hook")] == ["rolled_back", "paused", "paused", "paused"]


def test_an_unreachable_target_is_retried_and_counted(redis_url: str) -> None:
    metrics = Metrics()
    canary = settings({"kind": "webhook", "url": refused_url()}, notify_retries=1)
    clock = Clock()

    async def body(redis: aioredis.Redis, keys: Keys) -> None:
        notifier = build_notifier(canary, metrics)
        c = Courier(redis, keys, notifier, canary, metrics, lambda: True, wall=clock)
        await events.enqueue(redis, keys, events.make("paused", "api", "paused", "cli"))
        await c.tick()
        clock.now += 100
        await c.tick()  # second failure: a warning gives up after one retry
        assert await events.pending(redis, keys) == []
        await notifier.stop()  # type: ignore[union-attr]

    with_redis(redis_url, body)
    assert metrics.alerts.labels("webhook", "retried")._value.get() == 2


def test_a_follower_delivers_nothing(redis_url: str) -> None:
    with Receiver() as rx:
        canary = settings({"kind": "webhook", "url": rx.url + "/hook"})

        async def body(redis: aioredis.Redis, keys: Keys) -> None:
            notifier = build_notifier(canary, Metrics())
            await events.enqueue(redis, keys, rolled_back())
            c = Courier(redis, keys, notifier, canary, Metrics(), lambda: False)
            assert await c.tick() == 0
            assert len(await events.pending(redis, keys)) == 1
            await notifier.stop()  # type: ignore[union-attr]

        with_redis(redis_url, body)
    assert rx.bodies("/hook") == []


def test_factory_and_settings_reject_incomplete_targets() -> None:
    assert isinstance(build_notifier(CanarySettings(), Metrics()), NopNotifier)
    with pytest.raises(ValueError, match="routing_key"):
        NotifierTarget(kind="pagerduty")
    with pytest.raises(ValueError, match="needs url"):
        NotifierTarget(kind="slack")
    with pytest.raises(ValueError):
        NotifierTarget(kind="teams", url="http://x")  # type: ignore[arg-type]
    assert NotifierTarget(kind="pagerduty", routing_key="k").url == "https://events.pagerduty.com/v2/enqueue"
    teams = {"notifiers": [{"kind": "teams", "url": "http://x"}]}
    with pytest.raises(ConfigError, match=r"canary\.notifiers\[0\]\.kind: Input should be 'slack'"):
        load_settings(canary=teams)
    with pytest.raises(ValueError, match="must be an http:// or https:// URL"):
        NotifierTarget(kind="webhook", url="http://bad host/")
