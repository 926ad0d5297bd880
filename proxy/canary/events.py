"""Alertable events and the Redis outbox they travel through.

Transitions happen in many places (the leader, the CLI, the admin API of any replica), but alerts
are sent from one: every transition pushes its event to a capped Redis list in the same
transaction that changes the state, and the leader drains that list and hands it to the notifier.
So a ``rollout pause`` typed on a laptop still pages through the proxy's configured targets.
"""

from __future__ import annotations

import json
import time
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
    "insufficient_data": "warning",  # too little traffic to judge for a long time
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

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Event:
        data = json.loads(raw)
        return cls(
            **{
                k: data[k]
                for k in ("kind", "group", "message", "severity", "by", "at", "fields")
                if k in data
            }
        )


def make(kind: str, group: str, message: str, by: str, **fields: Any) -> Event:
    return Event(kind, group, message, KINDS.get(kind, "info"), by, time.time(), fields)


def outbox_key(keys: Keys) -> str:
    return keys.under("canary", "outbox")


def push(pipe: Any, keys: Keys, event: Event) -> None:
    """Queue on a pipeline (so it commits with the transition it describes)."""
    pipe.rpush(outbox_key(keys), event.to_json())
    pipe.ltrim(outbox_key(keys), -OUTBOX_LIMIT, -1)


async def drain(redis: aioredis.Redis, keys: Keys, limit: int = 100) -> list[Event]:
    raw: list[str | bytes] | None = await redis.lpop(outbox_key(keys), limit)  # type: ignore[assignment]
    events = []
    for item in raw or []:
        try:
            events.append(Event.from_json(item))
        except (ValueError, TypeError):
            continue
    return events
