"""The hot-path half of the mirror, in-process: plan/submit/abandon decide and count, nothing else."""

from __future__ import annotations

import asyncio
import time

import orjson
import redis.asyncio as aioredis

from proxy.control.client import ControlClient
from proxy.control.keys import Keys
from proxy.control.snapshot import Snapshot
from proxy.control.store import ControlStore
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.shadow import capability
from proxy.shadow.compare import Answer, compare
from proxy.shadow.mirror import ShadowMirror
from proxy.shadow.policy import RULES_SECTION, SECTION, EndpointRules
from proxy.traffic.hooks import MirrorRequest, PrimaryResult
from tests.support import metric_value


def build(
    redis_url: str, raw: dict[str, str], **shadow: object
) -> tuple[ShadowMirror, Snapshot, Metrics, aioredis.Redis]:
    """A mirror over a real Redis client: a test that runs it in an event loop closes the client in
    that loop (a connection left open is closed by the garbage collector later, in another test,
    on a loop that is gone: an unraisable error there)."""
    settings = Settings(
        redis_url=redis_url,
        routes=[{"name": "orders", "patterns": ["/orders/**"]}],
        shadow={"enabled": True, **shadow},
    )
    metrics = Metrics()
    client = aioredis.Redis.from_url(redis_url)
    keys = Keys()
    parsers = capability.sections(settings)
    assert set(parsers) == {SECTION, RULES_SECTION}
    store = ControlStore(settings, client, metrics, parsers)
    parts = capability.build(settings, metrics, ControlClient(client, keys), store)
    assert isinstance(parts.mirror, ShadowMirror)
    sections = {name: parser(raw, None)[0] for name, parser in parsers.items()}
    return parts.mirror, Snapshot(0.0, sections=sections), metrics, client


def count(metrics: Metrics, **labels: str) -> float:
    return metric_value(metrics.render().decode(), "strangler_shadow_requests_total", **labels)


def test_plan_checks_switch_method_and_size_and_counts_skips(redis_url: str) -> None:
    mirror, snapshot, metrics, _ = build(redis_url, {"group:orders:methods": "GET,POST"}, max_body_bytes=100)
    plan = mirror.plan("default", "GET", None, snapshot)
    assert plan is not None and plan.max_body == 100 and plan.max_compare == 1024 * 1024
    assert mirror.plan("default", "POST", 10, snapshot) is None
    assert count(metrics, group="default", outcome="skipped_method") == 1
    assert mirror.plan("orders", "POST", 10, snapshot) is not None
    assert mirror.plan("orders", "POST", 101, snapshot) is None
    assert count(metrics, group="orders", outcome="skipped_size") == 1
    mirror.abandon(plan, "size")  # a chunked body grew too large
    mirror.abandon(plan, "primary_failed")
    assert count(metrics, group="default", outcome="skipped_size") == 1


def test_plan_samples_the_configured_share(redis_url: str) -> None:
    mirror, snapshot, _, _ = build(redis_url, {"sample_percentage": "10"})
    chosen = sum(mirror.plan("default", "GET", None, snapshot) is not None for _ in range(20_000))
    assert 1_500 < chosen < 2_500
    mirror, snapshot, _, _ = build(redis_url, {"sample_percentage": "0.5"})
    chosen = sum(mirror.plan("default", "GET", None, snapshot) is not None for _ in range(20_000))
    assert 40 < chosen < 180
    mirror, snapshot, _, _ = build(redis_url, {"enabled": "false"})
    assert mirror.plan("default", "GET", None, snapshot) is None


def test_submit_never_blocks_and_counts_drops(redis_url: str) -> None:
    mirror, snapshot, metrics, client = build(redis_url, {}, queue_size=2)
    request = MirrorRequest("default", "GET", "/a", b"/a", [("host", "x")], b"", "id")
    primary = PrimaryResult(200, [], b"{}", 0.01)

    async def go() -> None:
        mirror.submit(mirror.plan("default", "GET", None, snapshot), request, primary)  # not started
        plan = mirror.plan
        await mirror.start()
        try:
            # planned while the queue had room, submitted when it had none: dropped at submit
            early = [plan("default", "GET", None, snapshot) for _ in range(3)]
            for planned in early:
                mirror.submit(planned, request, primary)
            # the workers are not scheduled in between: the queue is full, so the next requests
            # are shed when planned (the primary then captures nothing for the mirror)
            assert [plan("default", "GET", None, snapshot) for _ in range(2)] == [None, None]
        finally:
            await mirror.stop()
            await client.aclose()

    asyncio.run(go())
    assert count(metrics, outcome="dropped") == 1 + 1 + 2


def test_comparing_rests_so_its_cpu_share_stays_bounded(redis_url: str) -> None:
    """By construction: CPU used <= wall time of the comparison <= share x (comparison + rest)."""
    mirror, _, _, _ = build(redis_url, {}, compare_cpu_share=0.25)
    left = Answer(200, "application/json", orjson.dumps([{"id": i, "v": i} for i in range(1000)]))
    right = Answer(200, "application/json", orjson.dumps([{"id": i, "v": -i} for i in range(1000)]))
    wall, cpu = time.perf_counter(), time.thread_time()
    outcome = mirror._paced(compare, left, right, EndpointRules(), frozenset())
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    assert outcome.result == "mismatch"
    assert cpu <= 0.25 * wall + 0.01


def test_mirrored_requests_start_spaced_by_their_cost_over_the_share(redis_url: str) -> None:
    """The loop-side cap: at saturation the mirror's own event-loop time stays near the share."""
    mirror, _, _, _ = build(redis_url, {}, compare_cpu_share=0.25)
    mirror._cost = 0.01  # seconds of event-loop time per mirrored request (measured in use)
    # at t=100 s one may start; the next 40 ms (10 ms / 0.25) after it, less the 5 ms of lag
    # that may be caught up (starts come in small batches: loop timers have a millisecond grain)
    assert mirror._slot(100.0) == 0.0
    assert round(mirror._slot(100.0), 6) == 0.035
    assert round(mirror._slot(100.03), 6) == 0.005
    assert mirror._slot(100.036) == 0.0
    assert round(mirror._slot(100.036), 6) == 0.039
    # ten quiet seconds earn no burst
    assert mirror._slot(110.0) == 0.0
    assert round(mirror._slot(110.0), 6) == 0.035
    unpaced, _, _, _ = build(redis_url, {}, compare_cpu_share=1.0)
    unpaced._cost = 0.01
    assert [unpaced._slot(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]


def test_stop_ends_the_flusher_even_when_its_cancel_is_swallowed(redis_url: str) -> None:
    """Python 3.11's ``asyncio.wait_for`` (redis-py sends with it) returns the result, swallowing
    the cancel, when the cancel lands just after the awaited operation finished: the flusher went
    back to sleep and every worker stop waited out cancel_and_wait's 5 s (seen in the reload soak)."""
    mirror, _, _, client = build(redis_url, {})
    settings = mirror._settings

    async def go() -> float:
        await mirror.start()
        entered = asyncio.Event()
        done = asyncio.get_running_loop().create_future()

        async def refresh_shared() -> None:  # a Redis read whose answer has just arrived
            entered.set()
            await asyncio.wait_for(done, 10)

        mirror.refresh_shared = refresh_shared  # type: ignore[method-assign]
        try:
            await asyncio.wait_for(entered.wait(), settings.poll_interval_seconds + 5)
            done.set_result(None)
            started = time.monotonic()
            await mirror.stop()  # cancels the flusher in this same loop pass: the cancel is swallowed
            return time.monotonic() - started
        finally:
            await client.aclose()

    assert asyncio.run(go()) < 2
