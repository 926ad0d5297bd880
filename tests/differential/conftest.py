"""The differential suite's processes: one scripted backend, and one proxy per variant and module
(not per example), so a session costs only its own exchanges.

The proxy runs as ``strangler serve`` in its own process (a crash is seen, and under
scripts/test-compiled it runs the compiled build). Its v1 and v2 are the scripted backend's two
listeners; each request forces its version with ``X-Strangler-Version`` so both pools are used.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.differential.backend import ScriptedBackend
from tests.differential.harness import Harness
from tests.support import ProxyProcess, RedisServer


@pytest.fixture(scope="package")
def scripted_backend() -> Iterator[ScriptedBackend]:
    backend = ScriptedBackend()
    yield backend
    backend.stop()


def start_diff_proxy(
    backend: ScriptedBackend, redis: RedisServer, workdir: Path, fast_path: bool
) -> ProxyProcess:
    prefix = f"diff{uuid.uuid4().hex[:6]}:"
    settings = {
        "v1_url": backend.url("v1"),
        "v2_url": backend.url("v2"),
        "redis_url": redis.url,
        "split_key": prefix + "split",
        "key_prefix": prefix,
        "log_level": "warning",
        "poll_interval_seconds": 0.5,
        "read_timeout_seconds": 10,
        "fast_path": fast_path,
    }
    return ProxyProcess(workdir / f"differential-{'fast' if fast_path else 'task'}", settings).start()


@pytest.fixture(scope="module", params=["fast", "task"])
def harness(
    request: pytest.FixtureRequest,
    scripted_backend: ScriptedBackend,
    redis_server: RedisServer,
    workdir: Path,
) -> Iterator[Harness]:
    """A proxy in front of the scripted backend: the fast path on (the default), or the task path
    alone (``fast_path: false``)."""
    proxy = start_diff_proxy(scripted_backend, redis_server, workdir, request.param == "fast")
    harness = Harness(scripted_backend, proxy, request.param)
    yield harness
    proxy.stop()
