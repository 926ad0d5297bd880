"""The differential test: generated client sessions through the real proxy,
compared with what the scripted backend received and produced.

A session (strategies.py) is 1-6 requests on one client connection, sequential or pipelined:
GET/HEAD/POST/PUT/DELETE, bodies of 0 bytes to 1 MB (Content-Length or chunked), slow writers,
an answer scripted for each (200/201/204/304/404/500, 1xx first, 0 bytes to 8 MB as
Content-Length, chunked or close-delimited, early answers, pauses, a backend that closes without
answering), slow readers, and a client disconnect at a random point. runner.py states what may
differ (hop-by-hop fields, X-Forwarded-*, X-Api-Version, framing) and checks the rest: status,
headers, byte-equal bodies both ways, each request at the backend once (or never, with a clean
error) and in order, no bytes of one request or session in another, h11 accepting everything
the proxy writes both ways, the proxy alive and logging no error.

Each variant (the ``harness`` fixture) is one proxy process for the module: the fast path (the
default), and the task path alone (``fast_path: false``). The quick profile runs in the default
suite; the deep one is marked ``soak`` (CI's long run).

    pytest tests/differential                                    # quick: 20 sessions per path
    pytest -m soak tests/differential                            # deep: 5,000 sessions per path
                                                                 # (scripts/test: both paths side by side)
    DIFFERENTIAL_SESSIONS=500 pytest -m soak tests/differential  # deep, another size
    DIFFERENTIAL_QUICK_SESSIONS=200 pytest tests/differential    # quick, another size
    scripts/test-compiled tests/differential                     # the same on the compiled build

A failure prints the session as Python (``Session((Request(...), ...))``): paste it into
test_regressions.py; shrink.py makes it smaller (Hypothesis's own shrinking, which replays a
timing-dependent failure hundreds of times, runs with DIFFERENTIAL_SHRINK=1).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from tests.differential.harness import Harness
from tests.differential.spec import Session
from tests.differential.strategies import sessions

QUICK = int(os.environ.get("DIFFERENTIAL_QUICK_SESSIONS", "20"))
DEEP = int(os.environ.get("DIFFERENTIAL_SESSIONS", "5000"))
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


@settings(max_examples=QUICK, **_COMMON)
@given(session=sessions())
def test_sessions_match_the_backend(harness: Harness, session: Session) -> None:
    harness.check(session)


@pytest.mark.soak
@pytest.mark.timeout(0)
@settings(max_examples=DEEP, **_COMMON)
@given(session=sessions())
def test_sessions_match_the_backend_deep(harness: Harness, session: Session) -> None:
    harness.check(session)
