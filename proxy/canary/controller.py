"""The leader's loop: take or keep the lock, judge every group, roll back, drive rollouts, alert.

``run()`` is only ``while not stopping: await tick(); await sleep(interval)`` so tests drive
``tick()`` one step at a time with injected clocks. A tick on a non-leader only tries the lock.
The loop interval is short (a third of the lock TTL at most) so the lock is renewed in time even
when checks are rare; the checks themselves run every ``check_interval_seconds``.

Rollback order (flagger's): traffic to 0 first; then stop the rollout, persist the decision,
metrics, alerts, each of those logging and carrying on if it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from proxy.background import BackgroundLoop
from proxy.canary import events, records
from proxy.canary.analysis import History, ShadowFigures, Status, Verdict, assess
from proxy.canary.leader import LeaderLock
from proxy.canary.notify.base import Notifier
from proxy.canary.rollout import Rollouts, RolloutState
from proxy.canary.windows import REDIS_ERRORS, read_windows
from proxy.control.client import ControlClient
from proxy.control.keys import Keys
from proxy.metrics import Metrics
from proxy.settings import Settings

log = logging.getLogger("strangler.canary")


class CanaryController(BackgroundLoop):
    name = "strangler-canary-controller"

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        keys: Keys,
        control: ControlClient,
        metrics: Metrics,
        notifier: Notifier,
        rollouts: Rollouts | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        identity: str | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.canary = settings.canary
        self.redis = redis
        self.keys = keys
        self.control = control
        self.metrics = metrics
        self.notifier = notifier
        self.rollouts = rollouts or Rollouts(redis, keys, wall)
        self.clock = clock
        self.wall = wall
        self.lock = LeaderLock(redis, records.leader_key(keys), self.canary.leader_lock_ttl_seconds, identity)
        self.interval = min(self.canary.check_interval_seconds, self.canary.leader_lock_ttl_seconds / 3)
        self.is_leader = False
        self._next_check: float | None = None
        self._redis_failing = False

    # --- loop ---------------------------------------------------------------------------------

    async def tick(self) -> None:
        """One step: leadership, then (when due) the checks, then the alert outbox."""
        try:
            leader = await self.lock.ensure()
        except REDIS_ERRORS as exc:
            self._redis_trouble(exc)
            self.is_leader = False
            return
        if leader != self.is_leader:
            log.info("canary leader %s: %s", "acquired" if leader else "lost", self.lock.identity)
            self.is_leader = leader
            self._next_check = None  # a new leader judges at once
        if not leader:
            return
        try:
            if self._next_check is None or self.clock() >= self._next_check:
                self._next_check = self.clock() + self.canary.check_interval_seconds
                await self.check_all()
            for event in await events.drain(self.redis, self.keys):
                if event.kind == "aborted":  # made by a person through the CLI or any admin API
                    self.metrics.rolled_back(event.group, "aborted")
                self.notifier.notify(event)
            self._redis_failing = False
        except REDIS_ERRORS as exc:
            self._redis_trouble(exc)

    async def on_stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.lock.release(), timeout=1.0)  # hand over at once
        self.is_leader = False

    def _redis_trouble(self, exc: BaseException) -> None:
        if not self._redis_failing:
            self._redis_failing = True
            log.warning("canary loop cannot reach Redis (%s); holding, no decisions", type(exc).__name__)

    # --- checks -------------------------------------------------------------------------------

    async def check_all(self) -> dict[str, Verdict]:
        groups = self.settings.group_names
        now = self.wall()
        previous = await records.read_many(self.redis, [records.verdict_key(self.keys, g) for g in groups])
        decisions = await records.read_many(self.redis, [records.decision_key(self.keys, g) for g in groups])
        since = {g: float(d["at"]) for g, d in zip(groups, decisions, strict=True) if d and "at" in d}
        windows = await read_windows(self.redis, self.keys, groups, now, self.canary.window_seconds, since)
        splits = await self.control.get_split(groups)
        gated = self.canary.thresholds.max_shadow_mismatch_rate is not None or any(
            t.max_shadow_mismatch_rate is not None for t in self.canary.group_thresholds.values()
        )
        shadow = await self._shadow() if gated else {}
        verdicts = {}
        for group, prev in zip(groups, previous, strict=True):
            verdicts[group] = await self._check_group(
                group, prev or {}, windows[group], splits, now, shadow.get(group)
            )
        return verdicts

    def _effective_split(self, group: str, splits: dict[str, str | None]) -> float:
        for raw in (splits.get(group), splits.get("default") if group != "default" else None):
            if raw is not None:
                try:
                    return float(raw)
                except ValueError:
                    continue
        return self.settings.default_percentage

    async def _check_group(
        self,
        group: str,
        prev: dict[str, Any],
        windows: dict[str, Any],
        splits: dict[str, str | None],
        now: float,
        shadow: ShadowFigures | None = None,
    ) -> Verdict:
        thresholds = self.canary.group_thresholds.get(group, self.canary.thresholds)
        verdict = assess(
            windows["v1"],
            windows["v2"],
            thresholds,
            History(int(prev.get("consecutive_failures", 0))),
            failures_to_act=self.canary.consecutive_failures,
            shadow=shadow,
        )
        self._observe(group, verdict)
        split = self._effective_split(group, splits)
        rollout = await self.rollouts.get(group)
        record: dict[str, Any] = {
            **verdict.as_dict(),
            "at": now,
            "leader": self.lock.identity,
            "split": split,
            "insufficient_since": prev.get("insufficient_since"),
            "insufficient_alerted": prev.get("insufficient_alerted", False),
            "needs_recovery": prev.get("needs_recovery", False),
        }
        self._track_insufficient(group, verdict, split, record, now)
        held = await self._parity_hold(rollout)
        if held:
            record["parity_hold"] = held
        if verdict.status is Status.PASS and record["needs_recovery"] and split > 0:
            record["needs_recovery"] = False
            self.notifier.notify(
                events.make(
                    "recovered",
                    group,
                    f"v2 passes the checks again for {group}",
                    "leader",
                    v1=verdict.v1,
                    v2=verdict.v2,
                )
            )
        acted = False
        if verdict.rollback and split > 0:
            acted = await self.rollback(group, verdict, split, rollout, now)
            if acted:
                record.update(
                    consecutive_failures=0, rollback=True, needs_recovery=True, action="rolled_back"
                )
        await self.redis.set(records.verdict_key(self.keys, group), json.dumps(record, default=str))
        if not acted and rollout is not None and rollout.state == "progressing":
            if await self._overridden(group, rollout):
                rollout = await self.rollouts.get(group)
            elif verdict.status is Status.PASS and rollout.due(now) and not held:
                await self._advance(group, rollout, verdict)
                rollout = await self.rollouts.get(group)
        self.metrics.rollout_at(group, None if rollout is None else rollout.percentage)
        return verdict

    def _observe(self, group: str, verdict: Verdict) -> None:
        self.metrics.check_judged(group, verdict.status.value, {"v1": verdict.v1, "v2": verdict.v2})

    def _track_insufficient(
        self, group: str, verdict: Verdict, split: float, record: dict[str, Any], now: float
    ) -> None:
        """Alert once when a group with v2 traffic configured stays unjudgeable for too long."""
        if verdict.status is not Status.INSUFFICIENT_DATA or split <= 0:
            record.update(insufficient_since=None, insufficient_alerted=False)
            return
        since = record["insufficient_since"] or now
        record["insufficient_since"] = since
        if not record["insufficient_alerted"] and now - since >= self.canary.insufficient_data_alert_seconds:
            record["insufficient_alerted"] = True
            self.notifier.notify(
                events.make(
                    "insufficient_data", group,
                    f"{group}: too little traffic to judge v2 for {now - since:.0f}s ({verdict.reason})",
                    "leader", v1=verdict.v1, v2=verdict.v2,
                )
            )  # fmt: skip

    async def _overridden(self, group: str, rollout: RolloutState) -> bool:
        """Someone moved the split by hand (``strangler rollback``, ``set``, redis-cli) during a
        rollout: pause it rather than raise traffic again at the next step. People win."""
        raw = (await self.control.get_split([group]))[group]
        try:
            current = float(raw) if raw is not None else None
        except ValueError:
            current = None
        if current is not None and current == rollout.percentage:
            return False
        latest = await self.rollouts.get(group)  # re-read: a promote may have just landed
        if latest is None or latest.state != "progressing" or latest.percentage == current:
            return False
        try:
            await self.rollouts.pause(group, f"leader: split changed to {raw} outside the rollout")
        except Exception:  # noqa: BLE001 - paused or aborted meanwhile: nothing to do
            return False
        log.warning("rollout of %s paused: its split was changed to %s by hand", group, raw)
        return True

    async def _parity_hold(self, rollout: RolloutState | None) -> list[str]:
        """Tables of ``canary.parity_tables`` whose last ``strangler parity`` result (hash
        ``<prefix>parity:last``, written by ``proxy/parity``) is not ``equal``, or that were never
        checked. The rollout holds (no next step) but is not rolled back: the data is behind,
        not v2's answers."""
        tables = self.canary.parity_tables
        if not tables or rollout is None or rollout.state != "progressing":
            return []
        raw = await self.redis.hmget(self.keys.under("parity", "last"), tables)  # type: ignore[misc]
        held = []
        for table, value in zip(tables, raw, strict=True):
            try:
                status = json.loads(value).get("status") if value else None
            except (ValueError, AttributeError):
                status = None
            if status != "equal":
                held.append(table)
        return held

    async def _advance(self, group: str, rollout: RolloutState, verdict: Verdict) -> None:
        figures = {"v1": verdict.v1, "v2": verdict.v2, "verdict": verdict.status.value}
        try:
            await self.rollouts.promote(group, f"leader {self.lock.identity}", figures=figures)
        except Exception:  # noqa: BLE001 - e.g. paused a moment ago; the next tick sees it
            log.exception("could not advance the rollout of %s", group)

    async def _shadow(self) -> dict[str, ShadowFigures]:
        """Per-group totals of the shadow diff report, read from Redis only if it exists.

        The report (owned by ``proxy/shadow``) keeps, per endpoint, a hash
        ``<prefix>diffs:counts:<endpoint>`` with ``compared``, ``mismatched`` and ``group``, listed in
        the set ``<prefix>diffs:endpoints``. It is cumulative (until ``strangler diffs --reset``), not
        windowed: the gate answers "is v2 still answering differently", not "since when".
        """
        endpoints = [
            e.decode() if isinstance(e, bytes) else str(e)
            for e in await self.redis.smembers(self.keys.under("diffs", "endpoints"))
        ]
        if not endpoints:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for endpoint in endpoints:
                pipe.hmget(self.keys.under("diffs", "counts", endpoint), "compared", "mismatched", "group")
            rows = await pipe.execute()
        totals: dict[str, list[int]] = {}
        for compared, mismatched, group in rows:
            try:
                name = group.decode() if isinstance(group, bytes) else (group or "default")
                pair = totals.setdefault(name, [0, 0])
                pair[0] += int(compared or 0)
                pair[1] += int(mismatched or 0)
            except (TypeError, ValueError):
                continue
        return {group: ShadowFigures(c, m) for group, (c, m) in totals.items()}

    # --- rollback -----------------------------------------------------------------------------

    async def rollback(
        self, group: str, verdict: Verdict, split: float, rollout: RolloutState | None, now: float
    ) -> bool:
        """Traffic first; every later step logs and continues on error. False if traffic did not move."""
        try:
            await self.control.set_split(0, group)
        except Exception:  # noqa: BLE001 - keep the streak; the next check tries again
            log.exception("ROLLBACK FAILED for %s: could not set the split to 0", group)
            return False
        decision = {
            "at": now,
            "group": group,
            "action": "rollback",
            "by": f"leader {self.lock.identity}",
            "failed_check": verdict.failed_check,
            "reason": verdict.reason,
            "from_percentage": split,
            "v1": verdict.v1,
            "v2": verdict.v2,
            "thresholds": verdict.limits,
            "consecutive_failures": verdict.consecutive_failures,
            "rollout_step": rollout.percentage if rollout is not None and rollout.active else None,
        }
        log.warning("rolled back %s from %g%% to 0%%: %s", group, split, verdict.reason)
        try:
            await self.rollouts.stop_for_rollback(group, decision)
        except Exception:  # noqa: BLE001
            log.exception("rollback of %s: could not stop the rollout", group)
        try:
            text = json.dumps(decision, default=str)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(records.decision_key(self.keys, group), text)
                pipe.lpush(records.decisions_key(self.keys), text)
                pipe.ltrim(records.decisions_key(self.keys), 0, records.DECISIONS_LIMIT - 1)
                await pipe.execute()
        except Exception:  # noqa: BLE001
            log.exception("rollback of %s: could not persist the decision", group)
        try:
            self.metrics.rolled_back(group, verdict.failed_check or "unknown")
        except Exception:  # noqa: BLE001
            log.exception("rollback of %s: metrics failed", group)
        try:
            self.notifier.notify(
                events.make(
                    "rolled_back", group, f"{group} rolled back from {split:g}% to 0%: {verdict.reason}",
                    f"leader {self.lock.identity}",
                    failed_check=verdict.failed_check, v1=verdict.v1, v2=verdict.v2,
                    thresholds=verdict.limits, from_percentage=split,
                )
            )  # fmt: skip
        except Exception:  # noqa: BLE001
            log.exception("rollback of %s: alert failed", group)
        return True
