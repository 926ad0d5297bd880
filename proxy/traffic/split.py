"""Sticky, monotonic v1/v2 assignment.

bucket = blake2b(salt, group, user key) mod 10000; v2 when bucket < percentage x 100. The hash is
stable across processes and machines (unlike ``hash()``), so every replica agrees, and raising the
percentage only adds buckets, so nobody already on v2 goes back.
"""

from __future__ import annotations

import random
from hashlib import blake2b
from typing import Final

BUCKETS: Final = 10_000


def bucket(salt: bytes, group: str, user_key: bytes) -> int:
    digest = blake2b(b"%s\0%s\0%s" % (salt, group.encode(), user_key), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def choose(percentage: float, salt: bytes, group: str, user_key: bytes | None) -> str:
    """'v2' or 'v1'. Without a user key the choice is random per request (the configured fallback)."""
    if percentage <= 0:
        return "v1"
    if percentage >= 100:
        return "v2"
    threshold = percentage * (BUCKETS / 100)
    if user_key is None:
        return "v2" if random.random() * BUCKETS < threshold else "v1"
    return "v2" if bucket(salt, group, user_key) < threshold else "v1"
