"""Properties of the split that every rollout relies on, checked over generated inputs.

- monotonic: raising the percentage never moves anyone from v2 back to v1;
- fair: over many keys the share on v2 is close to the percentage;
- stable: another process (another replica) gives the same answer for the same key.
Profiles: ``fast`` (default) and ``deep`` (HYPOTHESIS_PROFILE=deep), registered in conftest.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.traffic import split
from tests.support import ROOT

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
