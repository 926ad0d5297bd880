"""``finish`` ends a request exactly once. A second call is a bug: under tests (and
``limits.strict_states``) it raises; in production it is a no-op that records nothing."""

from __future__ import annotations

import time

import pytest

from proxy.app import Strangler
from proxy.settings import Settings
from proxy.traffic.forward import ANSWERED, CLIENT_GONE_RESPONSE, FAILED, LifecycleError, Routed


def requests_recorded(app: Strangler) -> float:
    text = app.metrics.render().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("http_requests_total{")
    )


def build(strict: bool) -> Strangler:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", limits={"strict_states": strict})  # no Redis used
    return Strangler(settings)


def test_a_second_finish_raises_in_strict_mode() -> None:
    app = build(strict=True)
    routed = Routed("default", "GET", time.perf_counter(), False)
    app.proxy.finish(routed, ANSWERED, 200)
    for outcome in (ANSWERED, FAILED, CLIENT_GONE_RESPONSE):
        with pytest.raises(LifecycleError):
            app.proxy.finish(routed, outcome, 502)


def test_a_second_finish_records_nothing_in_production() -> None:
    app = build(strict=False)
    routed = Routed("default", "GET", time.perf_counter(), False)
    app.proxy.finish(routed, ANSWERED, 200)
    app.proxy.finish(routed, FAILED, 502)
    app.proxy.finish(routed, ANSWERED, 200)
    assert requests_recorded(app) == 1
