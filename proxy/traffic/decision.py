"""Which version serves a request: one decision shared by HTTP requests and WebSocket upgrades.

force header > match rules (header/cookie/query value -> version, per group) > session pin (a
signed cookie; a rollback wins over it) > sticky key (header, cookie, query parameter, JWT claim,
in the configured order, then the fallback) against the group's percentage. With Redis down and
the ``all_v1`` policy the percentage is 0. Everything is compiled once from settings here;
``choose`` reads only the in-memory snapshot and the request's own bytes.
"""

from __future__ import annotations

import base64
import binascii
import os
import random
from hashlib import blake2b
from typing import Final

import orjson

from proxy.control.snapshot import Snapshot
from proxy.settings import Settings
from proxy.traffic import split

AFFINITY_ATTRIBUTES: Final = b"; Path=/; HttpOnly; SameSite=Lax"
MAX_TOKEN: Final = 8192  # a bearer token longer than this is not read for a key
NO_BUCKET: Final = -1  # placed by the force header or a match rule, not by the split: stays put
PINNED: Final = -2  # placed by a session pin: only a rollback moves it
_random = random.random

Rule = tuple[str, bytes, bytes | None, str]  # (header|cookie|query, name, value or None = any, version)


class BadForce(Exception):
    """The force header named something other than v1 or v2."""


class Decider:
    """Resolved once from settings; ``choose`` is pure apart from the random fallback."""

    def __init__(self, settings: Settings) -> None:
        self.salt = settings.hash_salt.encode()
        self.user_header = settings.user_key_header.lower().encode()
        self.user_cookie = settings.user_key_cookie.encode() if settings.user_key_cookie else None
        self.user_query = settings.user_key_query.encode() if settings.user_key_query else None
        self.sources = tuple(settings.user_key_sources)
        self.jwt_claim = settings.user_key_jwt_claim
        self.fallback = settings.user_key_fallback
        self.affinity = settings.affinity_cookie_name.encode()
        self.force = settings.force_header.lower().encode() if settings.force_header_enabled else None
        self.all_v1_when_down = settings.redis_down_policy == "all_v1"

        groups = ["default", *(group.name for group in settings.routes)]
        compiled: list[tuple[str, Rule]] = []
        wanted: set[bytes] = set()
        for rule in settings.match_rules:
            if rule.header:
                kind, name = "header", rule.header.lower().encode()
                wanted.add(name)
            elif rule.cookie:
                kind, name = "cookie", rule.cookie.encode()
            else:
                kind, name = "query", (rule.query or "").encode()
            value = None if rule.value == "*" else rule.value.encode()
            compiled.append((rule.group, (kind, name, value, rule.version)))
        self._rules: dict[str, tuple[Rule, ...]] = {
            group: tuple(r for g, r in compiled if g in ("*", group)) for group in groups
        }
        if "jwt" in self.sources:
            wanted.add(b"authorization")
        # request headers (besides the user-key header and cookies) the decision reads
        self.wanted = frozenset(wanted)

        pinning = settings.session_pinning
        pinned = groups if "*" in pinning.groups else pinning.groups
        self._pin_names = {group: f"{pinning.cookie_prefix}_{group}".encode() for group in pinned}
        self._pin_age = b"%d" % pinning.max_age_seconds
        self._pin_values = {
            (group, version): self._pin_value(group, version) for group in pinned for version in ("v1", "v2")
        }

    def _pin_value(self, group: str, version: str) -> bytes:
        """``v2.<mac>``: keyed with the salt, so a client cannot pin itself to a version it was never
        given (that would be a force header the operator may have turned off)."""
        mac = blake2b(b"pin\0%s\0%s" % (group.encode(), version.encode()), key=self.salt[:64], digest_size=9)
        return version.encode() + b"." + mac.hexdigest().encode()

    def percentage(self, snapshot: Snapshot, group: str) -> float:
        if self.all_v1_when_down and not snapshot.redis_ok:
            return 0.0
        return snapshot.percentage(group)

    def choose(
        self,
        snapshot: Snapshot,
        group: str,
        forced: bytes | None,
        header_key: bytes | None,
        cookie: bytes | None,
        query: bytes,
        client_host: str | None,
        picked: dict[bytes, bytes] | None = None,
        websocket: bool = False,
    ) -> tuple[str, int, list[bytes] | None]:
        """(version, bucket, Set-Cookie values or None). The bucket places a long-lived connection
        so it can be judged again when the split moves (random when there was no key;
        ``NO_BUCKET`` when a force header or rule placed it, ``PINNED`` for a pin).

        Raises ``BadForce`` for a force header other than v1/v2."""
        if forced is not None:
            if forced == b"v1" or forced == b"v2":
                return forced.decode(), NO_BUCKET, None
            raise BadForce()
        rules = self._rules.get(group)
        if rules:
            for kind, name, value, version in rules:
                if kind == "header":
                    found = header_key if name == self.user_header else (picked.get(name) if picked else None)
                elif kind == "cookie":
                    found = cookie_value(cookie, name) if cookie else None
                else:
                    found = query_value(query, name) if query else None
                if found is not None and (value is None or found == value):
                    return version, NO_BUCKET, None
        percentage = self.percentage(snapshot, group)
        pin_name = self._pin_names.get(group) if self._pin_names else None
        if pin_name is not None and cookie is not None:
            pin = cookie_value(cookie, pin_name)
            if pin is not None:
                if pin == self._pin_values[(group, "v2")] and percentage > 0:
                    return "v2", PINNED, None
                if pin == self._pin_values[(group, "v1")]:
                    return "v1", PINNED, None
                # a v2 pin during a rollback, or a pin we did not sign: decided afresh below
        set_cookies: list[bytes] | None = None
        user_key = self._key(header_key, cookie, query, picked)
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
                        set_cookies = [self.affinity + b"=" + user_key + AFFINITY_ATTRIBUTES]
        if not websocket and pin_name is None and (percentage <= 0 or percentage >= 100):
            return ("v1" if percentage <= 0 else "v2"), NO_BUCKET, set_cookies
        if user_key is not None:
            bucket = split.bucket(self.salt, group, user_key)
        else:
            bucket = int(_random() * split.BUCKETS)  # C-level: randrange is a Python call chain
        if percentage <= 0:
            version = "v1"
        else:
            version = "v2" if percentage >= 100 or bucket < percentage * (split.BUCKETS / 100) else "v1"
        if pin_name is not None:
            pin_cookie = b"%s=%s; Max-Age=%s; Path=/; HttpOnly; SameSite=Lax" % (
                pin_name, self._pin_values[(group, version)], self._pin_age,
            )  # fmt: skip
            set_cookies = [*(set_cookies or ()), pin_cookie]
        return version, bucket, set_cookies

    def _key(
        self, header_key: bytes | None, cookie: bytes | None, query: bytes, picked: dict[bytes, bytes] | None
    ) -> bytes | None:
        """The first sticky key found, in the configured order of sources."""
        for source in self.sources:
            if source == "header":
                if header_key is not None:
                    return header_key
            elif source == "cookie":
                if cookie is not None and self.user_cookie is not None:
                    found = cookie_value(cookie, self.user_cookie)
                    if found is not None:
                        return found
            elif source == "query":
                if query and self.user_query is not None:
                    found = query_value(query, self.user_query)
                    if found:
                        return found
            elif picked:
                authorization = picked.get(b"authorization")
                if authorization is not None:
                    claim = jwt_claim(authorization, self.jwt_claim)
                    if claim is not None:
                        return b"jwt:" + claim
        return None


def jwt_claim(authorization: bytes, claim: str) -> bytes | None:
    """A claim of a bearer JWT, read WITHOUT verifying the signature: the key only picks a bucket
    and grants nothing, and the backends verify the token themselves. Anything malformed: None."""
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token or len(token) > MAX_TOKEN:
        return None
    parts = token.strip().split(b".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        return None
    if not isinstance(decoded, dict):
        return None
    value = decoded.get(claim)
    if isinstance(value, str) and value:
        return value.encode()
    if isinstance(value, int) and not isinstance(value, bool):
        return b"%d" % value
    return None


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
