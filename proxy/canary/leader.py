"""One leader per fleet: a Redis lock with expiry, renewed and released only by its holder's token.

``SET key token NX PX ttl`` takes it; a Lua script renews or deletes it only if the stored token is
still ours, so a slow ex-leader whose lock expired cannot extend or free the new leader's lock.
A leader that dies simply stops renewing: another process takes over within one TTL.
"""

from __future__ import annotations

import os
import socket
import uuid

import redis.asyncio as aioredis

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


class LeaderLock:
    def __init__(
        self, redis: aioredis.Redis, key: str, ttl_seconds: float, identity: str | None = None
    ) -> None:
        self._redis = redis
        self.key = key
        self.identity = identity or make_identity()
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        self.held = False

    async def ensure(self) -> bool:
        """Renew if we hold it, else try to take it. Raises on Redis errors (caller decides)."""
        if self.held:
            renewed = await self._redis.eval(_RENEW, 1, self.key, self.identity, self._ttl_ms)
            if renewed:
                return True
            self.held = False
        taken = await self._redis.set(self.key, self.identity, nx=True, px=self._ttl_ms)
        self.held = bool(taken)
        return self.held

    async def release(self) -> None:
        if self.held:
            self.held = False
            await self._redis.eval(_RELEASE, 1, self.key, self.identity)

    async def holder(self) -> str | None:
        value = await self._redis.get(self.key)
        return value.decode() if isinstance(value, bytes) else value
