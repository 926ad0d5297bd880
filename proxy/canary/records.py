"""Where verdicts and decisions live in Redis (a leaf: the status view built from them is
``canary/statusview``, which also reads rollouts; this module imports nothing of the canary).

- ``<prefix>canary:verdict:<group>``: the last check (JSON), with the failure streak and the
  insufficient-data clock, so a new leader carries on where the old one stopped; with the
  statistical judge also its ``tally`` (counts and evidence of the judged period, ``judge.Tally``).
- ``<prefix>canary:decision:<group>``: the last rollback decision (JSON).
- ``<prefix>canary:decisions``: the last 100 decisions, newest first.
- ``<prefix>canary:leader``: the leader lock (holder identity, with expiry).
- ``<prefix>canary:since:<group>``: when the group's canary history last started afresh (a new
  rollout, a split set by hand): failure streaks and window seconds from before it are not judged.
- ``<prefix>control:lost``: written by a proxy that saw Redis lose its data (see ``control/store``);
  the leader alerts on it, status shows it until someone sets a split by hand.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from proxy.control.keys import Keys

DECISIONS_LIMIT = 100


def verdict_key(keys: Keys, group: str) -> str:
    return keys.canary_verdict(group)


def decision_key(keys: Keys, group: str) -> str:
    return keys.canary_decision(group)


def decisions_key(keys: Keys) -> str:
    return keys.canary_decisions


def leader_key(keys: Keys) -> str:
    return keys.canary_leader


def since_key(keys: Keys, group: str) -> str:
    return keys.canary_since(group)


def lost_key(keys: Keys) -> str:
    return keys.lost_state


def load(raw: Any) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def read_many(redis: aioredis.Redis, keys: list[str]) -> list[dict[str, Any] | None]:
    if not keys:
        return []
    return [load(raw) for raw in await redis.mget(keys)]
