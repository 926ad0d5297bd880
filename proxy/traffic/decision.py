"""Which version serves a request: one decision shared by HTTP requests and WebSocket upgrades.

force header > match rules (header/cookie/query value -> version, per group; a v2 rule yields to
a rollback in force unless it ``survives_rollback``) > session pin (signed, bound to the user key
or a random session id, honoured only while 0 < percentage < 100 and under the epoch it was issued
in) > sticky key (header, cookie, query parameter, JWT claim, in the configured order, then the
fallback) against the group's percentage. The same key gives the same bucket whatever source it
came from (query values percent-decoded, no per-source prefix, empty values absent) and, unless
``split_hash_per_group``, in every group. With Redis down and the ``all_v1`` policy the percentage
is 0. Everything is compiled once from settings here; ``choose`` reads only the in-memory snapshot
and the request's own bytes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import random
import secrets
import time
from hashlib import blake2b
from pathlib import Path
from typing import Final
from urllib.parse import unquote_to_bytes

import orjson

from proxy.control.snapshot import Snapshot
from proxy.settings import PinningSettings, Settings
from proxy.traffic import split

COOKIE_ATTRIBUTES: Final = b"; Path=/; HttpOnly; SameSite=Lax"
SECURE: Final = b"; Secure"
MAX_TOKEN: Final = 8192  # a bearer token longer than this is not read for a key
NO_BUCKET: Final = -1  # placed by the force header or a match rule, not by the split: stays put
PINNED: Final = -2  # placed by a session pin: only a rollback moves it
PIN_SKEW: Final = 300  # seconds a pin's issue time may be ahead of this proxy's clock
_random = random.random
_now = time.time

# (header|cookie|query, name, value or None = any, version, survives a rollback)
Rule = tuple[str, bytes, bytes | None, str, bool]


class BadForce(Exception):
    """The force header named something other than v1 or v2."""


class Decider:
    """Resolved once from settings; ``choose`` is pure apart from the random fallback and the clock
    (read only for pins)."""

    def __init__(self, settings: Settings) -> None:
        self.salt = settings.hash_salt.encode()
        self.per_group = settings.split_hash_per_group
        self.user_header = settings.user_key_header.lower().encode()
        self.user_cookie = settings.user_key_cookie.encode() if settings.user_key_cookie else None
        self.user_query = settings.user_key_query.encode() if settings.user_key_query else None
        self.sources = tuple(settings.user_key_sources)
        self.jwt_claim = settings.user_key_jwt_claim
        self.fallback = settings.user_key_fallback
        self.affinity = settings.affinity_cookie_name.encode()
        age = settings.affinity_cookie_max_age_seconds
        self._affinity_attributes = (b"; Max-Age=%d" % age if age else b"") + COOKIE_ATTRIBUTES
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
            compiled.append((rule.group, (kind, name, value, rule.version, rule.survives_rollback)))
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
        self._pin_age = pinning.max_age_seconds
        self._pin_key = pin_secret(pinning) if pinned else b""

    def _pin_mac(self, group: str, version: bytes, epoch: bytes, issued: bytes, subject: bytes) -> bytes:
        """Keyed with the pin secret over everything the pin says and whom it was given to: a
        client cannot make one, and a copied one does not work for another user key."""
        mac = blake2b(
            b"pin\0%s\0%s\0%s\0%s\0%s" % (group.encode(), version, epoch, issued, subject),
            key=self._pin_key, digest_size=12,
        )  # fmt: skip
        return mac.hexdigest().encode()

    def _pin_cookie(self, name: bytes, group: str, version: str, epoch: int, user_key: bytes | None) -> bytes:
        """``<version>.<epoch>.<issued>.<session id or empty>.<mac>``: bound to the user key when
        there is one, else to a random session id carried in the pin."""
        sid = b"" if user_key is not None else os.urandom(8).hex().encode()
        subject = b"k:" + user_key if user_key is not None else b"s:" + sid
        v, e, t = version.encode(), b"%d" % epoch, b"%d" % int(_now())
        value = b"%s.%s.%s.%s.%s" % (v, e, t, sid, self._pin_mac(group, v, e, t, subject))
        return b"%s=%s; Max-Age=%d" % (name, value, self._pin_age) + COOKIE_ATTRIBUTES

    def _pinned(self, pin: bytes, group: str, epoch: int, user_key: bytes | None) -> str | None:
        """The version a valid pin holds, else None (forged, copied, expired, or from before the
        group's last rollback, rollout start or completion)."""
        parts = pin.split(b".")
        if len(parts) != 5:
            return None
        v, e, t, sid, mac = parts
        if (v != b"v1" and v != b"v2") or e != b"%d" % epoch or not t.isdigit():
            return None
        if user_key is not None:
            if sid:
                return None  # a keyless session's pin on a request with a user key: not this user's
            subject = b"k:" + user_key
        elif sid:
            subject = b"s:" + sid
        else:
            return None
        issued = int(t)
        now = _now()
        if issued > now + PIN_SKEW or now - issued > self._pin_age:
            return None
        if not hmac.compare_digest(mac, self._pin_mac(group, v, e, t, subject)):
            return None
        return v.decode()

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
        tls: bool = False,
    ) -> tuple[str, int, list[bytes] | None]:
        """(version, bucket, Set-Cookie values or None). The bucket places a long-lived connection
        so it can be judged again when the split moves (random when there was no key;
        ``NO_BUCKET`` when a force header or rule placed it, ``PINNED`` for a pin). ``tls``: the
        client connection is TLS, so the cookies set are ``Secure``.

        Raises ``BadForce`` for a force header other than v1/v2."""
        if forced is not None:
            if forced == b"v1" or forced == b"v2":
                return forced.decode(), NO_BUCKET, None
            raise BadForce()
        percentage = self.percentage(snapshot, group)
        rules = self._rules.get(group)
        if rules:
            for kind, name, value, version, survives in rules:
                if kind == "header":
                    found = header_key if name == self.user_header else (picked.get(name) if picked else None)
                elif kind == "cookie":
                    found = cookie_value(cookie, name) if cookie else None
                else:
                    found = query_value(query, name) if query else None
                if found is not None and (value is None or found == value):
                    if version == "v2" and not survives and percentage <= 0 and snapshot.rolled_back(group):
                        return "v1", NO_BUCKET, None  # a rollback means everyone
                    return version, NO_BUCKET, None
        ramping = 0 < percentage < 100
        if not ramping and not websocket and self.fallback != "affinity_cookie":
            return ("v1" if percentage <= 0 else "v2"), NO_BUCKET, None  # no pin at the ends
        pin_name = self._pin_names.get(group) if self._pin_names else None
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
                        attributes = self._affinity_attributes + SECURE if tls else self._affinity_attributes
                        set_cookies = [self.affinity + b"=" + user_key + attributes]
        if pin_name is not None and ramping:
            epoch = snapshot.epoch(group)
            pin = cookie_value(cookie, pin_name) if cookie is not None else None
            if pin is not None:
                held = self._pinned(pin, group, epoch, user_key)
                if held is not None:
                    return held, PINNED, set_cookies
        if not websocket and not ramping:
            return ("v1" if percentage <= 0 else "v2"), NO_BUCKET, set_cookies
        if user_key is not None:
            if self.per_group:
                bucket = split.bucket(self.salt, group, user_key)
            else:
                bucket = split.user_bucket(self.salt, user_key)
        else:
            bucket = int(_random() * split.BUCKETS)  # C-level: randrange is a Python call chain
        if percentage <= 0:
            version = "v1"
        else:
            version = "v2" if percentage >= 100 or bucket < percentage * (split.BUCKETS / 100) else "v1"
        if pin_name is not None and ramping:
            pin_cookie = self._pin_cookie(pin_name, group, version, snapshot.epoch(group), user_key)
            set_cookies = [*(set_cookies or ()), pin_cookie + SECURE if tls else pin_cookie]
        return version, bucket, set_cookies

    def _key(
        self, header_key: bytes | None, cookie: bytes | None, query: bytes, picked: dict[bytes, bytes] | None
    ) -> bytes | None:
        """The first sticky key found, in the configured order of sources: the same bytes whatever
        the source (a header as sent, a cookie or query value percent-decoded, a JWT claim as
        UTF-8); an empty value is absent."""
        for source in self.sources:
            if source == "header":
                if header_key:
                    return header_key
            elif source == "cookie":
                if cookie is not None and self.user_cookie is not None:
                    found = cookie_value(cookie, self.user_cookie)
                    if found is not None:
                        # cookie values are often percent-encoded (they cannot hold ; , or spaces)
                        return unquote_to_bytes(found) if b"%" in found else found
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
                        return claim
        return None


def pin_secret(pinning: PinningSettings) -> bytes:
    """The configured pin secret, else the one in ``secret_file``, else a new one written there
    (mode 0600, created atomically so workers starting together agree on one)."""
    if pinning.secret is not None:
        return pinning.secret.get_secret_value().encode()[:64]
    path = Path(pinning.secret_file)
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing.encode()[:64]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    try:
        os.link(temporary, path)  # fails if another process made it first: then theirs is used
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    return path.read_text().strip().encode()[:64]


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
    """The value of ``name`` in a query string, decoded as a browser encodes it (``%XX`` escapes,
    ``+`` for a space), so ``?uid=alice%40example.com`` is the key ``alice@example.com``."""
    for part in query.split(b"&"):
        key, sep, value = part.partition(b"=")
        if sep and key == name:
            if b"%" in value or b"+" in value:
                return unquote_to_bytes(value.replace(b"+", b" "))
            return value
    return None
