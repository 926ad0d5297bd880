"""Sticky, monotonic v1/v2 assignment.

bucket = blake2b(salt, user key) mod 10000 (one bucket per user for every group; with
``split_hash_per_group``: blake2b(salt, group, user key)); v2 when bucket < percentage x 100. The
hash is stable across processes and machines (unlike ``hash()``), so every replica agrees, and
raising the percentage only adds buckets, so nobody already on v2 goes back. With one bucket per
user, a user on v2 in a group at p% is on v2 in every group at p% or more.
"""

from __future__ import annotations

import random
from hashlib import blake2b
from typing import Final

BUCKETS: Final = 10_000


def bucket(salt: bytes, group: str, user_key: bytes) -> int:
    digest = blake2b(b"%s\0%s\0%s" % (salt, group.encode(), user_key), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def user_bucket(salt: bytes, user_key: bytes) -> int:
    """The user's one bucket, the same in every group (the default)."""
    digest = blake2b(b"%s\0%s" % (salt, user_key), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def choose(percentage: float, salt: bytes, group: str, user_key: bytes | None, per_group: bool = True) -> str:
    """'v2' or 'v1'. Without a user key the choice is random per request (the configured fallback)."""
    if percentage <= 0:
        return "v1"
    if percentage >= 100:
        return "v2"
    threshold = percentage * (BUCKETS / 100)
    if user_key is None:
        return "v2" if random.random() * BUCKETS < threshold else "v1"
    found = bucket(salt, group, user_key) if per_group else user_bucket(salt, user_key)
    return "v2" if found < threshold else "v1"
