"""Alertable events and the durable Redis outbox they travel through.

Transitions happen in many places (the leader, the CLI, the admin API of any replica), but alerts
are sent from one: every transition queues its event in the same transaction that changes the
state, and the leader's courier (``notify/courier``) delivers it. The outbox is a hash of pending
alerts (``<prefix>canary:alerts``, id -> event, attempts, targets done) and a sorted set of when each
is next due (``<prefix>canary:alerts:due``). An alert leaves the outbox only after every target took
it (or a non-critical one ran out of retries), so a leader that dies mid-delivery leaves it for the
next one; the retry time is stored there too, so backoff survives restarts. The event id is the
dedup key: delivery is at least once, and receivers can drop repeats by it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis

from proxy.control.keys import Keys

Severity = Literal["info", "warning", "critical"]
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
OUTBOX_LIMIT = 1000

# kind -> default severity
KINDS: dict[str, Severity] = {
    "rolled_back": "critical",  # automatic rollback by the health check
    "aborted": "warning",  # rollout aborted by a person (traffic back to 0)
    "recovered": "info",  # first passing check after a rollback (resolves the page)
    "started": "info",
    "step_advanced": "info",
    "paused": "warning",
    "resumed": "info",
    "completed": "info",
    "awaiting_approval": "warning",  # an approval step was reached: a person must approve to go on
    "approved": "info",  # a person approved the hold (CLI, admin API or Slack)
    "insufficient_data": "warning",  # too little traffic to judge for a long time
    "overridden": "warning",  # a person set the split by hand during a rollout (paused or ended it)
    "state_lost": "critical",  # Redis lost its data: the split was restored from a proxy's snapshot
    "gate_dry_run_failed": "warning",  # a dry-run metric gate reached its failure limit (not acted on)
}


@dataclass(frozen=True)
class Event:
    kind: str
    group: str
    message: str
    severity: Severity = "info"
    by: str = "leader"
    at: float = field(default_factory=time.time)
    fields: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def rank(self) -> int:
        return SEVERITY_RANK.get(self.severity, 0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Event:
        data = json.loads(raw)
        return cls(
            **{
                k: data[k]
                for k in ("kind", "group", "message", "severity", "by", "at", "fields", "id")
                if k in data
            }
        )


def make(kind: str, group: str, message: str, by: str, **fields: Any) -> Event:
    return Event(kind, group, message, KINDS.get(kind, "info"), by, time.time(), fields)


def alerts_key(keys: Keys) -> str:
    return keys.alerts


def due_key(keys: Keys) -> str:
    return keys.alerts_due


@dataclass(frozen=True)
class Pending:
    """One alert in the outbox: the event, failed rounds so far, targets that already took it."""

    event: Event
    attempts: int = 0
    done: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {"event": json.loads(self.event.to_json()), "attempts": self.attempts, "done": list(self.done)}
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Pending:
        data = json.loads(raw)
        return cls(Event.from_json(json.dumps(data["event"])), int(data["attempts"]), tuple(data["done"]))


def push(pipe: Any, keys: Keys, event: Event) -> None:
    """Queue on a pipeline (so it commits with the transition it describes); due at once."""
    pipe.hset(alerts_key(keys), event.id, Pending(event).to_json())
    pipe.zadd(due_key(keys), {event.id: 0})


async def enqueue(redis: aioredis.Redis, keys: Keys, event: Event) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        push(pipe, keys, event)
        await pipe.execute()


async def due(redis: aioredis.Redis, keys: Keys, now: float, limit: int = OUTBOX_LIMIT) -> list[Pending]:
    """Alerts due by ``now``, critical first, then oldest first."""
    ids: list[Any] = list(await redis.zrangebyscore(due_key(keys), "-inf", now, start=0, num=limit))
    if not ids:
        return []
    raws: list[Any] = await redis.hmget(alerts_key(keys), ids)
    found: list[Pending] = []
    orphans: list[Any] = []
    for alert_id, raw in zip(ids, raws, strict=True):
        try:
            found.append(Pending.from_json(raw))
        except (TypeError, ValueError, KeyError):
            orphans.append(alert_id)
    if orphans:
        await redis.zrem(due_key(keys), *orphans)
    return sorted(found, key=lambda p: (-p.event.rank, p.event.at))


async def finish(redis: aioredis.Redis, keys: Keys, alert_id: str) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hdel(alerts_key(keys), alert_id)
        pipe.zrem(due_key(keys), alert_id)
        await pipe.execute()


async def reschedule(redis: aioredis.Redis, keys: Keys, pending: Pending, at: float) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(alerts_key(keys), pending.event.id, pending.to_json())
        pipe.zadd(due_key(keys), {pending.event.id: at})
        await pipe.execute()


async def pending(redis: aioredis.Redis, keys: Keys) -> list[Pending]:
    """Everything still in the outbox (status, tests)."""
    raws = await redis.hvals(alerts_key(keys))
    return sorted((Pending.from_json(r) for r in raws), key=lambda p: (-p.event.rank, p.event.at))
