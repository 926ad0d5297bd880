"""The leader's loop: keep the lock, judge every group, roll back, drive rollouts, raise alerts.

``run()`` is only ``while not stopping: await tick(); await sleep(interval)`` so tests drive
``tick()`` one step at a time with injected clocks. The lock is renewed by its own task every third
of its lifetime, so a check slower than the lock's lifetime does not lose it; every action the
leader takes is a compare-and-set that also checks, in the same transaction, that the lock still
holds this leader's token (``Rollouts``), so a deposed leader cannot act on what it judged.

A step advances only after the checks passed for its whole hold ("judged time": seconds covered
by passing checks; insufficient data, errors and failures add nothing), kept in the verdict record
so a new leader carries on. A new rollout or a split set by hand starts a fresh history: earlier
failure streaks and window seconds are not judged (``records.since_key``).

The rollback is one transaction (split 0, rollout rolled back, decision, critical alert queued);
metrics and the log follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from proxy.background import BackgroundLoop, cancel_and_wait
from proxy.canary import events, history, records
from proxy.canary.analysis import History, ShadowFigures, Status, Verdict, assess
from proxy.canary.confirm import Confirm, ConfirmHooks
from proxy.canary.gates import decide as gate_rules
from proxy.canary.gates.runner import GateRunner
from proxy.canary.judge import Tally, assess_statistical, load_tally
from proxy.canary.leader import LeaderLock, LeaderToken
from proxy.canary.rollout import PROGRESSING, RaceHook, Rollouts, RolloutState, Superseded
from proxy.canary.windows import REDIS_ERRORS, read_increment, read_windows
from proxy.control.client import ControlClient
from proxy.control.keys import Keys
from proxy.metrics import Metrics
from proxy.settings import CanaryThresholds, Settings

log = logging.getLogger("strangler.canary")

ShadowTotals = Callable[[], Awaitable[Mapping[str, tuple[int, int]]]]
"""Per route group, ``(compared, mismatched)`` from the shadow diff report; empty when none."""
ParityBehind = Callable[[Sequence[str]], Awaitable[list[str]]]
"""Of the given tables, those whose last parity result is not ``equal`` (or that have none)."""


class CanaryController(BackgroundLoop):
    name = "strangler-canary-controller"

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        keys: Keys,
        control: ControlClient,
        metrics: Metrics,
        rollouts: Rollouts | None = None,
        *,
        shadow_totals: ShadowTotals,
        parity_behind: ParityBehind,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        identity: str | None = None,
        race_hook: RaceHook | None = None,
        confirm: Confirm | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.canary = settings.canary
        self.redis = redis
        self.keys = keys
        self.control = control
        self.metrics = metrics
        self.rollouts = rollouts or Rollouts(redis, keys, wall)
        # the shadow report and parity results are read through their owners (passed in by app.py)
        self.shadow_totals = shadow_totals
        self.parity_behind = parity_behind
        self.clock = clock
        self.wall = wall
        self.lock = LeaderLock(redis, records.leader_key(keys), self.canary.leader_lock_ttl_seconds, identity)
        self.interval = min(self.canary.check_interval_seconds, self.canary.leader_lock_ttl_seconds / 3)
        self.is_leader = False
        self._next_check: float | None = None
        self._redis_failing = False
        self._renewer: asyncio.Task[None] | None = None
        self._known: dict[str, RolloutState] = {}  # last rollout seen per group (restored after data loss)
        # called as ("decided", group) between a check's reads and its action: tests land races there
        self.race_hook = race_hook
        self.gates = GateRunner(self.canary, metrics)  # metric gates: one shared client, closed on stop
        wait = min(1.0, self.canary.check_interval_seconds / 4)  # a slow hook never stalls other groups
        self.confirm = confirm or ConfirmHooks(self.canary.confirm_hooks, wait)

    def leader_token(self) -> LeaderToken:
        """The fencing token every action carries (checked in the action's own transaction)."""
        return self.lock.token()

    # --- loop ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew_loop(), name="strangler-canary-lock")
        await super().start()

    async def stop(self) -> None:
        self._stopping = True  # read by the heartbeat too: a cancel swallowed by redis-py's wait_for
        if self._renewer is not None:
            await cancel_and_wait([self._renewer])
            self._renewer = None
        await super().stop()

    async def _renew_loop(self) -> None:
        """The lock's own heartbeat: never waits for a check, however slow that is."""
        period = self.canary.leader_lock_ttl_seconds / 3
        while not self._stopping:  # not `while True`: see ShadowMirror._flusher
            try:
                await self.keep_lock()
            except Exception:  # noqa: BLE001 - the heartbeat must outlive any one failure
                log.exception("canary leader heartbeat failed")
            await asyncio.sleep(period)

    async def keep_lock(self) -> bool:
        """Renew or take the lock; True while this process leads."""
        try:
            leader = await self.lock.ensure()
        except REDIS_ERRORS as exc:
            self._redis_trouble(exc)
            leader = False
        if leader != self.is_leader:
            log.info("canary leader %s: %s", "acquired" if leader else "lost", self.lock.identity)
            self.is_leader = leader
            self._next_check = None  # a new leader judges at once
        return leader

    async def tick(self) -> None:
        """One step: leadership (unless the heartbeat task runs), lost state, then the checks."""
        if self._renewer is None:
            await self.keep_lock()
        if not self.is_leader:
            return
        try:
            await self._handle_lost_state()
            if self._next_check is None or self.clock() >= self._next_check:
                self._next_check = self.clock() + self.canary.check_interval_seconds
                await self.check_all()
            self._redis_failing = False
        except REDIS_ERRORS as exc:
            self._redis_trouble(exc)

    async def on_stop(self) -> None:
        self.confirm.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.lock.release(), timeout=1.0)  # hand over at once
        await self.gates.close()
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
        raw_since = await self.redis.mget([records.since_key(self.keys, g) for g in groups])
        fresh = {g: float(r) for g, r in zip(groups, raw_since, strict=True) if r}
        since = {g: float(d["at"]) for g, d in zip(groups, decisions, strict=True) if d and "at" in d}
        for group, at in fresh.items():
            since[group] = max(since.get(group, at), at)
        windows = await read_windows(self.redis, self.keys, groups, now, self.canary.window_seconds, since)
        splits = await self.control.get_split(groups)
        gated = self.canary.thresholds.max_shadow_mismatch_rate is not None or any(
            t.max_shadow_mismatch_rate is not None for t in self.canary.group_thresholds.values()
        )
        shadow = await self._shadow() if gated else {}
        verdicts = {}
        prevs: dict[str, dict[str, Any]] = {}
        for group, prev in zip(groups, previous, strict=True):
            prev = prev or {}
            if group in fresh and float(prev.get("at") or 0) <= fresh[group]:
                # a fresh history: no streak, no insufficient-data clock (an open incident stays open)
                prev = {"needs_recovery": prev.get("needs_recovery", False)}
            prevs[group] = prev
        # every group's metric gates at once: a slow metrics store costs one timeout per check
        gate_records = await self.gates.evaluate_all(prevs, now)
        for group in groups:
            verdicts[group] = await self._check_group(
                group, prevs[group], windows[group], splits, now, shadow.get(group), fresh.get(group),
                judged_since=since.get(group), gate_records=gate_records.get(group, []),
            )  # fmt: skip
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
        history_since: float | None = None,
        *,
        judged_since: float | None = None,
        gate_records: list[dict[str, Any]] | None = None,
    ) -> Verdict:
        thresholds = self.canary.group_thresholds.get(group, self.canary.thresholds)
        tally: Tally | None = None
        if thresholds.judge == "statistical":
            verdict, tally = await self._judge_statistically(
                group, prev, windows, thresholds, now, shadow, judged_since
            )
        else:
            verdict = assess(
                windows["v1"],
                windows["v2"],
                thresholds,
                History(int(prev.get("consecutive_failures", 0))),
                failures_to_act=self.canary.consecutive_failures,
                shadow=shadow,
            )
        verdict, gate_records = await self._gates(group, verdict, gate_records or [], now)
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
            "gates": gate_records,
        }
        if tally is not None:
            record["tally"] = tally.model_dump(mode="json")
        if rollout is not None:
            self._known[group] = rollout
        await self._track_insufficient(group, verdict, split, record, now)
        held = await self._parity_hold(rollout)
        if held:
            record["parity_hold"] = held
        if verdict.status is Status.PASS and record["needs_recovery"] and split > 0:
            record["needs_recovery"] = False
            await events.enqueue(
                self.redis, self.keys,
                events.make("recovered", group, f"v2 passes the checks again for {group}", "leader",
                            v1=verdict.v1, v2=verdict.v2),
            )  # fmt: skip
        judged = self._judged_time(rollout, prev, verdict, record, now)
        due = (
            verdict.status is Status.PASS
            and not held
            and judged >= (rollout.interval_seconds if rollout else 0)
        )
        step_hold = await self._step_gate(group, rollout) if due else None
        if step_hold:
            record["step_hold"] = step_hold
        if self.race_hook is not None:
            await self.race_hook("decided", group)
        acted = False
        if verdict.rollback and split > 0:
            acted = await self.rollback(group, verdict, split, rollout, now, history_since)
            if acted:
                record.update(
                    consecutive_failures=0, rollback=True, needs_recovery=True, action="rolled_back"
                )
                for gate in gate_records:
                    gate["consecutive_failures"] = 0
                record.pop("tally", None)  # the next attempt is a new judged period
        ready = rollout is not None and rollout.state == PROGRESSING and due and not step_hold
        await self._write_verdict(
            group, record, windows, rollout, fresh="at" not in prev, since=history_since,
            advance_due=ready and not acted,
        )  # fmt: skip
        if not acted and rollout is not None and rollout.active:
            try:
                if _split_of(splits.get(group)) != rollout.percentage:
                    if await self.rollouts.pause_overridden(group, rollout.seq, self.leader_token()):
                        log.warning("rollout of %s paused: its split was changed by hand", group)
                elif (
                    rollout.state == PROGRESSING
                    and verdict.status is Status.PASS
                    and judged >= rollout.interval_seconds
                    and not held
                    and not step_hold
                ):
                    figures = {"v1": verdict.v1, "v2": verdict.v2, "verdict": verdict.status.value,
                               "judged_seconds": round(judged, 3)}  # fmt: skip
                    await self.rollouts.advance(group, rollout.seq, self.leader_token(), figures)
            except Superseded as exc:
                log.info("rollout of %s: not acting (%s)", group, exc)
            rollout = await self.rollouts.get(group)
        self.metrics.rollout_at(
            group,
            None if rollout is None else rollout.percentage,
            awaiting_approval=rollout is not None and rollout.awaiting_approval,
        )
        return verdict

    async def _write_verdict(
        self,
        group: str,
        record: dict[str, Any],
        windows: dict[str, Any],
        rollout: RolloutState | None,
        *,
        fresh: bool,
        advance_due: bool,
        since: float | None,
    ) -> None:
        """The verdict and its history record (``history``, for backtests) in one transaction:
        the history never shows a check the verdict does not."""
        seen = None if rollout is None else rollout.as_dict()
        added = None
        if self.canary.history_checks > 0:
            try:
                added = await history.increment(
                    self.redis, self.keys, group, record["at"], self.canary.window_seconds, since
                )
            except Exception:  # noqa: BLE001 - the history is best effort: never at the verdict's cost
                added = None
        item = history.entry(record, windows, seen, fresh=fresh, advance_due=advance_due, increment=added)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(records.verdict_key(self.keys, group), json.dumps(record, default=str))
            history.push(pipe, self.keys, group, item, self.canary.history_checks)
            await pipe.execute()

    async def _step_gate(self, group: str, rollout: RolloutState | None) -> str | None:
        """Why a step that the checks allow is not taken yet: an approval hold not approved, or a
        confirm hook that did not answer 2xx (asked only once the approval is there). None: go."""
        if rollout is None or rollout.state != PROGRESSING:
            return None
        if rollout.awaiting_approval:
            return f"awaiting approval of the hold at {rollout.percentage:g}%"
        to = rollout.steps[min(rollout.index + 1, len(rollout.steps) - 1)]
        body = {"from_percentage": rollout.percentage, "to_percentage": to, "hold_id": rollout.hold_id}
        return await self.confirm.ask(group, body)

    def _judged_time(
        self,
        rollout: RolloutState | None,
        prev: dict[str, Any],
        verdict: Verdict,
        record: dict[str, Any],
        now: float,
    ) -> float:
        """Seconds of the current hold covered by passing checks (a gap longer than two check
        intervals, e.g. no leader, counts as two intervals at most)."""
        if rollout is None or rollout.state != PROGRESSING:
            return 0.0
        hold_id = [rollout.started_at, rollout.hold_id]
        hold = prev.get("hold") or {}
        judged = float(hold.get("judged", 0.0)) if hold.get("id") == hold_id else 0.0
        if verdict.status is Status.PASS:
            last = max(float(prev.get("at") or 0.0), rollout.step_started_at)
            judged += max(0.0, min(now - last, 2 * self.canary.check_interval_seconds))
        record["hold"] = {"id": hold_id, "judged": judged}
        return judged

    async def _gates(
        self, group: str, verdict: Verdict, records: list[dict[str, Any]], now: float
    ) -> tuple[Verdict, list[dict[str, Any]]]:
        """Metric gates (``canary/gates``, evaluated for every group by ``check_all``) beside the
        built-in checks: the verdict to act on (``decide.combine``: a gate at its failure limit
        rolls back through ``rollback``, a failing or inconclusive one holds) and the gate records
        shown in status. Dry-run gates are alerted once per failing streak, never acted on."""
        if not records:
            return verdict, []
        for gate in gate_rules.dry_run_alerts(records, now):
            await events.enqueue(
                self.redis, self.keys,
                events.make(
                    "gate_dry_run_failed", group,
                    f"dry-run gate {gate['name']} failed {gate['consecutive_failures']} times in a row "
                    f"for {group} (not acted on): {gate['reason']}",
                    "leader", gate=gate["name"], value=gate["value"],
                ),
            )  # fmt: skip
        return gate_rules.combine(verdict, records), records

    async def _judge_statistically(
        self,
        group: str,
        prev: dict[str, Any],
        windows: dict[str, Any],
        thresholds: CanaryThresholds,
        now: float,
        shadow: ShadowFigures | None,
        judged_since: float | None,
    ) -> tuple[Verdict, Tally | None]:
        """The statistical judge (``judge.py``): feed it the seconds its tally has not counted yet,
        up to two seconds ago so every replica's flush for a second is in. The tally is in the
        verdict record (a new leader carries on); seconds older than the window keys live are gone."""
        tally, note = load_tally(prev.get("tally"))
        if note:
            log.warning("canary %s: %s", group, note)
        start = (
            tally.until
            if tally is not None
            else int(max(now - self.canary.window_seconds, judged_since or 0))
        )
        _, until, v1, v2 = await read_increment(
            self.redis, self.keys, group, start, now, self.canary.window_seconds
        )
        return assess_statistical(
            windows["v1"], windows["v2"], v1, v2, thresholds,
            History(int(prev.get("consecutive_failures", 0))), tally, now=now, until=until,
            failures_to_act=self.canary.consecutive_failures, shadow=shadow, note=note,
        )  # fmt: skip

    def _observe(self, group: str, verdict: Verdict) -> None:
        self.metrics.check_judged(group, verdict.status.value, {"v1": verdict.v1, "v2": verdict.v2})
        if verdict.statistics:
            self.metrics.judge_evidence(
                group, {test: verdict.statistics[test]["evidence"] for test in ("errors", "latency")}
            )

    async def _track_insufficient(
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
            await events.enqueue(
                self.redis, self.keys,
                events.make(
                    "insufficient_data", group,
                    f"{group}: too little traffic to judge v2 for {now - since:.0f}s ({verdict.reason})",
                    "leader", v1=verdict.v1, v2=verdict.v2,
                )
            )  # fmt: skip

    async def _parity_hold(self, rollout: RolloutState | None) -> list[str]:
        """Tables of ``canary.parity_tables`` whose last ``strangler parity`` result is not
        ``equal``, or that were never checked (read through ``parity_behind``, owned by
        ``proxy/parity``). The rollout holds (no next step) but is not rolled back: the data is
        behind, not v2's answers."""
        tables = self.canary.parity_tables
        if not tables or rollout is None or rollout.state != "progressing":
            return []
        return await self.parity_behind(tables)

    async def _shadow(self) -> dict[str, ShadowFigures]:
        """Per-group totals of the shadow diff report (read through ``shadow_totals``, owned by
        ``proxy/shadow``). The report is cumulative (until ``strangler diffs --reset``), not
        windowed: the gate answers "is v2 still answering differently", not "since when"."""
        totals = await self.shadow_totals()
        return {group: ShadowFigures(c, m) for group, (c, m) in totals.items()}

    # --- rollback -----------------------------------------------------------------------------

    async def rollback(
        self,
        group: str,
        verdict: Verdict,
        split: float,
        rollout: RolloutState | None,
        now: float,
        history_since: float | None = None,
    ) -> bool:
        """Split 0, rollout stopped, decision and critical alert: one transaction. False if nothing
        moved (the lock was lost, a person set the split meanwhile, or Redis failed)."""
        by = f"leader {self.lock.identity}"
        decision = {
            "at": now,
            "group": group,
            "action": "rollback",
            "by": by,
            "failed_check": verdict.failed_check,
            "reason": verdict.reason,
            "from_percentage": split,
            "v1": verdict.v1,
            "v2": verdict.v2,
            "thresholds": verdict.limits,
            "consecutive_failures": verdict.consecutive_failures,
            "rollout_step": rollout.percentage if rollout is not None and rollout.active else None,
            **({"statistics": verdict.statistics} if verdict.statistics else {}),  # the judge's evidence
        }
        event = events.make(
            "rolled_back", group, f"{group} rolled back from {split:g}% to 0%: {verdict.reason}", by,
            failed_check=verdict.failed_check, v1=verdict.v1, v2=verdict.v2,
            thresholds=verdict.limits, from_percentage=split,
        )  # fmt: skip
        try:
            result = await self.rollouts.rollback(group, decision, event, self.leader_token(), history_since)
        except Superseded as exc:
            log.warning("rollback of %s not made: %s", group, exc)
            return False
        except Exception:  # noqa: BLE001 - keep the streak; the next check tries again
            log.exception("ROLLBACK FAILED for %s: could not set the split to 0", group)
            return False
        if result is False:
            log.warning("rollback of %s not made: the split was changed by hand after the checks", group)
            return False
        log.warning("rolled back %s from %g%% to 0%%: %s", group, split, verdict.reason)
        try:
            self.metrics.rolled_back(group, verdict.failed_check or "unknown")
        except Exception:  # noqa: BLE001
            log.exception("rollback of %s: metrics failed", group)
        return True

    # --- lost state ---------------------------------------------------------------------------

    async def _handle_lost_state(self) -> None:
        """A proxy saw Redis lose its data and restored the split from its snapshot: put back the
        rollouts this leader remembers (paused, so a person decides) and raise one critical alert."""
        raw = await self.redis.get(records.lost_key(self.keys))
        lost = records.load(raw)
        if lost is None or lost.get("alerted"):
            return
        restored = []
        for group, state in self._known.items():
            if await self.rollouts.restore(state, f"leader {self.lock.identity}"):
                restored.append(group)
        lost.update(alerted=True, rollouts_restored=restored)
        rollouts = f"rollouts restored (paused): {', '.join(restored)}" if restored else "no rollout restored"
        event = events.make(
            "state_lost", "*",
            "Redis lost its data: proxies keep serving their last split, which was written back; "
            f"{rollouts}. Check `strangler status`.",
            f"leader {self.lock.identity}",
            restored_split=lost.get("restored"), previous_epoch=lost.get("epoch"),
        )  # fmt: skip
        key = records.lost_key(self.keys)
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                if records.load(await pipe.get(key)) != records.load(raw):
                    return  # someone else handled it (or it was acknowledged)
                pipe.multi()
                pipe.set(key, json.dumps(lost, default=str), keepttl=True)
                events.push(pipe, self.keys, event)
                await pipe.execute()
            except WatchError:
                return
        log.error("Redis lost its data; alert raised, rollouts restored: %s", restored or "none")


def _split_of(raw: str | None) -> float | None:
    try:
        return None if raw is None else float(raw)
    except ValueError:
        return None
