"""Writes to the control state, shared by the CLI and the admin API.

Every write is validated first (a bad value never reaches Redis from our own tools) and followed
by a publish on the change channel so every replica refreshes at once instead of at the next poll.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from proxy.control.keys import Keys
from proxy.control.snapshot import as_text, parse_percentage


class InvalidValue(ValueError):
    """A value our own tools refuse to write; the message says what would be accepted."""


# (group, value, by): writes a hand-set share atomically with whatever else must change with it
# (the canary pauses a running rollout in the same transaction). Passed in by the composition root,
# so this module never imports a capability.
SplitWriter = Callable[[str, float, str], Awaitable[Any]]


class ControlClient:
    def __init__(self, redis: aioredis.Redis, keys: Keys, split_writer: SplitWriter | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.split_writer = split_writer

    async def publish(self, what: str) -> None:
        await self.redis.publish(self.keys.changes_channel, what)

    async def get_split(self, groups: list[str]) -> dict[str, str | None]:
        """Raw values per group ('default' is the global key); None where unset."""
        values = await self.redis.mget([self.keys.split(group) for group in groups])
        return {group: as_text(value) for group, value in zip(groups, values, strict=True)}

    async def set_split(
        self, percentage: float | str, group: str | None = None, by: str = "operator"
    ) -> float:
        """A share written by hand; it always applies (the split writer pauses automation)."""
        try:
            value = parse_percentage(str(percentage))
        except ValueError as exc:
            raise InvalidValue(f"{percentage!r} is not a percentage between 0 and 100") from exc
        assert value is not None
        if self.split_writer is not None:
            await self.split_writer(group or "default", value, by)
        else:
            await self.redis.set(self.keys.split(group), f"{value:g}")
        await self.publish(f"split:{group or 'default'}")
        return value

    async def clear_split(self, group: str) -> None:
        """Remove a group's override so it follows the global split again."""
        await self.redis.delete(self.keys.split(group))
        await self.publish(f"split:{group}")

    async def set_hash_fields(self, name: str, fields: dict[str, Any]) -> None:
        """Write fields of a capability's control hash (e.g. shadow settings) and announce it."""
        key = self.keys.hash(name)
        async with self.redis.pipeline(transaction=True) as pipe:
            for field, value in fields.items():
                if value is None:
                    pipe.hdel(key, field)
                else:
                    pipe.hset(key, field, value if isinstance(value, str | bytes) else str(value))
            await pipe.execute()
        await self.publish(name)

    async def get_hash(self, name: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self.keys.hash(name))
        return {as_text(k) or "": as_text(v) or "" for k, v in raw.items()}
