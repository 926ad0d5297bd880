"""A canary leader in its own process, for the fencing test (tests/canary/test_fencing.py).

    python -m tests.canary.fenced_leader REDIS_URL PREFIX ACTION [--stop]

It takes the leader lock (TTL 1 s) as a real ``CanaryController`` and makes one leader action
(``advance`` or ``rollback``) through ``Rollouts``. With ``--stop`` it SIGSTOPs itself between the
action's reads and its write (the race hook), so the test decides exactly when it wakes up.
Prints one JSON line: applied or refused, the fencing token, and how long the refusal took after
waking.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence

import redis.asyncio as aioredis

from proxy.canary import events, records
from proxy.canary.controller import CanaryController
from proxy.canary.rollout import Rollouts, Superseded
from proxy.control.client import ControlClient
from proxy.control.keys import Keys
from proxy.metrics import Metrics
from proxy.settings import Settings


async def no_shadow_report() -> dict[str, tuple[int, int]]:
    return {}


async def no_parity_gate(tables: Sequence[str]) -> list[str]:
    return []


async def main(url: str, prefix: str, action: str, stop: bool) -> dict[str, object]:
    settings = Settings(redis_url=url, canary={"leader_lock_ttl_seconds": 1, "check_interval_seconds": 0.3})
    redis = aioredis.Redis.from_url(url)
    keys = Keys(split_key=f"{prefix}split", prefix=prefix)
    woke: list[float] = []

    async def hook(name: str, group: str) -> None:
        if stop and not woke:
            print(json.dumps({"paused": name}), flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)  # the test sends SIGCONT after a takeover
            woke.append(time.monotonic())

    rollouts = Rollouts(redis, keys, race_hook=hook)
    controller = CanaryController(
        settings, redis, keys, ControlClient(redis, keys, rollouts.manual_split), Metrics(), rollouts,
        identity=f"fenced-{os.getpid()}", shadow_totals=no_shadow_report, parity_behind=no_parity_gate,
    )  # fmt: skip
    assert await controller.keep_lock(), "the test left the lock taken"
    token = controller.leader_token()
    print(json.dumps({"leading": token.fence}), flush=True)
    state = await rollouts.get("default")
    assert state is not None
    try:
        if action == "advance":
            done = await rollouts.advance("default", state.seq, token, {"verdict": "pass"})
            applied = done is not None
        else:
            event = events.make("rolled_back", "default", "fencing test rollback", f"leader {token.identity}")
            decision = {"action": "rollback", "reason": "fencing test"}
            since = await redis.get(records.since_key(keys, "default"))  # the history the checks judged
            done_ = await rollouts.rollback("default", decision, event, token, float(since or 0))
            applied = done_ is not False
        result: dict[str, object] = {"result": "applied" if applied else "declined"}
    except Superseded as exc:
        result = {"result": "refused", "reason": str(exc)}
    if woke:
        result["refused_after_seconds"] = round(time.monotonic() - woke[0], 4)
    result["fence"] = token.fence
    await redis.aclose()
    return result


if __name__ == "__main__":
    url, prefix, action = sys.argv[1:4]
    print(json.dumps(asyncio.run(main(url, prefix, action, "--stop" in sys.argv))), flush=True)
