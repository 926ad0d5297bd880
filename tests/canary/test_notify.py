"""Alert payloads, severity filters, retries and the bounded queue, against a local receiver."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.canary import events
from proxy.canary.notify import NopNotifier, build_notifier
from proxy.canary.notify.dispatch import Dispatcher
from proxy.metrics import Metrics
from proxy.settings import CanarySettings, ConfigError, NotifierTarget
from tests.canary.helpers import Blackhole, Receiver, refused_url


def rolled_back() -> events.Event:
    return events.make(
        "rolled_back", "api", "api rolled back from 10% to 0%: v2 error rate 20.00% above 5.00%", "leader x",
        failed_check="error_rate", v1={"requests": 900, "error_rate": 0.0},
        v2={"requests": 100, "error_rate": 0.2},
    )  # fmt: skip


def settings(*targets: dict[str, object], **extra: object) -> CanarySettings:
    options = {"notify_backoff_seconds": 0.05, "notify_timeout_seconds": 0.5, "notify_retries": 2, **extra}
    return CanarySettings(notifiers=[NotifierTarget(**t) for t in targets], **options)  # type: ignore[arg-type]


def deliver(notifier: Dispatcher, *items: events.Event, wait: float = 5.0) -> None:
    async def go() -> None:
        await notifier.start()
        try:
            for event in items:
                notifier.notify(event)
            await asyncio.wait_for(notifier.drained(), wait)
        finally:
            await notifier.stop()

    asyncio.run(go())


def test_payload_formats_and_severity_filter() -> None:
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
        recovered = events.make("recovered", "api", "v2 passes the checks again for api", "leader x")
        deliver(notifier, advanced, rolled_back(), recovered)
    slack = rx.bodies("/slack")
    assert [b["attachments"][0]["title"].split()[0] for b in slack] == [
        "step_advanced",
        "rolled_back",
        "recovered",
    ]
    assert slack[1]["text"].startswith("[strangler] api rolled back")
    assert {"title": "group", "value": "api", "short": True} in slack[1]["attachments"][0]["fields"]
    trigger, resolve = rx.bodies("/pd")  # only incidents: trigger on rollback, resolve on recovery
    assert trigger["event_action"] == "trigger" and trigger["routing_key"] == "KEY"
    assert trigger["payload"]["severity"] == "critical" and trigger["payload"]["component"] == "api"
    assert trigger["payload"]["custom_details"]["v2"]["error_rate"] == 0.2
    assert resolve == {"routing_key": "KEY", "event_action": "resolve", "dedup_key": trigger["dedup_key"]}
    (hook,) = rx.bodies("/hook")  # min_severity critical: only the rollback
    assert hook["event"] == "rolled_back" and hook["source"] == "strangler" and hook["at"].endswith("+00:00")
    assert metrics.alerts.labels("slack", "sent")._value.get() == 3


def test_failures_are_retried_with_backoff_counted_and_never_block() -> None:
    metrics = Metrics()
    hole = Blackhole()
    try:
        notifier = build_notifier(
            settings(
                {"kind": "webhook", "url": refused_url()},
                {"kind": "slack", "url": hole.url},
                notify_queue_size=1,
                notify_timeout_seconds=0.2,
            ),
            metrics,
        )
        assert isinstance(notifier, Dispatcher)

        async def go() -> float:
            await notifier.start()
            try:
                started = time.perf_counter()
                for _ in range(20):
                    notifier.notify(rolled_back())  # returns at once even though both targets are down
                took = time.perf_counter() - started
                await asyncio.wait_for(notifier.drained(), 10)
                return took
            finally:
                await notifier.stop()

        took = asyncio.run(go())
    finally:
        hole.close()
    assert took < 0.5  # 40 deliveries that each take seconds to fail were only queued
    assert metrics.alerts.labels("webhook", "failed")._value.get() >= 1
    assert metrics.alerts.labels("webhook", "retried")._value.get() >= 2
    assert metrics.alerts.labels("slack", "failed")._value.get() >= 1
    dropped = (
        metrics.alerts.labels("webhook", "dropped")._value.get()
        + metrics.alerts.labels("slack", "dropped")._value.get()
    )
    assert dropped >= 20


def test_factory_and_settings_reject_incomplete_targets() -> None:
    assert isinstance(build_notifier(CanarySettings(), Metrics()), NopNotifier)
    with pytest.raises(ValueError, match="routing_key"):
        NotifierTarget(kind="pagerduty")
    with pytest.raises(ValueError, match="needs url"):
        NotifierTarget(kind="slack")
    with pytest.raises(ValueError):
        NotifierTarget(kind="teams", url="http://x")  # type: ignore[arg-type]
    assert NotifierTarget(kind="pagerduty", routing_key="k").url == "https://events.pagerduty.com/v2/enqueue"
    broken = CanarySettings()
    broken.notifiers = [NotifierTarget.model_construct(kind="teams", url="http://x", min_severity="info")]
    with pytest.raises(ConfigError, match="unknown notifier kind"):
        build_notifier(broken, Metrics())
