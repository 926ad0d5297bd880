"""The verdict table: pure numbers in, PASS / FAIL / INSUFFICIENT_DATA / ERROR out. No server."""

from __future__ import annotations

import pytest

from proxy.canary.analysis import History, ShadowFigures, Status, Window, assess
from proxy.settings import CanaryThresholds

T = CanaryThresholds()  # defaults: 5% errors, p95 500 ms, 2x / 1.5x v1, floors 1% / 50 ms, 100 requests


def w(requests: int, errors: int = 0, latency: float = 0.01) -> Window:
    return Window.of(requests, errors, [latency] * requests)


CASES = [
    # name, v1, v2, expected status, failed check
    ("healthy", w(1000, 5), w(200, 1), Status.PASS, None),
    ("v2 absolute error rate", w(1000, 0), w(200, 40), Status.FAIL, "error_rate"),
    ("v2 absolute p95", w(1000, 0, 0.01), w(200, 0, 0.8), Status.FAIL, "p95"),
    ("v2 errors 2x v1's", w(1000, 20), w(200, 9), Status.FAIL, "error_rate_ratio"),  # 4.5% > 2x2%
    ("v2 errors under 2x v1's", w(1000, 20), w(200, 7), Status.PASS, None),  # 3.5% < 4%
    ("v1 zero errors, floor spares one error", w(1000, 0), w(200, 1), Status.PASS, None),  # 0.5% < 2x1%
    ("v1 zero errors, above the floor", w(1000, 0), w(200, 5), Status.FAIL, "error_rate_ratio"),  # 2.5%
    ("v2 p95 1.5x v1's", w(1000, 0, 0.1), w(200, 0, 0.2), Status.FAIL, "p95_ratio"),
    ("fast v1, p95 floor spares jitter", w(1000, 0, 0.002), w(200, 0, 0.007), Status.PASS, None),
    ("v2 short of min requests", w(1000), w(99, 99), Status.INSUFFICIENT_DATA, None),
    ("no traffic at all", w(0), w(0), Status.INSUFFICIENT_DATA, None),
    ("v1 short, v2 clean: cannot compare", w(10), w(500), Status.INSUFFICIENT_DATA, None),
    ("v1 short, v2 breaks an absolute limit", w(10), w(500, 100), Status.FAIL, "error_rate"),
    ("windows unreadable", None, w(500), Status.ERROR, None),
]


@pytest.mark.parametrize(("name", "v1", "v2", "status", "check"), CASES, ids=[c[0] for c in CASES])
def test_verdict_table(name: str, v1: Window | None, v2: Window, status: Status, check: str | None) -> None:
    verdict = assess(v1, v2, T, History())
    assert verdict.status is status, verdict.reason
    assert verdict.failed_check == check
    if status is not Status.ERROR:
        assert verdict.v1["requests"] == v1.requests if v1 else True
        assert verdict.v2["requests"] == v2.requests
        assert verdict.limits["max_error_rate"] == T.max_error_rate


def test_consecutive_failures_gate_the_rollback_and_insufficient_data_keeps_the_streak() -> None:
    bad, good = (w(1000), w(200, 50)), (w(1000), w(200))
    first = assess(*bad, T, History(), failures_to_act=3)
    assert (first.consecutive_failures, first.rollback) == (1, False)
    held = assess(w(1000), w(5), T, History(first.consecutive_failures), failures_to_act=3)
    assert held.status is Status.INSUFFICIENT_DATA and held.consecutive_failures == 1 and not held.rollback
    errored = assess(None, None, T, History(2), failures_to_act=3)
    assert errored.status is Status.ERROR and errored.consecutive_failures == 2 and not errored.rollback
    third = assess(*bad, T, History(2), failures_to_act=3)
    assert (third.consecutive_failures, third.rollback) == (3, True)
    reset = assess(*good, T, History(2), failures_to_act=3)
    assert reset.status is Status.PASS and reset.consecutive_failures == 0


def test_shadow_gate_only_when_configured_and_reported() -> None:
    gated = CanaryThresholds(max_shadow_mismatch_rate=0.1)
    report = ShadowFigures(compared=500, mismatched=100)
    assert assess(w(1000), w(200), gated, History(), shadow=report).failed_check == "shadow_mismatch"
    assert assess(w(1000), w(200), gated, History(), shadow=None).status is Status.PASS
    assert assess(w(1000), w(200), T, History(), shadow=report).status is Status.PASS
    few = ShadowFigures(compared=10, mismatched=10)  # too few comparisons to judge
    assert assess(w(1000), w(200), gated, History(), shadow=few).status is Status.PASS


@pytest.mark.parametrize(
    ("latencies", "low", "high"),
    [
        ([0.01] * 100, 0.0075, 0.01),
        ([0.001] * 95 + [2.0] * 5, 0.0005, 0.001),
        ([0.001] * 90 + [2.0] * 10, 1.5, 2.5),
        ([20.0] * 10, 10.0, 10.0),  # overflow reports the last bound
        ([], 0.0, 0.0),
    ],
)
def test_p95_from_the_histogram(latencies: list[float], low: float, high: float) -> None:
    assert low <= Window.of(len(latencies), 0, latencies).p95 <= high
