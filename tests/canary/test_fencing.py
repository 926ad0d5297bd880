"""Fencing: a leader paused past its lock's TTL (SIGSTOP) that wakes after another took over cannot
write what it decided before (argo-rollouts#2117). Real processes, real Redis, no clock tricks:
the pause point is the action's own race hook, so the timing is decided by the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import psutil
import pytest
import redis

from proxy.canary import records
from proxy.canary.leader import LeaderLock, fence_key
from proxy.canary.rollout import Rollouts
from proxy.control.keys import Keys
from tests.support import ROOT, wait_until


def start_rollout(url: str, keys: Keys) -> None:
    async def go() -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url)
        await Rollouts(client, keys).start("default", [10, 50, 100], 1, "test")
        await client.aclose()

    asyncio.run(go())


def leader(url: str, prefix: str, action: str, stop: bool) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "tests.canary.fenced_leader", url, prefix, action]
    args += ["--stop"] if stop else []
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    text = proc.stdout.readline()
    assert text, proc.stderr.read() if proc.stderr else "no output"
    return dict(json.loads(text))


@pytest.mark.parametrize("action", ["advance", "rollback"])
def test_a_deposed_leader_that_wakes_up_late_cannot_write(redis_url: str, action: str) -> None:
    prefix = f"fence-{uuid.uuid4().hex[:8]}:"
    keys = Keys(split_key=f"{prefix}split", prefix=prefix)
    sync = redis.Redis.from_url(redis_url)
    start_rollout(redis_url, keys)
    before = sync.get(f"{prefix}rollout:default")
    lock_key = records.leader_key(keys)

    old = leader(redis_url, prefix, action, stop=True)
    try:
        first = line(old)["leading"]
        assert line(old)["paused"] == action
        wait_until(lambda: psutil.Process(old.pid).status() == psutil.STATUS_STOPPED, timeout=10)
        stopped_at = time.monotonic()
        wait_until(lambda: sync.exists(lock_key) == 0, timeout=10, message="the lock never expired")

        async def take_over() -> int:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(redis_url)
            lock = LeaderLock(client, lock_key, 30, "new-leader")
            assert await lock.ensure()
            await client.aclose()
            return lock.fence

        new_fence = asyncio.run(take_over())
        taken_over = time.monotonic() - stopped_at
        assert new_fence == first + 1
        os.kill(old.pid, signal.SIGCONT)
        result = line(old)
        assert old.wait(timeout=20) == 0
    finally:
        if old.poll() is None:
            os.kill(old.pid, signal.SIGCONT)
            old.kill()
    print(f"fencing ({action}): takeover {taken_over:.2f} s after the stop; "
          f"woken leader refused {result.get('refused_after_seconds')} s after SIGCONT")  # fmt: skip
    assert result["result"] == "refused", result
    assert f"fencing token {first}" in str(result["reason"])
    assert sync.get(f"{prefix}rollout:default") == before  # nothing written
    assert sync.get(keys.split("default")) == b"10"
    assert sync.get(records.decision_key(keys, "default")) is None
    assert sync.get(fence_key(lock_key)) == str(new_fence).encode()


@pytest.mark.parametrize("action", ["advance", "rollback"])
def test_the_same_leader_action_applies_while_the_token_is_current(redis_url: str, action: str) -> None:
    """The control case: the harness is able to write when nobody took over."""
    prefix = f"fence-{uuid.uuid4().hex[:8]}:"
    keys = Keys(split_key=f"{prefix}split", prefix=prefix)
    sync = redis.Redis.from_url(redis_url)
    start_rollout(redis_url, keys)
    proc = leader(redis_url, prefix, action, stop=False)
    fence = line(proc)["leading"]
    result = line(proc)
    assert proc.wait(timeout=20) == 0
    assert result == {"result": "applied", "fence": fence}
    state = json.loads(sync.get(f"{prefix}rollout:default") or b"{}")
    assert state["last"]["fence"] == fence
    assert sync.get(keys.split("default")) == (b"50" if action == "advance" else b"0")
    if action == "rollback":
        assert json.loads(sync.get(records.decision_key(keys, "default")) or b"{}")["fence"] == fence
