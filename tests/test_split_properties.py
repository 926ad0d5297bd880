"""Properties of the split that every rollout relies on, checked over generated inputs.

- monotonic: raising the percentage never moves anyone from v2 back to v1;
- fair: over many keys the share on v2 is close to the percentage;
- stable: another process (another replica) gives the same answer for the same key.
Profiles: ``fast`` (default) and ``deep`` (HYPOTHESIS_PROFILE=deep), registered in conftest.py.
"""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from proxy.traffic import split
from tests.support import ROOT, wait_until

percentages = st.floats(min_value=0, max_value=100, allow_nan=False, allow_infinity=False)
keys = st.binary(min_size=1, max_size=64)
groups = st.sampled_from(["default", "checkout", "search", "üñí"])
salts = st.binary(max_size=16)


@given(p1=percentages, p2=percentages, key=keys, group=groups, salt=salts)
def test_v2_at_a_lower_percentage_stays_v2_at_a_higher_one(
    p1: float, p2: float, key: bytes, group: str, salt: bytes
) -> None:
    low, high = min(p1, p2), max(p1, p2)
    if split.choose(low, salt, group, key) == "v2":
        assert split.choose(high, salt, group, key) == "v2"


@given(key=keys, group=groups, salt=salts)
def test_the_ends_are_absolute(key: bytes, group: str, salt: bytes) -> None:
    assert split.choose(0, salt, group, key) == "v1"
    assert split.choose(100, salt, group, key) == "v2"


@given(
    percentage=st.floats(min_value=0.5, max_value=99.5), seed=st.binary(min_size=4, max_size=8), group=groups
)
def test_share_over_many_keys_is_close_to_the_percentage(percentage: float, seed: bytes, group: str) -> None:
    n = 4000
    on_v2 = sum(split.choose(percentage, b"salt", group, seed + b"-%d" % i) == "v2" for i in range(n))
    p = percentage / 100
    # five standard deviations of a binomial, plus the bucket rounding (1/10000)
    tolerance = 5 * math.sqrt(p * (1 - p) / n) + 1e-4
    assert abs(on_v2 / n - p) <= tolerance, (on_v2, n, percentage)


@given(key=keys, group=groups, salt=salts)
def test_bucket_is_in_range(key: bytes, group: str, salt: bytes) -> None:
    assert 0 <= split.bucket(salt, group, key) < split.BUCKETS


@pytest.fixture(scope="module")
def replica() -> Iterator[subprocess.Popen[str]]:
    """Another interpreter (another ``hash()`` seed), like another replica; one for all examples."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={"PYTHONHASHSEED": "random", "PATH": ""},
    )
    yield child
    assert child.stdin is not None
    child.stdin.close()
    child.wait(10)


@given(cases=st.lists(st.tuples(percentages, keys, groups, salts), min_size=1, max_size=40))
def test_another_process_gives_the_same_answers(
    replica: subprocess.Popen[str], cases: list[tuple[float, bytes, str, bytes]]
) -> None:
    assert replica.stdin is not None and replica.stdout is not None
    payload = [[p, key.hex(), group, salt.hex()] for p, key, group, salt in cases]
    replica.stdin.write(json.dumps(payload) + "\n")
    replica.stdin.flush()
    there = json.loads(replica.stdout.readline())
    assert there == [split.choose(p, salt, group, key) for p, key, group, salt in cases]


_CHILD = """
import json, sys
from proxy.traffic import split
for line in sys.stdin:
    cases = json.loads(line)
    answers = [split.choose(p, bytes.fromhex(s), g, bytes.fromhex(k)) for p, k, g, s in cases]
    print(json.dumps(answers), flush=True)
"""


# --- one user, one version: every source, every encoding, every group, every proxy --------------------

SOURCES = ("header", "cookie", "query", "jwt")
GROUPS = ("default", "orders", "search")
# a user key as applications make them: printable, no surrounding spaces (header values are trimmed)
user_keys = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=40
).filter(lambda text: text == text.strip())
_deciders: dict[tuple[tuple[str, ...], bool], tuple[Any, Any]] = {}


def deciders(order: tuple[str, ...], per_group: bool = False) -> tuple[Any, Any]:
    """Two independently built deciders (two proxies) for a source order."""
    from proxy.settings import Settings
    from proxy.traffic.decision import Decider

    found = _deciders.get((order, per_group))
    if found is None:
        settings = Settings(
            user_key_sources=list(order),
            user_key_query="uid",
            split_hash_per_group=per_group,
            routes=[
                {"name": "orders", "patterns": ["/orders/**"]},
                {"name": "search", "patterns": ["/s/**"]},
            ],
        )
        found = _deciders[(order, per_group)] = (Decider(settings), Decider(settings))
    return found


def percent_encode(raw: bytes, data: st.DataObject, plus: bool) -> bytes:
    """Any valid encoding of ``raw``: unsafe bytes escaped (upper or lower hex), safe ones escaped
    or not, and (query only) a space as ``+`` or ``%20``."""
    out = bytearray()
    for byte in raw:
        safe = chr(byte).isalnum() and byte < 128 or byte in b"-._~@!$'()*:/?"
        if byte == 0x20 and plus and data.draw(st.booleans()):
            out += b"+"
        elif safe and data.draw(st.booleans()):
            out.append(byte)
        else:
            text = b"%%%02X" % byte
            out += text if data.draw(st.booleans()) else text.lower()
    return bytes(out)


def jwt_for(sub: str) -> bytes:
    def part(payload: dict[str, str]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=")

    return b"Bearer " + part({"alg": "none"}) + b"." + part({"sub": sub}) + b".sig"


def request_parts(key: str, sources: list[str], data: st.DataObject) -> tuple[Any, ...]:
    """(header, cookie, query, picked) carrying ``key`` in each of ``sources``, each encoded its own way."""
    raw = key.encode()
    header = raw if "header" in sources else None
    cookie = b"user_id=" + percent_encode(raw, data, plus=False) if "cookie" in sources else None
    query = b"a=1&uid=" + percent_encode(raw, data, plus=True) if "query" in sources else b""
    picked = {b"authorization": jwt_for(key)} if "jwt" in sources else {}
    return header, cookie, query, picked


@given(
    key=user_keys,
    order=st.permutations(SOURCES),
    percentage=st.floats(min_value=0.01, max_value=99.99),
    data=st.data(),
)
def test_one_user_gets_one_version_from_any_source_in_any_group_on_any_proxy(
    key: str, order: list[str], percentage: float, data: st.DataObject
) -> None:
    from proxy.control.snapshot import Snapshot

    snapshot = Snapshot(global_percentage=percentage, redis_ok=True)
    seen = set()
    for decider in deciders(tuple(order)):
        for _ in range(3):  # three requests, each with some of the sources, each encoded its own way
            sources = data.draw(st.lists(st.sampled_from(SOURCES), min_size=1, max_size=4, unique=True))
            header, cookie, query, picked = request_parts(key, sources, data)
            for group in GROUPS:
                version, bucket, _ = decider.choose(
                    snapshot, group, None, header, cookie, query, None, picked
                )
                seen.add((version, bucket))
    assert len(seen) == 1, (key, seen)


@given(key=user_keys, data=st.data(), low=st.floats(0.01, 99.99), high=st.floats(0.01, 99.99))
def test_on_v2_in_one_group_means_on_v2_in_every_group_at_that_percentage_or_more(
    key: str, data: st.DataObject, low: float, high: float
) -> None:
    from proxy.control.snapshot import Snapshot

    low, high = min(low, high), max(low, high)
    a, _ = deciders(SOURCES)
    group, other = data.draw(st.sampled_from(GROUPS)), data.draw(st.sampled_from(GROUPS))
    snapshot = Snapshot(global_percentage=50, group_percentages={group: low, other: high}, redis_ok=True)
    if group == other:
        return
    if a.choose(snapshot, group, None, key.encode(), None, b"", None, {})[0] == "v2":
        assert a.choose(snapshot, other, None, key.encode(), None, b"", None, {})[0] == "v2"


SPLIT_KEY = "props:split"


@pytest.fixture()
def two_proxies(start_proxy: Callable[..., Any], redis_server: Any) -> tuple[Any, Any]:
    settings = {
        "split_key": SPLIT_KEY,
        "user_key_sources": ["jwt", "query", "cookie", "header"],
        "user_key_query": "uid",
        "routes": [{"name": "orders", "patterns": ["/orders/**"]}],
    }
    first, second = start_proxy(**settings), start_proxy(**settings)
    redis_server.client().set(SPLIT_KEY, "37")
    for proxy in (first, second):
        wait_until(
            lambda p=proxy: httpx.get(p.admin + "/split", timeout=5).json()["default"] == 37, timeout=5
        )  # type: ignore[misc]
    return first, second


@hyp_settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=user_keys.filter(lambda k: k.isprintable() and k.isascii()), data=st.data())
def test_two_real_proxies_agree_for_any_source_and_encoding(
    two_proxies: tuple[Any, Any], key: str, data: st.DataObject
) -> None:
    """The same through two running proxies: every request carries the key in some sources, each
    encoded its own way, to either proxy and either group; all get one version."""
    seen = set()
    for _ in range(4):
        proxy = data.draw(st.sampled_from(two_proxies))
        path = data.draw(st.sampled_from(["/echo", "/orders/1"]))
        sources = data.draw(st.lists(st.sampled_from(SOURCES), min_size=1, max_size=4, unique=True))
        header, cookie, query, picked = request_parts(key, sources, data)
        headers: dict[str, str] = {}
        if header is not None:
            headers["X-User-ID"] = header.decode()
        if cookie is not None:
            headers["Cookie"] = cookie.decode()
        if picked:
            headers["Authorization"] = picked[b"authorization"].decode()
        target = path + ("?" + query.decode() if query else "")
        answer = httpx.get(proxy.url + target, headers=headers, timeout=5)
        assert answer.status_code == 200
        seen.add(answer.headers["x-api-version"])
    assert len(seen) == 1, (key, seen)
