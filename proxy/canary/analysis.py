"""Judgement as a pure function: two windows of numbers in, a verdict out (argo-rollouts' shape).

Nothing here touches Redis, clocks or settings objects beyond the thresholds handed in, so the whole
decision table is tested without a server. ``PASS``, ``FAIL``, ``INSUFFICIENT_DATA`` and ``ERROR``
stay distinct because they lead to different actions: only FAIL counts toward a rollback, only PASS
lets a rollout advance, and neither INSUFFICIENT_DATA nor ERROR ever moves traffic.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from proxy.metrics import LATENCY_BUCKETS
from proxy.settings import CanaryThresholds

BOUNDS: tuple[float, ...] = LATENCY_BUCKETS  # upper bounds; one overflow bucket after the last


class Status(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INSUFFICIENT_DATA = "insufficient_data"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Window:
    """Counts for one (group, version) over the judged window, summed over every replica."""

    requests: int = 0
    errors: int = 0
    buckets: tuple[int, ...] = ()  # len(BOUNDS) + 1 counts, the last one for "above the last bound"

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float:
        """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q."""
        total = sum(self.buckets)
        if total == 0:
            return 0.0
        rank = q * total
        seen = 0
        for index, count in enumerate(self.buckets):
            if count and seen + count >= rank:
                if index >= len(BOUNDS):  # overflow: the last finite bound is all we can say
                    return BOUNDS[-1]
                lower = BOUNDS[index - 1] if index > 0 else 0.0
                upper = BOUNDS[index]
                return lower + (upper - lower) * ((rank - seen) / count)
            seen += count
        return BOUNDS[-1]

    @property
    def p95(self) -> float:
        return self.quantile(0.95)

    def figures(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6),
            "p95_seconds": round(self.p95, 6),
        }

    @classmethod
    def of(cls, requests: int, errors: int, latencies: list[float] | None = None) -> Window:
        """A window from raw latencies (tests and tools); the recorder builds buckets directly."""
        import bisect

        buckets = [0] * (len(BOUNDS) + 1)
        for seconds in latencies or []:
            buckets[bisect.bisect_left(BOUNDS, seconds)] += 1
        return cls(requests, errors, tuple(buckets))


@dataclass(frozen=True, slots=True)
class ShadowFigures:
    """Mismatch counts from the shadow report for the group, when that report exists."""

    compared: int
    mismatched: int

    @property
    def rate(self) -> float:
        return self.mismatched / self.compared if self.compared else 0.0


@dataclass(frozen=True, slots=True)
class History:
    """What the judge remembers between checks (kept in Redis so a new leader carries on)."""

    consecutive_failures: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    status: Status
    reason: str
    failed_check: str | None = None  # error_rate, p95, error_rate_ratio, p95_ratio, shadow_mismatch
    v1: dict[str, Any] = field(default_factory=dict)
    v2: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    consecutive_failures: int = 0
    rollback: bool = False  # FAIL seen often enough in a row to act
    statistics: dict[str, Any] | None = None  # the statistical judge's tests (judge.py); None otherwise

    def as_dict(self) -> dict[str, Any]:
        extra = {} if self.statistics is None else {"statistics": self.statistics}
        return {
            **extra,
            "status": self.status.value,
            "reason": self.reason,
            "failed_check": self.failed_check,
            "v1": self.v1,
            "v2": self.v2,
            "limits": self.limits,
            "consecutive_failures": self.consecutive_failures,
            "rollback": self.rollback,
        }


def thresholds_dict(t: CanaryThresholds) -> dict[str, Any]:
    return t.model_dump()


def assess(
    window_v1: Window | None,
    window_v2: Window | None,
    thresholds: CanaryThresholds,
    history: History,
    *,
    failures_to_act: int = 1,
    shadow: ShadowFigures | None = None,
) -> Verdict:
    """Judge v2 against v1 in the same window.

    - Missing windows (Redis unreadable) are ERROR: the failure streak is kept, nothing is done.
    - v1 and v2 both above the absolute p95 limit is ERROR too (a proxy-wide stall, not v2's fault);
      with too little v1 traffic to tell, the absolute limit fails v2 alone.
    - v2 below ``min_requests``: INSUFFICIENT_DATA (hold; the streak is kept, not reset).
    - v1 below ``min_requests`` (e.g. at 100% v2): only the absolute limits can be applied, so a
      breach still FAILs but a clean result is INSUFFICIENT_DATA, never PASS.
    - Relative limits use floors so a v1 with 0 errors or a 2 ms p95 does not make one error or a
      little jitter a failure.
    """
    t = thresholds
    limits = thresholds_dict(t)
    kept = history.consecutive_failures
    if window_v1 is None or window_v2 is None:
        return Verdict(Status.ERROR, "windows could not be read", limits=limits, consecutive_failures=kept)
    v1, v2 = window_v1.figures(), window_v2.figures()
    if not all(
        math.isfinite(x) for x in (v1["error_rate"], v1["p95_seconds"], v2["error_rate"], v2["p95_seconds"])
    ):
        return Verdict(
            Status.ERROR, "non-finite figures", v1=v1, v2=v2, limits=limits, consecutive_failures=kept
        )

    def verdict(status: Status, reason: str, check: str | None = None) -> Verdict:
        streak = kept + 1 if status is Status.FAIL else (0 if status is Status.PASS else kept)
        return Verdict(
            status, reason, check, v1, v2, limits, streak,
            rollback=status is Status.FAIL and streak >= failures_to_act,
        )  # fmt: skip

    if window_v2.requests < t.min_requests:
        return verdict(
            Status.INSUFFICIENT_DATA, f"v2 served {window_v2.requests} requests, fewer than {t.min_requests}"
        )
    e2, p2 = window_v2.error_rate, window_v2.p95
    if e2 > t.max_error_rate:
        return verdict(Status.FAIL, f"v2 error rate {e2:.2%} above {t.max_error_rate:.2%}", "error_rate")
    if p2 > t.max_p95_seconds and window_v1.requests >= t.min_requests and window_v1.p95 > t.max_p95_seconds:
        # both versions above the absolute limit in the same window: the proxy (or something both
        # share) stalled; that says nothing about v2, so it is not a failure (the streak is kept)
        return Verdict(
            Status.ERROR,
            f"v1 and v2 both above the p95 limit ({window_v1.p95 * 1000:.0f} / {p2 * 1000:.0f} ms): "
            "a proxy-wide stall, not judged",
            v1=v1, v2=v2, limits=limits, consecutive_failures=kept,
        )  # fmt: skip
    if p2 > t.max_p95_seconds:
        return verdict(
            Status.FAIL, f"v2 p95 {p2 * 1000:.0f} ms above {t.max_p95_seconds * 1000:.0f} ms", "p95"
        )
    if shadow is not None and t.max_shadow_mismatch_rate is not None and shadow.compared >= t.min_requests:
        if shadow.rate > t.max_shadow_mismatch_rate:
            return verdict(
                Status.FAIL,
                f"shadow mismatch rate {shadow.rate:.2%} above {t.max_shadow_mismatch_rate:.2%}",
                "shadow_mismatch",
            )
    if window_v1.requests < t.min_requests:
        return verdict(
            Status.INSUFFICIENT_DATA,
            f"v1 served {window_v1.requests} requests, fewer than {t.min_requests}: "
            "absolute limits held, no comparison possible",
        )
    e1, p1 = window_v1.error_rate, window_v1.p95
    error_limit = t.max_error_rate_ratio * max(e1, t.error_rate_floor)
    if e2 > error_limit:
        return verdict(
            Status.FAIL,
            f"v2 error rate {e2:.2%} above {t.max_error_rate_ratio:g}x v1's {e1:.2%} "
            f"(limit {error_limit:.2%})",
            "error_rate_ratio",
        )
    p95_limit = t.max_p95_ratio * max(p1, t.p95_floor_seconds)
    if p2 > p95_limit:
        return verdict(
            Status.FAIL,
            f"v2 p95 {p2 * 1000:.0f} ms above {t.max_p95_ratio:g}x v1's {p1 * 1000:.0f} ms "
            f"(limit {p95_limit * 1000:.0f} ms)",
            "p95_ratio",
        )
    return verdict(Status.PASS, "v2 within every limit")
