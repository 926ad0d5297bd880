"""One leader per fleet: a Redis lock with expiry, renewed and released only by its holder's token.

Taking the lock (``SET key identity NX PX ttl``) also increments a fencing counter in the same
script (``<lock>:fence``): each leadership gets a number larger than every earlier one. Every
action the leader takes carries that :class:`LeaderToken` and is a compare-and-set that checks,
inside its transaction, that the lock still names this identity and the counter still equals its
fence (``Rollouts._transition``). A leader paused past its TTL (GC, SIGSTOP, a VM migration) that
wakes up and writes what it decided before is refused (argo-rollouts#2117 is the failure avoided).
A Lua script renews or deletes the lock only if the stored identity is still ours. A leader that
dies simply stops renewing: another process takes over within one TTL.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis

_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def make_identity() -> str:
    """Human-readable and unique: host, pid and a random suffix (a pid can be reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def fence_key(lock_key: str) -> str:
    """The fencing counter next to its lock (same hash tag, so one cluster slot)."""
    return f"{lock_key}:fence"


@dataclass(frozen=True, slots=True)
class LeaderToken:
    """What a leader's write proves: the lock names ``identity`` and the counter is at ``fence``."""

    key: str
    identity: str
    fence: int

    @property
    def fence_key(self) -> str:
        return fence_key(self.key)


class LeaderLock:
    def __init__(
        self, redis: aioredis.Redis, key: str, ttl_seconds: float, identity: str | None = None
    ) -> None:
        self._redis = redis
        self.key = key
        self.identity = identity or make_identity()
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        self.held = False
        self.fence = 0  # this leadership's fencing token (0: never led)

    def token(self) -> LeaderToken:
        return LeaderToken(self.key, self.identity, self.fence)

    async def ensure(self) -> bool:
        """Renew if we hold it, else try to take it. Raises on Redis errors (caller decides)."""
        if self.held:
            renewed = await self._redis.eval(_RENEW, 1, self.key, self.identity, self._ttl_ms)
            if renewed:
                return True
            self.held = False
        keys = (self.key, fence_key(self.key))
        fence = await self._redis.eval(_ACQUIRE, 2, *keys, self.identity, self._ttl_ms)
        self.held = bool(fence)
        if self.held:
            self.fence = int(fence)
        return self.held

    async def release(self) -> None:
        if self.held:
            self.held = False
            await self._redis.eval(_RELEASE, 1, self.key, self.identity)

    async def holder(self) -> str | None:
        value = await self._redis.get(self.key)
        return value.decode() if isinstance(value, bytes) else value
