"""The step ladder as a state machine kept in Redis: progressing, paused, completed, rolled_back.

The state is one JSON value per group (``<prefix>rollout:<group>``), changed only inside a
WATCH/MULTI transaction together with the split key, the transition log and the alert outbox, so a
leader advancing and a person pausing at the same moment cannot leave the split and the state
disagreeing. Anyone may make a transition (CLI, admin API); only the leader makes the timed ones.
The ladder itself is arithmetic: the next step is ``steps[index + 1]``, 100 ends it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from proxy.canary import events
from proxy.canary.events import Event
from proxy.control.keys import Keys

PROGRESSING, PAUSED, COMPLETED, ROLLED_BACK = "progressing", "paused", "completed", "rolled_back"
ACTIVE = (PROGRESSING, PAUSED)
LOG_LIMIT = 100


class RolloutError(Exception):
    """A transition that does not apply (no rollout, wrong state); the message says why."""


@dataclass(frozen=True)
class RolloutState:
    group: str
    state: str
    steps: list[float]
    index: int
    interval_seconds: float
    started_at: float
    step_started_at: float
    updated_at: float
    seq: int = 0
    last: dict[str, Any] = field(default_factory=dict)

    @property
    def percentage(self) -> float:
        return 0.0 if self.state == ROLLED_BACK else self.steps[self.index]

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def held_for(self, now: float) -> float:
        return now - self.step_started_at

    def due(self, now: float) -> bool:
        """Progressing and the current step was held for the whole interval."""
        return self.state == PROGRESSING and self.held_for(now) >= self.interval_seconds

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["percentage"] = self.percentage
        return data

    @classmethod
    def from_json(cls, raw: str | bytes) -> RolloutState:
        data = json.loads(raw)
        data.pop("percentage", None)
        return cls(**data)


def parse_steps(text: str) -> list[float]:
    """``1,5,10,...,100``: strictly increasing, above 0, ending at 100 (same rule as settings)."""
    try:
        steps = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise RolloutError(f"steps must be numbers separated by commas: {text!r}") from exc
    check_steps(steps)
    return steps


def check_steps(steps: list[float]) -> None:
    if not steps:
        raise RolloutError("rollout steps must not be empty")
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise RolloutError(f"rollout steps must increase strictly: {steps}")
    if steps[0] <= 0 or steps[-1] != 100:
        raise RolloutError(f"rollout steps must be above 0 and end at 100: {steps}")


def parse_duration(text: str) -> float:
    """``300``, ``0.5s``, ``5m``, ``1h`` -> seconds."""
    raw = text.strip().lower()
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if raw.endswith(suffix):
            number, scale = raw[: -len(suffix)], units[suffix]
            break
    else:
        number, scale = raw, 1.0
    try:
        value = float(number) * scale
    except ValueError as exc:
        raise RolloutError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h)") from exc
    if not value > 0:
        raise RolloutError(f"duration must be positive: {text!r}")
    return value


class Rollouts:
    """Reads and transitions rollouts. Shared by the leader, the admin API and the CLI."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, wall: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.keys = keys
        self.wall = wall

    def key(self, group: str) -> str:
        return self.keys.under("rollout", group)

    def log_key(self, group: str) -> str:
        return self.keys.under("rollout", group, "log")

    async def get(self, group: str) -> RolloutState | None:
        raw = await self.redis.get(self.key(group))
        return RolloutState.from_json(raw) if raw else None

    async def history(self, group: str, limit: int = 20) -> list[dict[str, Any]]:
        raw = await self.redis.lrange(self.log_key(group), 0, limit - 1)
        return [json.loads(item) for item in raw]

    # --- transitions -------------------------------------------------------------------------

    async def start(self, group: str, steps: list[float], interval: float, by: str) -> RolloutState:
        check_steps(steps)

        def go(current: RolloutState | None, now: float) -> tuple[RolloutState, Event]:
            if current is not None and current.active:
                raise RolloutError(f"a rollout for {group} is already {current.state}; abort it first")
            state = RolloutState(group, PROGRESSING, list(steps), 0, interval, now, now, now)
            return state, events.make(
                "started", group, f"rollout of {group} started at {steps[0]:g}%", by,
                steps=steps, interval_seconds=interval,
            )  # fmt: skip

        return await self._transition(group, go, by, set_split=True)

    async def pause(self, group: str, by: str) -> RolloutState:
        def go(current: RolloutState | None, now: float) -> tuple[RolloutState, Event]:
            state = _require(current, group, PROGRESSING)
            return replace(state, state=PAUSED), events.make(
                "paused", group, f"rollout of {group} paused at {state.percentage:g}%", by
            )

        return await self._transition(group, go, by)

    async def resume(self, group: str, by: str) -> RolloutState:
        def go(current: RolloutState | None, now: float) -> tuple[RolloutState, Event]:
            state = _require(current, group, PAUSED)
            # the hold starts again: checks must pass for a whole interval after a pause
            return replace(state, state=PROGRESSING, step_started_at=now), events.make(
                "resumed", group, f"rollout of {group} resumed at {state.percentage:g}%", by
            )

        return await self._transition(group, go, by)

    async def promote(
        self, group: str, by: str, full: bool = False, figures: dict[str, Any] | None = None
    ) -> RolloutState:
        """Next step now (``full``: straight to 100). The leader uses it for timed advances too."""

        def go(current: RolloutState | None, now: float) -> tuple[RolloutState, Event]:
            state = _require(current, group, *ACTIVE)
            index = len(state.steps) - 1 if full else min(state.index + 1, len(state.steps) - 1)
            done = state.steps[index] >= 100
            new = replace(state, index=index, step_started_at=now, state=COMPLETED if done else state.state)
            kind = "completed" if done else "step_advanced"
            message = (
                f"rollout of {group} completed: v2 serves 100%"
                if done
                else f"rollout of {group} advanced {state.percentage:g}% -> {new.percentage:g}%"
            )
            return new, events.make(kind, group, message, by, **({"figures": figures} if figures else {}))

        return await self._transition(group, go, by, set_split=True, figures=figures)

    async def abort(self, group: str, by: str, reason: str = "aborted") -> RolloutState:
        """Traffic to 0 first (its own write, before anything else), then the state."""
        await self.redis.set(self.keys.split(group), "0")
        await self.redis.publish(self.keys.changes_channel, f"split:{group}")

        def go(current: RolloutState | None, now: float) -> tuple[RolloutState, Event]:
            state = _require(current, group, *ACTIVE)
            return replace(state, state=ROLLED_BACK), events.make(
                "aborted", group, f"rollout of {group} aborted at {state.percentage:g}%: v2 share is 0%", by,
                reason=reason,
            )  # fmt: skip

        return await self._transition(group, go, by)

    async def stop_for_rollback(self, group: str, decision: dict[str, Any]) -> RolloutState | None:
        """After the health check moved traffic to 0: mark an active rollout rolled back (no event:
        the rollback decision raises its own)."""

        def go(current: RolloutState | None, now: float) -> tuple[RolloutState, Event | None]:
            state = _require(current, group, *ACTIVE)
            return replace(state, state=ROLLED_BACK), None

        try:
            return await self._transition(group, go, "leader", figures=decision, action="rolled_back")
        except RolloutError:
            return None

    async def _transition(
        self,
        group: str,
        change: Callable[[RolloutState | None, float], tuple[RolloutState, Event | None]],
        by: str,
        set_split: bool = False,
        figures: dict[str, Any] | None = None,
        action: str | None = None,
    ) -> RolloutState:
        key = self.key(group)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    current = RolloutState.from_json(raw) if raw else None
                    now = self.wall()
                    new, event = change(current, now)
                    entry = {
                        "at": now,
                        "by": by,
                        "action": action or (event.kind if event else new.state),
                        "from": {"state": current.state, "percentage": current.percentage}
                        if current
                        else None,
                        "to": {"state": new.state, "percentage": new.percentage},
                        "figures": figures,
                    }
                    new = replace(new, updated_at=now, seq=(current.seq if current else 0) + 1, last=entry)
                    pipe.multi()
                    pipe.set(key, json.dumps(new.as_dict()))
                    if set_split:
                        pipe.set(self.keys.split(group), f"{new.percentage:g}")
                    pipe.lpush(self.log_key(group), json.dumps(entry, default=str))
                    pipe.ltrim(self.log_key(group), 0, LOG_LIMIT - 1)
                    if event is not None:
                        events.push(pipe, self.keys, event)
                    await pipe.execute()
                    break
                except WatchError:
                    continue
        if set_split:
            await self.redis.publish(self.keys.changes_channel, f"split:{group}")
        return new


def _require(current: RolloutState | None, group: str, *states: str) -> RolloutState:
    if current is None:
        raise RolloutError(f"no rollout for {group}")
    if current.state not in states:
        raise RolloutError(f"the rollout for {group} is {current.state}, not {' or '.join(states)}")
    return current
