"""Writes to the control state, shared by the CLI and the admin API.

Every write is validated first (a bad value never reaches Redis from our own tools) and followed
by a publish on the change channel so every replica refreshes at once instead of at the next poll.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from proxy.control import splitstate
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
            await self.split_writer(group or "default", value, by)  # notes the split state itself
        else:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(self.keys.split(group), f"{value:g}")
                splitstate.note(pipe, self.keys, group or "default", value)
                await pipe.execute()
        await self.publish(f"split:{group or 'default'}")
        return value

    async def clear_split(self, group: str) -> None:
        """Remove a group's override so it follows the global split again."""
        await self.redis.delete(self.keys.split(group))
        await self.publish(f"split:{group}")

    async def rollback(
        self, group: str | None, known: list[str], by: str = "operator"
    ) -> dict[str, str | None]:
        """Set to 0 one group, or (``group`` None) the global key and every group key that exists.

        Without a group, "every group" is the union of ``known`` (config and registered groups)
        and every ``<split_key>:*`` key actually in Redis, so a group set by a proxy whose config
        this CLI has never seen still goes back to v1. Returns each changed key's previous raw value.
        """
        if group is not None:
            targets = [group]
        else:
            found = set(known) - {"default"}
            prefix = self.keys.group_split_prefix
            async for key in self.redis.scan_iter(match=prefix + "*", count=500):
                found.add((as_text(key) or "")[len(prefix) :])
            ordered = sorted(found)
            values = await self.redis.mget([self.keys.split(g) for g in ordered]) if ordered else []
            targets = ["default"] + [g for g, v in zip(ordered, values, strict=True) if v is not None]
        before = await self.redis.mget([self.keys.split(g) for g in targets])
        if self.split_writer is not None:
            # through the rollout-aware writer: each group's split and rollout state change together,
            # so a rollout in progress ends and automation never undoes the rollback
            for name in targets:
                await self.split_writer(name, 0.0, by)
        # a rollback, not a plain 0%: match rules yield to it (unless survives_rollback) and pins
        # issued before it are void
        async with self.redis.pipeline(transaction=True) as pipe:
            for name in targets:
                if self.split_writer is None:
                    pipe.set(self.keys.split(name), "0")
                splitstate.note(pipe, self.keys, name, 0.0, rollback=True)
            await pipe.execute()
        await self.publish(f"split:{group or '*'}")
        return {name: as_text(value) for name, value in zip(targets, before, strict=True)}

    async def registered_groups(self) -> dict[str, dict[str, Any]]:
        """Route groups running proxies registered (``strangler:groups``): patterns and share served."""
        raw = await self.redis.hgetall(self.keys.groups)
        out: dict[str, dict[str, Any]] = {}
        for key, value in raw.items():
            try:
                info = json.loads(as_text(value) or "")
            except ValueError:
                continue
            if isinstance(info, dict):
                out[as_text(key) or ""] = info
        return out

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
