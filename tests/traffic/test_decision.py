"""The shared version decision, as a pure function: key sources, JWT claims, rules, pins."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from proxy.control.snapshot import Snapshot
from proxy.settings import Settings
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


def test_sources_in_order_and_the_bucket_matches_the_split() -> None:
    decider = Decider(Settings(user_key_sources=["jwt", "query"], user_key_query="uid"))
    auth = {b"authorization": bearer({"sub": "alice"})}
    version, bucket, _ = decider.choose(snapshot(50), "default", None, b"hdr", None, b"uid=bob", None, auth)
    assert bucket == split.bucket(decider.salt, "default", b"jwt:alice")
    assert version == ("v2" if bucket < 5000 else "v1")
    _, bucket, _ = decider.choose(snapshot(50), "default", None, b"hdr", None, b"uid=bob", None, {})
    assert bucket == split.bucket(decider.salt, "default", b"bob")  # header is not a source here


def test_force_rules_and_pins() -> None:
    decider = Decider(
        Settings(
            match_rules=[{"query": "beta", "value": "1", "version": "v2"}],
            session_pinning={"groups": ["default"]},
        )
    )
    with pytest.raises(BadForce):
        decider.choose(snapshot(0), "default", b"v3", None, None, b"", None)
    assert decider.choose(snapshot(0), "default", None, None, None, b"beta=1", None)[:2] == ("v2", NO_BUCKET)
    assert decider.choose(snapshot(0), "default", None, None, None, b"beta=2", None)[0] == "v1"
    version, _, cookies = decider.choose(snapshot(100), "default", None, b"k", None, b"", None)
    assert version == "v2" and cookies is not None
    pin = cookies[0].split(b";")[0]
    assert decider.choose(snapshot(1), "default", None, b"k", pin, b"", None) == ("v2", PINNED, None)
    rolled = decider.choose(snapshot(0), "default", None, b"k", pin, b"", None)
    assert (
        rolled[0] == "v1" and rolled[2] is not None and rolled[2][0].startswith(b"strangler_pin_default=v1.")
    )
    forged = b"strangler_pin_default=v2.000000000000000000"
    assert decider.choose(snapshot(0), "default", None, b"k", forged, b"", None)[0] == "v1"


def test_a_match_rule_on_the_user_key_header_works() -> None:
    decider = Decider(Settings(match_rules=[{"header": "X-User-ID", "value": "qa-1", "version": "v2"}]))
    assert decider.choose(snapshot(0), "default", None, b"qa-1", None, b"", None, {}) == (
        "v2",
        NO_BUCKET,
        None,
    )
    assert decider.choose(snapshot(0), "default", None, b"qa-2", None, b"", None, {})[0] == "v1"
