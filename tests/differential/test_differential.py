"""The differential test (issue 23, item 4): generated client sessions through the real proxy,
compared with what the scripted backend received and produced. The quick profile runs in the
default suite; the deep one (``soak``: CI's long run) runs many more.

    pytest tests/differential                                   # quick: fast and task path
    pytest -m soak tests/differential                           # deep: DIFFERENTIAL_SESSIONS each (10,000)
    DIFFERENTIAL_SESSIONS=300 pytest -m soak tests/differential  # a deep run of another size
    scripts/test-compiled tests/differential                    # the same against the compiled build
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from tests.differential.harness import Harness
from tests.differential.spec import Session
from tests.differential.strategies import sessions

QUICK = int(os.environ.get("DIFFERENTIAL_QUICK_SESSIONS", "20"))
DEEP = int(os.environ.get("DIFFERENTIAL_SESSIONS", "10000"))
_COMMON = {
    "deadline": None,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
    "database": None,  # the examples depend on timing: a replay from a database would mislead
    # shrinking replays a timing-dependent failure hundreds of times: on request only
    # (DIFFERENTIAL_SHRINK=1); the failing session is printed either way
    "phases": list(Phase) if os.environ.get("DIFFERENTIAL_SHRINK") else [Phase.explicit, Phase.generate],
}


# Today's main fails these (test_regressions.py holds each finding as a strict xfail); remove the
# mark once issue 23 items 1 and 3 and the pipelined-body fix have landed.
KNOWN = pytest.mark.xfail(
    strict=False, reason="issue 23 items 1, 3 and the pipelined-body finding (test_regressions.py)"
)


@KNOWN
@settings(max_examples=QUICK, **_COMMON)
@given(session=sessions())
def test_sessions_match_the_backend(harness: Harness, session: Session) -> None:
    harness.check(session)


@KNOWN
@pytest.mark.soak
@pytest.mark.timeout(0)
@settings(max_examples=DEEP, **_COMMON)
@given(session=sessions())
def test_sessions_match_the_backend_deep(harness: Harness, session: Session) -> None:
    harness.check(session)
