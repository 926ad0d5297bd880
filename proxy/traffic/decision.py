"""Which version serves a request: one decision shared by HTTP requests and WebSocket upgrades.

force header > sticky key (header, cookie, query parameter, then the configured fallback) against
the group's percentage; with Redis down and the ``all_v1`` policy, everything goes to v1. Settings
are resolved once here; ``choose`` reads only the in-memory snapshot.
"""

from __future__ import annotations

import os
import random

from proxy.control.snapshot import Snapshot
from proxy.settings import Settings
from proxy.traffic import split

AFFINITY_ATTRIBUTES = b"; Path=/; HttpOnly; SameSite=Lax"


class BadForce(Exception):
    """The force header named something other than v1 or v2."""


class Decider:
    """Resolved once from settings; ``choose`` is pure apart from the random fallback."""

    __slots__ = ("salt", "user_header", "user_cookie", "user_query", "fallback", "affinity", "force",
                 "all_v1_when_down")  # fmt: skip

    def __init__(self, settings: Settings) -> None:
        self.salt = settings.hash_salt.encode()
        self.user_header = settings.user_key_header.lower().encode()
        self.user_cookie = settings.user_key_cookie.encode() if settings.user_key_cookie else None
        self.user_query = settings.user_key_query.encode() if settings.user_key_query else None
        self.fallback = settings.user_key_fallback
        self.affinity = settings.affinity_cookie_name.encode()
        self.force = settings.force_header.lower().encode() if settings.force_header_enabled else None
        self.all_v1_when_down = settings.redis_down_policy == "all_v1"

    def percentage(self, snapshot: Snapshot, group: str) -> float:
        if self.all_v1_when_down and not snapshot.redis_ok:
            return 0.0
        return snapshot.percentage(group)

    def choose(
        self,
        snapshot: Snapshot,
        group: str,
        forced: bytes | None,
        user_key: bytes | None,
        cookie: bytes | None,
        query: bytes,
        client_host: str | None,
        websocket: bool = False,
    ) -> tuple[str, int, bytes | None]:
        """(version, bucket, Set-Cookie value or None). The bucket places a long-lived connection
        so it can be judged again when the split moves (random when there was no key).

        Raises ``BadForce`` for a force header other than v1/v2."""
        if forced is not None:
            if forced == b"v1" or forced == b"v2":
                return forced.decode(), -1, None
            raise BadForce()
        percentage = self.percentage(snapshot, group)
        set_cookie: bytes | None = None
        if user_key is None and cookie is not None and self.user_cookie is not None:
            user_key = cookie_value(cookie, self.user_cookie)
        if user_key is None and self.user_query is not None and query:
            user_key = query_value(query, self.user_query) or None
        if user_key is None:
            if websocket and cookie is not None:
                # browsers cannot set headers on a WebSocket: the affinity cookie an earlier HTTP
                # answer set keeps the socket on the same version as the page
                user_key = cookie_value(cookie, self.affinity)
            if user_key is None:
                if self.fallback == "client_ip":
                    user_key = client_host.encode() if client_host else None
                elif self.fallback == "affinity_cookie":
                    user_key = cookie_value(cookie, self.affinity) if cookie else None
                    if user_key is None:
                        user_key = os.urandom(12).hex().encode()
                        set_cookie = self.affinity + b"=" + user_key + AFFINITY_ATTRIBUTES
        if not websocket and (percentage <= 0 or percentage >= 100):
            return ("v1" if percentage <= 0 else "v2"), -1, set_cookie
        bucket = (
            split.bucket(self.salt, group, user_key)
            if user_key is not None
            else random.randrange(split.BUCKETS)
        )
        if percentage <= 0:
            return "v1", bucket, set_cookie
        version = "v2" if percentage >= 100 or bucket < percentage * (split.BUCKETS / 100) else "v1"
        return version, bucket, set_cookie


def cookie_value(cookie: bytes, name: bytes) -> bytes | None:
    for part in cookie.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == name and value:
            return value
    return None


def query_value(query: bytes, name: bytes) -> bytes | None:
    for part in query.split(b"&"):
        key, sep, value = part.partition(b"=")
        if sep and key == name:
            return value
    return None
