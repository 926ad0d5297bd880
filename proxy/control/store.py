"""Keeps an in-memory snapshot of the Redis control state fresh, beside the request path.

Two triggers: a pub/sub message (instant, for changes made through strangler) and a poll (for a
plain ``redis-cli SET``). Redis being down or slow only makes the snapshot older; the request
path never waits on Redis.

Lost data: the first refresh claims an epoch key (``<prefix>epoch``, ``SET NX``) and every refresh
reads it back. If it vanished or changed, Redis came back without its data (a restart without
persistence, a FLUSHALL, a failover to an empty replica): rather than fall back to the default split
(a finished migration would silently send everyone back to v1), the store keeps serving its last
good snapshot, writes those values back (``SET NX``: the first replica to notice wins), records the
loss in ``<prefix>control:lost`` for ``status`` and the canary leader's alert, and claims a new epoch.

A rollback Redis cannot take (the master is gone and Sentinel has not promoted a replica yet) is not
lost: :meth:`ControlStore.hold_rollback` serves 0% on this proxy at once, holds it over whatever
Redis says, and retries the write in the background until it lands; then the change message
carries it to every other proxy and the hold is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.background import cancel_and_wait
from proxy.control.keys import DEPRECATIONS_REGISTERED, Keys
from proxy.control.snapshot import (
    Invalid,
    SectionParser,
    Snapshot,
    as_text,
    build_split,
    parse_split_state,
)
from proxy.metrics import Metrics
from proxy.settings import Settings

log = logging.getLogger("strangler.control")

_REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


class ControlStore:
    """Owns the snapshot. ``current`` is a plain attribute read; refreshing swaps it whole."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        metrics: Metrics,
        sections: Mapping[str, SectionParser] | None = None,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._metrics = metrics
        self._keys = Keys.for_settings(settings)
        self._groups = [group.name for group in settings.routes]
        self._sections = dict(sections or {})
        initial_sections = {name: parser({}, None)[0] for name, parser in self._sections.items()}
        self.current = Snapshot(
            global_percentage=settings.default_percentage,
            sections=initial_sections,
        )
        self._last_good = self.current
        self._epoch: str | None = None
        self._restorable: dict[str, str] = {}  # split key -> last good value, written back after a loss
        self._restorable_hashes: dict[str, dict[str, str]] = {}
        self._split_state: dict[str, str] = {}  # the last read ``split_state`` hash
        self.state_lost_at: float | None = None  # wall time this process last saw Redis lose its data
        self._reported: set[tuple[str, str]] = set()
        self._rejected_now: set[tuple[str, str]] = set()
        self._published: dict[str, float] = {}
        self._rules_registered = False  # this config's deprecation rules are in Redis (again after a loss)
        self._reported_down = False
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._held: set[str] = set()  # groups rolled back here whose write has not reached Redis ("*": all)
        self._retries: set[asyncio.Task[None]] = set()
        self.retry_interval = 0.2

    @property
    def keys(self) -> Keys:
        return self._keys

    def age_seconds(self) -> float | None:
        loaded = self._last_good.loaded_at
        return None if loaded is None else time.monotonic() - loaded

    async def start(self) -> None:
        """First refresh (bounded by the Redis timeout), then the poll and pub/sub loops."""
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._poll_loop(), name="strangler-control-poll"),
            asyncio.create_task(self._subscribe_loop(), name="strangler-control-pubsub"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._held:
            log.error("stopping with a rollback not yet written to Redis: %s", ", ".join(sorted(self._held)))
        await cancel_and_wait([*self._tasks, *self._retries])
        self._tasks = []

    @property
    def held_rollbacks(self) -> list[str]:
        return sorted(self._held)

    def hold_rollback(self, group: str | None, write: Callable[[], Awaitable[Any]]) -> None:
        """Serve ``group`` (None: everything) at 0% now and keep it there until ``write`` succeeds;
        ``write`` is retried every ``retry_interval`` seconds while Redis fails."""
        name = group or "*"
        self._held.add(name)
        self._last_good = self._with_holds(self._last_good)
        self.current = self._with_holds(self.current)
        task = asyncio.create_task(self._retry(name, write), name=f"strangler-rollback-retry-{name}")
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry(self, name: str, write: Callable[[], Awaitable[Any]]) -> None:
        attempts = 0
        while True:
            attempts += 1
            try:
                await write()
            except _REDIS_ERRORS:
                await asyncio.sleep(self.retry_interval)
                continue
            break
        self._held.discard(name)
        log.warning("rollback of %s written to Redis after %d attempts", name, attempts)
        self._wake.set()

    def _with_holds(self, snapshot: Snapshot) -> Snapshot:
        if not self._held:
            return snapshot
        if "*" in self._held:
            groups = {group: 0.0 for group in {*self._groups, *snapshot.group_percentages}}
            rollbacks = snapshot.rollbacks | {"default", *groups}
            return replace(snapshot, global_percentage=0.0, group_percentages=groups, rollbacks=rollbacks)
        groups = dict(snapshot.group_percentages)
        for name in self._held:
            groups[name] = 0.0
        glob = 0.0 if "default" in self._held else snapshot.global_percentage
        rollbacks = snapshot.rollbacks | self._held
        return replace(snapshot, global_percentage=glob, group_percentages=groups, rollbacks=rollbacks)

    async def refresh(self) -> bool:
        """Read every control key in one pipeline and swap the snapshot; False if Redis failed."""
        try:
            raw_global, raw_groups, raw_hashes, epoch = await asyncio.wait_for(
                self._read(), timeout=self._settings.redis_timeout_seconds * 2
            )
            if self._epoch is None:
                self._epoch = await self._claim_epoch(epoch)
            elif epoch != self._epoch:
                await self._state_lost(epoch)
                raw_global, raw_groups, raw_hashes, _ = await self._read()
        except _REDIS_ERRORS as exc:
            self._on_redis_down(exc)
            return False
        previous = self._last_good
        global_pct, groups, problems = build_split(
            raw_global, raw_groups, previous, self._settings.default_percentage
        )
        sections: dict[str, Any] = {}
        for name, parser in self._sections.items():
            value, errors = parser(raw_hashes.get(name, {}), previous.sections.get(name))
            sections[name] = value
            problems.extend(Invalid(name, "", error) for error in errors)
        rollbacks, epochs = parse_split_state(self._split_state)
        snapshot = Snapshot(
            global_percentage=global_pct,
            group_percentages=groups,
            sections=sections,
            redis_ok=True,
            loaded_at=time.monotonic(),
            generation=previous.generation + 1,
            rollbacks=rollbacks,
            epochs=epochs,
        )
        snapshot = self._with_holds(snapshot)  # a rollback not yet in Redis stays in force here
        self._last_good = snapshot
        self.current = snapshot
        self._restorable = {}
        if raw_global is not None:
            self._restorable[self._keys.split()] = f"{global_pct:g}"
        for group, value in groups.items():
            if group != "default":
                self._restorable[self._keys.split(group)] = f"{value:g}"
        self._restorable_hashes = {name: dict(fields) for name, fields in raw_hashes.items() if fields}
        if self._reported_down:
            self._reported_down = False
            log.info("redis reachable again; control snapshot refreshed")
        self._report(problems)
        self._metrics.control_refreshed(snapshot, self._groups)
        await self._publish_groups(snapshot)
        return True

    async def _publish_groups(self, snapshot: Snapshot) -> None:
        """Register our route groups and the share each is served at, in ``strangler:groups``.

        The CLI reads it to know groups its own config does not name, and to show what proxies
        actually serve when the stored value is invalid. Written only when a served share changes
        (so not on every poll); a failed write is retried at the next refresh.
        """
        if not self._rules_registered and self._settings.deprecations:
            # the deprecation rules of this config, so `strangler deprecations phase|clear` knows a
            # name this proxy serves
            rules = {rule.name: rule.model_dump_json() for rule in self._settings.deprecations}
            with contextlib.suppress(*_REDIS_ERRORS):
                await asyncio.wait_for(
                    self._redis.hset(self._keys.hash(DEPRECATIONS_REGISTERED), mapping=rules),  # type: ignore[arg-type]
                    timeout=self._settings.redis_timeout_seconds * 2,
                )
                self._rules_registered = True
        serving = {group: snapshot.percentage(group) for group in self._settings.group_names}
        changed = {group: value for group, value in serving.items() if self._published.get(group) != value}
        if not changed:
            return
        patterns = {group.name: list(group.patterns) for group in self._settings.routes}
        fields = {
            group: json.dumps({"patterns": patterns.get(group, []), "serving": value})
            for group, value in changed.items()
        }
        try:
            await asyncio.wait_for(
                self._redis.hset(self._keys.groups, mapping=fields),  # type: ignore[arg-type]
                timeout=self._settings.redis_timeout_seconds * 2,
            )
        except _REDIS_ERRORS:
            return
        self._published.update(changed)

    async def _read(
        self,
    ) -> tuple[str | None, dict[str, str | None], dict[str, dict[str, str]], str | None]:
        split_keys = [self._keys.split()] + [self._keys.split(group) for group in self._groups]
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in split_keys:  # GETs, not MGET: cluster pipelines refuse MGET
                pipe.get(key)
            for name in self._sections:
                pipe.hgetall(self._keys.hash(name))
            pipe.hgetall(self._keys.split_state)
            pipe.get(self._keys.epoch)
            results = await pipe.execute()
        epoch = as_text(results.pop())
        state = results.pop()
        self._split_state = {as_text(k) or "": as_text(v) or "" for k, v in state.items()}
        values = [as_text(value) for value in results[: len(split_keys)]]
        results = [values, *results[len(split_keys) :]]
        raw_groups = dict(zip(self._groups, values[1:], strict=True))
        raw_hashes = {
            name: {as_text(k) or "": as_text(v) or "" for k, v in result.items()}
            for name, result in zip(self._sections, results[1:], strict=True)
        }
        return values[0], raw_groups, raw_hashes, epoch

    async def _claim_epoch(self, seen: str | None) -> str:
        if seen is not None:
            return seen
        await self._redis.set(self._keys.epoch, uuid.uuid4().hex, nx=True)
        return as_text(await self._redis.get(self._keys.epoch)) or ""

    async def _state_lost(self, found: str | None) -> None:
        """Write the last good values back (never over a value someone wrote since) and record it."""
        self.state_lost_at = time.time()
        self._published = {}  # register again: the registrations went with the data
        self._rules_registered = False
        log.error(
            "Redis lost its data (epoch changed); keeping the last good split and writing it back: %s",
            self._restorable or "nothing was set",
        )
        for key, value in self._restorable.items():
            await self._redis.set(key, value, nx=True)
        for name, fields in self._restorable_hashes.items():
            if not await self._redis.exists(self._keys.hash(name)):
                await self._redis.hset(self._keys.hash(name), mapping=fields)  # type: ignore[arg-type]
        record = {"at": self.state_lost_at, "epoch": self._epoch, "restored": self._restorable}
        await self._redis.set(self._keys.lost_state, json.dumps(record), nx=True, ex=7 * 86400)
        self._epoch = await self._claim_epoch(found)
        await self._redis.publish(self._keys.changes_channel, "lost")

    def _on_redis_down(self, exc: BaseException) -> None:
        """Serve on the last good snapshot (or all-v1 by policy); log the transition once."""
        good = self._last_good
        all_v1 = self._settings.redis_down_policy == "all_v1"
        self.current = self._with_holds(
            Snapshot(
                global_percentage=0.0 if all_v1 else good.global_percentage,
                group_percentages={group: 0.0 for group in self._groups}
                if all_v1
                else good.group_percentages,
                sections=good.sections,
                redis_ok=False,
                loaded_at=good.loaded_at,
                generation=good.generation,
            )
        )
        self._metrics.control_redis_error()
        if self._stopping:  # shutting down: Redis going away now is expected, not news
            return
        if not self._reported_down:
            self._reported_down = True
            log.warning(
                "redis unreachable (%s); serving on %s",
                type(exc).__name__,
                "an all-v1 split" if all_v1 else "the last good snapshot",
            )

    def _report(self, problems: list[Invalid]) -> None:
        """Count each bad value once when it appears (not at every poll while it stays); log each
        distinct bad value once per process."""
        seen: set[tuple[str, str]] = set()
        for problem in problems:
            marker = (problem.key, problem.raw + problem.reason)
            seen.add(marker)
            if marker not in self._rejected_now:
                self._metrics.invalid_control_value(problem.key)
            if marker not in self._reported:
                self._reported.add(marker)
                log.error("ignored invalid control value %s=%r: %s", problem.key, problem.raw, problem.reason)
        self._rejected_now = seen

    async def _poll_loop(self) -> None:
        interval = self._settings.poll_interval_seconds
        while not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            self._wake.clear()
            if self._stopping:
                return
            await self.refresh()
            self._metrics.snapshot_age(self.age_seconds())

    async def _subscribe_loop(self) -> None:
        """Wake the poll loop on every change message; reconnect with backoff when Redis drops."""
        backoff = 0.1
        while not self._stopping:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.changes_channel)
                backoff = 0.1
                self._wake.set()  # pick up whatever changed while we were disconnected
                while not self._stopping:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - any failure means reconnect, never crash the proxy
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    # bounded: a connection cut mid-read (we are being cancelled) can leave the close
                    # waiting on it, and the shutdown with it
                    await asyncio.wait_for(pubsub.aclose(), 1.0)
