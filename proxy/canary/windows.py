"""Per-(group, version) counts on the request path, flushed as deltas to time-bucketed Redis hashes.

Every replica adds its deltas to the same hash per wall-clock second
(``<prefix>win:<group>:<version>:<epoch second>``), so the leader reads the whole fleet's window by
summing the last ``window_seconds`` hashes. The request path only increments integers in memory:
one flush pipeline per second per process does the Redis work, off the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.background import BackgroundLoop
from proxy.canary.analysis import BOUNDS, Window
from proxy.control.keys import Keys
from proxy.settings import CanarySettings

log = logging.getLogger("strangler.canary")

REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
VERSIONS = ("v1", "v2")
# slot layout of one counts list: requests, errors, then one slot per latency bucket (+ overflow)
REQUESTS, ERRORS, FIRST_BUCKET = 0, 1, 2
SLOTS = FIRST_BUCKET + len(BOUNDS) + 1
FIELDS = ("r", "e", *(f"b{i}" for i in range(len(BOUNDS) + 1)))
FIELD_SLOT = {name: index for index, name in enumerate(FIELDS)}

Counts = dict[str, dict[str, list[int]]]  # group -> version -> slots


class WindowRecorder:
    """Implements ``traffic.hooks.Recorder``: two dict lookups and three integer increments."""

    __slots__ = ("_counts", "_error_status")

    def __init__(self, count_4xx_as_errors: bool = False) -> None:
        self._counts: Counts = {}
        self._error_status = 400 if count_4xx_as_errors else 500

    def record(self, group: str, version: str, status: int, seconds: float) -> None:
        by_version = self._counts.get(group)
        if by_version is None:
            by_version = self._counts[group] = {}
        slots = by_version.get(version)
        if slots is None:
            slots = by_version[version] = [0] * SLOTS
        slots[REQUESTS] += 1
        if status >= self._error_status:
            slots[ERRORS] += 1
        slots[FIRST_BUCKET + bisect_left(BOUNDS, seconds)] += 1

    def drain(self) -> Counts:
        """Take the deltas so far; the path starts a fresh dict (a swap, safe on one event loop)."""
        taken, self._counts = self._counts, {}
        return taken

    def restore(self, counts: Counts) -> None:
        """Put back deltas a failed flush could not write, so nothing is lost while Redis is down."""
        for group, by_version in counts.items():
            for version, slots in by_version.items():
                target = self._counts.setdefault(group, {}).setdefault(version, [0] * SLOTS)
                for index, value in enumerate(slots):
                    target[index] += value


def window_key(keys: Keys, group: str, version: str, second: int) -> str:
    return keys.window(group, version, second)


class WindowFlusher(BackgroundLoop):
    """Background component: every ``flush_interval_seconds`` one HINCRBY pipeline with EXPIRE."""

    name = "strangler-canary-flush"

    def __init__(
        self,
        recorder: WindowRecorder,
        redis: aioredis.Redis,
        keys: Keys,
        settings: CanarySettings,
        wall: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self._recorder = recorder
        self._redis = redis
        self._keys = keys
        self.interval = settings.flush_interval_seconds
        self._ttl = int(math.ceil(settings.window_seconds * 2 + settings.flush_interval_seconds + 10))
        self._wall = wall
        self._failing = False

    async def tick(self) -> int:
        """Flush the deltas gathered since the last tick; returns the number of hashes written."""
        counts = self._recorder.drain()
        if not counts:
            return 0
        second = int(self._wall())
        written = 0
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for group, by_version in counts.items():
                    for version, slots in by_version.items():
                        key = window_key(self._keys, group, version, second)
                        for name, value in zip(FIELDS, slots, strict=True):
                            if value:
                                pipe.hincrby(key, name, value)
                        pipe.expire(key, self._ttl)
                        written += 1
                await pipe.execute()
        except REDIS_ERRORS as exc:
            self._recorder.restore(counts)
            if not self._failing:
                self._failing = True
                log.warning("canary window flush failed (%s); keeping the counts for the next one", exc)
            return 0
        if self._failing:
            self._failing = False
            log.info("canary window flush works again")
        return written

    async def on_stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.tick(), timeout=1.0)  # last deltas, best effort


async def read_windows(
    redis: aioredis.Redis,
    keys: Keys,
    groups: Iterable[str],
    now: float,
    window_seconds: float,
    since: dict[str, float] | None = None,
) -> dict[str, dict[str, Window]]:
    """Sum the per-second hashes in (now - window, now] per group and version, in one pipeline.

    ``since`` cuts a group's window short (after a rollback the old, failing seconds must not be
    judged again against a fresh attempt).
    """
    groups = list(groups)
    end = int(now)
    plan: list[tuple[str, str, int]] = []
    async with redis.pipeline(transaction=False) as pipe:
        for group in groups:
            start = int(now - window_seconds)
            if since and group in since:
                start = max(start, int(since[group]))
            for version in VERSIONS:
                for second in range(start + 1, end + 1):
                    pipe.hgetall(window_key(keys, group, version, second))
                    plan.append((group, version, second))
        results = await pipe.execute()
    sums: dict[str, dict[str, list[int]]] = {}
    for (group, version, _), raw in zip(plan, results, strict=True):
        slots = sums.setdefault(group, {}).setdefault(version, [0] * SLOTS)
        for name, value in raw.items():
            text = name.decode() if isinstance(name, bytes) else name
            index = FIELD_SLOT.get(text)
            if index is not None:  # unknown fields (a newer replica) are ignored, not fatal
                slots[index] += int(value)
    out: dict[str, dict[str, Window]] = {}
    for group in groups:
        out[group] = {}
        for version in VERSIONS:
            slots = sums.get(group, {}).get(version, [0] * SLOTS)
            out[group][version] = Window(slots[REQUESTS], slots[ERRORS], tuple(slots[FIRST_BUCKET:]))
    return out


SETTLE_SECONDS = 2
"""How far behind a check an increment stops: every replica's flush for a second is in by then."""


async def read_increment(
    redis: aioredis.Redis, keys: Keys, group: str, start: int, now: float, window_seconds: float
) -> tuple[int, int, Window, Window]:
    """The seconds ``(start, until]`` not yet counted, for a sequential count (the statistical
    judge's tally, the check history): ``until`` stays ``SETTLE_SECONDS`` behind ``now``, and
    ``start`` is clamped to two windows back, where the per-second hashes expire. Returns
    ``(start, until, v1, v2)``; nothing to read gives empty windows."""
    until = int(now) - SETTLE_SECONDS
    start = max(start, until - int(2 * window_seconds))
    if until <= start:
        return until, until, Window(), Window()
    got = (await read_windows(redis, keys, [group], until, until - start, {group: start}))[group]
    return start, until, got["v1"], got["v2"]
