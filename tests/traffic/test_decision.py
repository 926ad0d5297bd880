"""The shared version decision, as a pure function: key sources, JWT claims, rules, pins."""

from __future__ import annotations

import base64
import json
import time
from hashlib import blake2b
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from proxy.control.snapshot import Snapshot
from proxy.settings import ConfigError, Settings, load_settings
from proxy.traffic import split
from proxy.traffic.decision import NO_BUCKET, PINNED, BadForce, Decider, jwt_claim


def b64(data: Any) -> bytes:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def bearer(payload: Any) -> bytes:
    return b"Bearer " + b64({"alg": "none"}) + b"." + b64(payload) + b".sig"


@pytest.mark.parametrize(
    ("authorization", "claim", "expected"),
    [
        (bearer({"sub": "alice"}), "sub", b"alice"),
        (bearer({"sub": 42}), "sub", b"42"),
        (bearer({"tenant": "t1", "sub": "a"}), "tenant", b"t1"),
        (bearer({"sub": True}), "sub", None),  # not a string or an integer
        (bearer({"sub": ""}), "sub", None),
        (bearer(["sub"]), "sub", None),  # not an object
        (bearer({"other": 1}), "sub", None),
        (b"Basic " + b64(b"user:pass"), "sub", None),
        (b"Bearer onlyonepart", "sub", None),
        (b"Bearer a.%%%.c", "sub", None),  # not base64
        (b"Bearer a." + b64(b"\xff\xfe") + b".c", "sub", None),  # not JSON
        (b"Bearer " + b"a." * 5000 + b"c", "sub", None),  # over the size bound
        (b"bearer " + bearer({"sub": "x"})[7:], "sub", b"x"),  # scheme is case-insensitive
    ],
)
def test_jwt_claim_is_read_without_verification_and_never_raises(
    authorization: bytes, claim: str, expected: bytes | None
) -> None:
    assert jwt_claim(authorization, claim) == expected


def snapshot(percentage: float) -> Snapshot:
    return Snapshot(global_percentage=percentage, redis_ok=True)


SECRET = "0123456789abcdef-test-secret"
PINNING = {"groups": ["default"], "secret": SECRET, "max_age_seconds": 600}


def test_sources_in_order_and_the_bucket_matches_the_split() -> None:
    decider = Decider(Settings(user_key_sources=["jwt", "query"], user_key_query="uid"))
    auth = {b"authorization": bearer({"sub": "alice"})}
    version, bucket, _ = decider.choose(snapshot(50), "default", None, b"hdr", None, b"uid=bob", None, auth)
    assert bucket == split.user_bucket(decider.salt, b"alice")
    assert version == ("v2" if bucket < 5000 else "v1")
    _, bucket, _ = decider.choose(snapshot(50), "default", None, b"hdr", None, b"uid=bob", None, {})
    assert bucket == split.user_bucket(decider.salt, b"bob")  # header is not a source here


def bucket_by_source(decider: Decider, source: str, key: str, group: str = "default", pct: float = 50) -> int:
    """The bucket a request carrying ``key`` in one source only is given."""
    header, cookie, query, picked = None, None, b"", {}
    if source == "header":
        header = key.encode()
    elif source == "cookie":
        cookie = b"user_id=" + key.encode()
    elif source == "query":
        query = b"uid=" + quote(key, safe="").encode()
    else:
        picked = {b"authorization": bearer({"sub": key})}
    return decider.choose(snapshot(pct), group, None, header, cookie, query, None, picked)[1]


ALL_SOURCES = ["header", "cookie", "query", "jwt"]


def test_a_percent_encoded_query_key_is_the_same_user_as_the_header() -> None:
    """``?uid=alice%40example.com`` (encodeURIComponent) is alice@example.com."""
    decider = Decider(Settings(user_key_sources=ALL_SOURCES, user_key_query="uid"))
    for key in ("alice@example.com", "bob smith", "zoë/ü?&=+", "42"):
        assert bucket_by_source(decider, "query", key) == bucket_by_source(decider, "header", key), key
    plus = decider.choose(snapshot(50), "default", None, None, None, b"uid=bob+smith", None, {})[1]
    assert plus == bucket_by_source(decider, "header", "bob smith")  # form encoding: + is a space


def test_the_same_key_gives_the_same_bucket_from_every_source() -> None:
    """A JWT sub is hashed as the key itself, not ``jwt:<sub>``."""
    decider = Decider(Settings(user_key_sources=ALL_SOURCES, user_key_query="uid"))
    for key in ("alice", "user-17", "a@b.c"):
        buckets = {source: bucket_by_source(decider, source, key) for source in ALL_SOURCES}
        assert len(set(buckets.values())) == 1, (key, buckets)


def test_an_empty_user_header_is_absent() -> None:
    """An empty X-User-ID is no key: the next source (or the fallback) decides."""
    decider = Decider(Settings(user_key_fallback="client_ip"))
    bucket = decider.choose(snapshot(50), "default", None, b"", b"user_id=bob", b"", "10.0.0.1")[1]
    assert bucket == decider.choose(snapshot(50), "default", None, None, b"user_id=bob", b"", "10.0.0.1")[1]
    bucket = decider.choose(snapshot(50), "default", None, b"", None, b"", "10.0.0.1")[1]
    assert bucket == decider.choose(snapshot(50), "default", None, None, None, b"", "10.0.0.1")[1]
    randomly = Decider(Settings())
    seen = {randomly.choose(snapshot(50), "default", None, b"", None, b"", None)[0] for _ in range(200)}
    assert seen == {"v1", "v2"}  # the random fallback, not one shared key


def test_one_bucket_per_user_for_every_group_by_default() -> None:
    """A user below p% is on v2 in every group at p% or more."""
    routes = [{"name": "a", "patterns": ["/a/**"]}, {"name": "b", "patterns": ["/b/**"]}]
    decider = Decider(Settings(routes=routes))
    for n in range(500):
        key = f"user-{n}".encode()
        if decider.choose(snapshot(30), "default", None, key, None, b"", None)[0] == "v2":
            for group in ("a", "b"):
                for pct in (30, 31, 60):
                    assert decider.choose(snapshot(pct), group, None, key, None, b"", None)[0] == "v2"
    apart = Decider(Settings(routes=routes, split_hash_per_group=True))
    for group in ("default", "a"):
        assert apart.choose(snapshot(50), group, None, b"k", None, b"", None)[1] == split.bucket(
            apart.salt, group, b"k"
        )


def rolled_back(
    group_percentages: dict[str, float] | None = None, rollbacks: set[str] | None = None
) -> Snapshot:
    return Snapshot(
        global_percentage=0,
        group_percentages=group_percentages or {},
        redis_ok=True,
        rollbacks=frozenset(rollbacks or {"default"}),
    )


def test_a_rollback_wins_over_match_rules_unless_a_rule_survives_it() -> None:
    """A rollback means everyone: "everyone back to v1" includes testers a v2 rule sends there; a
    plain 0% (before a ramp) still lets testers in."""
    decider = Decider(
        Settings(
            routes=[{"name": "a", "patterns": ["/a/**"]}],
            match_rules=[
                {"header": "X-Beta", "version": "v2"},
                {"cookie": "ops", "value": "1", "version": "v2", "survives_rollback": True},
                {"query": "legacy", "version": "v1"},
            ],
        )
    )

    def version(snap: Snapshot, group: str = "default", **parts: Any) -> str:
        picked = {b"x-beta": parts["beta"]} if "beta" in parts else {}
        return decider.choose(
            snap, group, None, b"u", parts.get("cookie"), parts.get("query", b""), None, picked
        )[0]

    before_ramp = snapshot(0)
    assert version(before_ramp, beta=b"yes") == "v2"
    assert version(rolled_back(), beta=b"yes") == "v1"
    assert version(rolled_back(), "a", beta=b"yes") == "v1"  # a group following the global split
    assert version(rolled_back(), cookie=b"ops=1") == "v2"  # survives_rollback
    assert version(rolled_back(), query=b"legacy=1") == "v1"
    # a group with its own split is rolled back on its own
    only_a = rolled_back({"a": 0.0}, {"a"})
    assert version(only_a, "a", beta=b"yes") == "v1" and version(only_a, beta=b"yes") == "v2"
    # once the split is set above 0 again the rollback is over
    ramped = Snapshot(global_percentage=10, redis_ok=True, rollbacks=frozenset({"default"}))
    assert version(ramped, beta=b"yes") == "v2"


def epoch_snapshot(percentage: float, epoch: int = 0) -> Snapshot:
    return Snapshot(global_percentage=percentage, redis_ok=True, epochs={"default": epoch})


def pin_cookie(cookies: list[bytes] | None) -> bytes | None:
    for value in cookies or ():
        if value.startswith(b"strangler_pin_default="):
            return value.split(b";")[0]
    return None


def test_pins_hold_only_while_the_split_moves_within_their_epoch() -> None:
    """No pin at 0% or 100%, none honoured there, and a pin issued before a
    rollback (or rollout start or completion: the epoch) does not hold back the next ramp."""
    decider = Decider(Settings(session_pinning=PINNING))
    at_30 = {
        n: decider.choose(epoch_snapshot(30), "default", None, b"u%d" % n, None, b"", None)
        for n in range(300)
    }
    pins = {n: pin_cookie(c) for n, (_, _, c) in at_30.items()}
    assert all(pins.values())
    for n, (version, _, _) in at_30.items():  # both ways while the split moves
        for pct in (5, 70):
            assert decider.choose(epoch_snapshot(pct), "default", None, b"u%d" % n, pins[n], b"", None)[
                :2
            ] == (
                version,
                PINNED,
            )
    for n in range(300):  # at 100% everyone is on v2 and at 0% everyone on v1, pins or not
        assert decider.choose(epoch_snapshot(100), "default", None, b"u%d" % n, pins[n], b"", None)[0] == "v2"
        assert decider.choose(epoch_snapshot(0), "default", None, b"u%d" % n, pins[n], b"", None)[0] == "v1"
    for pct in (0, 100):  # and nobody is pinned there
        assert (
            pin_cookie(decider.choose(epoch_snapshot(pct), "default", None, b"x", None, b"", None)[2]) is None
        )
    # after a rollback (epoch 1) the next ramp places everyone by the split, not by old pins
    for n in range(300):
        version, bucket, cookies = decider.choose(
            epoch_snapshot(30, 1), "default", None, b"u%d" % n, pins[n], b"", None
        )
        assert bucket == split.user_bucket(decider.salt, b"u%d" % n)
        assert pin_cookie(cookies) is not None  # re-pinned under the new epoch


def test_a_pin_is_bound_to_its_user_and_its_issue_time() -> None:
    """A copied pin does not give another user v2; a pin made with the default
    salt (the old format) or past its lifetime does not work; the secret is never a default."""
    decider = Decider(Settings(session_pinning=PINNING))
    snap = epoch_snapshot(50)
    pins = {}
    for n in range(200):
        version, _, cookies = decider.choose(snap, "default", None, b"u%d" % n, None, b"", None)
        pins[n] = (version, pin_cookie(cookies))
    v2_pin = next(pin for version, pin in pins.values() if version == "v2")
    for n in range(200, 400):  # another user with a copied v2 pin: the split decides, and re-pins
        key = b"u%d" % n
        version, bucket, cookies = decider.choose(snap, "default", None, key, v2_pin, b"", None)
        assert bucket == split.user_bucket(decider.salt, key) and pin_cookie(cookies) is not None
    # a keyless session's pin (random session id) is not honoured for a request with a user key
    keyless = [decider.choose(snap, "default", None, None, None, b"", None) for _ in range(50)]
    for version, _, cookies in keyless:
        pin = pin_cookie(cookies)
        assert decider.choose(snap, "default", None, None, pin, b"", None)[:2] == (version, PINNED)
        assert decider.choose(snap, "default", None, b"someone", pin, b"", None)[1] != PINNED
    # the old shared-value format, made offline with the default salt
    old = blake2b(b"pin\0default\0v2", key=b"strangler", digest_size=9).hexdigest().encode()
    assert (
        decider.choose(snap, "default", None, b"u1", b"strangler_pin_default=v2." + old, b"", None)[1]
        != PINNED
    )
    # a pin past its lifetime, correctly signed
    issued = b"%d" % (int(time.time()) - 601)
    mac = decider._pin_mac("default", b"v2", b"0", issued, b"k:u1")
    stale = b"strangler_pin_default=v2.0." + issued + b".." + mac
    assert decider.choose(snap, "default", None, b"u1", stale, b"", None)[1] != PINNED
    fresh = b"%d" % int(time.time())
    good = (
        b"strangler_pin_default=v2.0."
        + fresh
        + b".."
        + decider._pin_mac("default", b"v2", b"0", fresh, b"k:u1")
    )
    assert decider.choose(snap, "default", None, b"u1", good, b"", None)[:2] == ("v2", PINNED)
    # another proxy with another secret does not honour it
    other = Decider(Settings(session_pinning={**PINNING, "secret": "another-secret-of-16+"}))
    assert other.choose(snap, "default", None, b"u1", good, b"", None)[1] != PINNED


@pytest.mark.parametrize("secret", ["strangler", "short", "changeme"])
def test_a_default_or_weak_pin_secret_is_a_config_error(secret: str) -> None:
    with pytest.raises(ConfigError, match="session_pinning.secret"):
        load_settings(session_pinning={"groups": ["*"], "secret": secret})


def test_the_pin_secret_is_generated_once_and_kept_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "pin-secret"
    pinning = {"groups": ["default"], "secret_file": str(path)}
    first = Decider(Settings(session_pinning=pinning))
    assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_text().strip()) >= 32
    second = Decider(Settings(session_pinning=pinning))
    version, _, cookies = first.choose(epoch_snapshot(50), "default", None, b"k", None, b"", None)
    assert second.choose(epoch_snapshot(50), "default", None, b"k", pin_cookie(cookies), b"", None)[:2] == (
        version,
        PINNED,
    )


def test_the_affinity_cookie_lasts_and_is_secure_over_tls() -> None:
    """Max-Age (a browser restart keeps the version) and Secure on TLS."""
    decider = Decider(Settings(user_key_fallback="affinity_cookie", session_pinning=PINNING))
    _, _, cookies = decider.choose(epoch_snapshot(50), "default", None, None, None, b"", None)
    assert cookies is not None and cookies[0].startswith(b"strangler_uid=")
    assert b"; Max-Age=31536000" in cookies[0] and b"Secure" not in cookies[0]
    _, _, cookies = decider.choose(epoch_snapshot(50), "default", None, None, None, b"", None, tls=True)
    assert cookies is not None and all(c.endswith(b"; Secure") for c in cookies) and len(cookies) == 2
    short = Decider(Settings(user_key_fallback="affinity_cookie", affinity_cookie_max_age_seconds=60))
    _, _, cookies = short.choose(snapshot(100), "default", None, None, None, b"", None)
    assert cookies is not None and b"; Max-Age=60;" in cookies[0]


def test_force_rules_and_pins() -> None:
    decider = Decider(
        Settings(
            match_rules=[{"query": "beta", "value": "1", "version": "v2"}],
            session_pinning=PINNING,
        )
    )
    with pytest.raises(BadForce):
        decider.choose(snapshot(0), "default", b"v3", None, None, b"", None)
    assert decider.choose(snapshot(0), "default", None, None, None, b"beta=1", None)[:2] == ("v2", NO_BUCKET)
    assert decider.choose(snapshot(0), "default", None, None, None, b"beta=2", None)[0] == "v1"
    version, _, cookies = decider.choose(snapshot(50), "default", None, b"k", None, b"", None)
    pin = pin_cookie(cookies)
    assert pin is not None and pin.startswith(b"strangler_pin_default=" + version.encode() + b".")
    assert decider.choose(snapshot(1), "default", None, b"k", pin, b"", None) == (version, PINNED, None)
    assert decider.choose(snapshot(99), "default", None, b"k", pin, b"", None) == (version, PINNED, None)
    assert decider.choose(snapshot(0), "default", None, b"k", pin, b"", None) == ("v1", NO_BUCKET, None)
    forged = b"strangler_pin_default=v2.0.1.." + b"0" * 24
    assert decider.choose(snapshot(99), "default", None, b"k", forged, b"", None)[1] != PINNED


def test_a_match_rule_on_the_user_key_header_works() -> None:
    decider = Decider(Settings(match_rules=[{"header": "X-User-ID", "value": "qa-1", "version": "v2"}]))
    assert decider.choose(snapshot(0), "default", None, b"qa-1", None, b"", None, {}) == (
        "v2",
        NO_BUCKET,
        None,
    )
    assert decider.choose(snapshot(0), "default", None, b"qa-2", None, b"", None, {})[0] == "v1"
