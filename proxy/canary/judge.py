"""The statistical judge: sequential tests on errors and latency instead of fixed ratios.

``assess_statistical`` is a pure function like ``analysis.assess``: the last window (for the absolute
limits, kept as safety nets), the seconds not yet counted (the increment), the running tally and the
thresholds in; a ``Verdict`` and the new tally out. The tally lives in the verdict record so a new
leader carries on; it starts afresh with the judged period (a new rollout, a split set by hand, a
rollback) and is kept across ladder steps.

A sequential test that crosses its threshold FAILs and asks for the rollback at once: its evidence
already accumulated over every check of the period, and its false-alarm bound already covers
looking at every check, so waiting for ``consecutive_failures`` would only add delay. The absolute
limits keep their streak rule. Too little data (power below ``power`` for either test) holds as
INSUFFICIENT_DATA; it never passes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from proxy.canary import stats
from proxy.canary.analysis import (
    BOUNDS,
    History,
    ShadowFigures,
    Status,
    Verdict,
    Window,
    assess,
    thresholds_dict,
)
from proxy.settings import CanaryThresholds

LATENCY_TAU = 0.1
"""Scale of the mixture over "v2 slower" in probability-of-superiority units: tuned for effects near
0.1 (v2 slower in 60% of pairs), which is what a 20% slowdown shows on typical latency spreads."""

ERROR_CHECK, LATENCY_CHECK = "error_evidence", "latency_evidence"
ERROR_SHARE_OF_ALPHA = 0.8
"""The errors test gets 80% of ``alpha``, latency 20%: every request informs the latency test but
only the failing ones (about 1%) inform the errors test, so errors need the easier threshold."""
N_BUCKETS = len(BOUNDS) + 1
# bounds on stored figures: far beyond any real period (10^15 requests), small enough that no
# arithmetic on them overflows; a record outside them is refused, not judged
Count = Annotated[int, Field(ge=0, le=10**15)]
Evidence = Annotated[float, Field(ge=-1e12, le=1e12)]


class Tally(BaseModel):
    """Counts and evidence since the judged period began (JSON in the verdict record)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    start: float = Field(ge=0, le=1e11)  # wall-clock second the period's counting began
    until: int = Field(ge=0, le=10**11)  # last wall-clock second counted
    ratios: tuple[Annotated[float, Field(gt=1, le=1000)], ...]  # the error grid the evidence belongs to
    error_log_lr: tuple[Evidence, ...]
    n1: Count = 0
    x1: Count = 0
    n2: Count = 0
    x2: Count = 0
    h1: tuple[Count, ...] = (0,) * N_BUCKETS
    h2: tuple[Count, ...] = (0,) * N_BUCKETS
    score: float = Field(default=0.0, ge=-1e17, le=1e17)
    info: float = Field(default=0.0, ge=0, le=1e17)
    spread: float = Field(default=0.0, ge=0, le=1e34)  # sum of squared standardized effects per check
    checks: int = Field(default=0, ge=0, le=10**9)  # checks that informed the latency test
    min_p_errors: float = Field(default=1.0, ge=0, le=1)
    min_p_latency: float = Field(default=1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> Tally:
        if len(self.ratios) != len(self.error_log_lr) or not self.ratios:
            raise ValueError("error grid and its evidence differ in length")
        if len(self.h1) != N_BUCKETS or len(self.h2) != N_BUCKETS:
            raise ValueError(f"latency histograms need {N_BUCKETS} buckets")
        if self.x1 > self.n1 or self.x2 > self.n2:
            raise ValueError("more errors than requests")
        return self

    @classmethod
    def fresh(cls, start: float, until: int, ratios: tuple[float, ...]) -> Tally:
        return cls(start=start, until=until, ratios=ratios, error_log_lr=(0.0,) * len(ratios))


def load_tally(raw: Any) -> tuple[Tally | None, str | None]:
    """The tally from a verdict record: (tally, None), (None, None) when absent, or (None, reason)
    when it is not a valid tally (hostile or corrupted record: the period restarts, said once)."""
    if raw is None:
        return None, None
    try:
        return Tally.model_validate(raw), None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "tally"
        return None, f"stored tally unreadable ({where}: {first['msg']}); counting restarted"


def add_increment(tally: Tally, inc_v1: Window, inc_v2: Window, until: int) -> Tally:
    """Multiply in one increment's evidence (its own split) and add its counts."""
    ratios = tally.ratios
    logs = tuple(
        lg + stats.error_log_lr(r, inc_v1.requests, inc_v1.errors, inc_v2.requests, inc_v2.errors)
        for lg, r in zip(tally.error_log_lr, ratios, strict=True)
    )
    score, info = stats.latency_increment(
        inc_v1.buckets or (0,) * N_BUCKETS, inc_v2.buckets or (0,) * N_BUCKETS
    )
    return tally.model_copy(
        update={
            "until": max(tally.until, until),
            "error_log_lr": logs,
            "n1": tally.n1 + inc_v1.requests,
            "x1": tally.x1 + inc_v1.errors,
            "n2": tally.n2 + inc_v2.requests,
            "x2": tally.x2 + inc_v2.errors,
            "h1": _add(tally.h1, inc_v1.buckets),
            "h2": _add(tally.h2, inc_v2.buckets),
            "score": tally.score + score,
            "info": tally.info + info,
            "spread": tally.spread + (score * score / info if info > 0 else 0.0),
            "checks": tally.checks + (1 if info > 0 else 0),
        }
    )


def _sound(window: Window) -> bool:
    """Counts a tally may take: non-negative, errors within requests, our bucket layout, bounded."""
    if window.buckets and len(window.buckets) != N_BUCKETS:
        return False
    numbers = (window.requests, window.errors, *window.buckets)
    return all(0 <= n <= 10**12 for n in numbers) and window.errors <= window.requests


def _add(total: tuple[int, ...], more: tuple[int, ...]) -> tuple[int, ...]:
    if not more:
        return total
    if len(more) != len(total):
        raise ValueError("increment histogram has a different bucket layout")
    return tuple(a + b for a, b in zip(total, more, strict=True))


def _finite(x: float, digits: int = 4) -> float | None:
    return round(x, digits) if math.isfinite(x) else None


def _outcome(
    test: str, said: str, log_lr: float, threshold: float, power: float, wanted: float, lowest_p: float,
    *, worse: str, unseen: str, clean: str,
) -> tuple[dict[str, Any], bool, float]:  # fmt: skip
    """What both sequential tests report the same way: the evidence against its threshold, the
    always-valid p-value (the lowest ``1 / likelihood ratio`` of the period, ``lowest_p`` before
    this check), the power, and the one-line reason (crossed, too little data, or clean)."""
    p_value = min(lowest_p, math.exp(-log_lr) if log_lr > 0 else 1.0)
    crossed = log_lr >= threshold
    if crossed:
        tail = f"evidence {log_lr:.1f} reached {threshold:.1f}: {worse}"
    elif power < wanted:
        tail = f"too little data to see {unseen} ({power:.0%} power)"
    else:
        tail = f"{clean} ({log_lr:.1f} of {threshold:.1f})"
    return {
        "log_lr": round(log_lr, 4), "threshold": round(threshold, 4),
        "evidence": round(log_lr / threshold, 4), "p_value": round(p_value, 6), "power": round(power, 4),
        "enough_data": power >= wanted, "reason": f"{test}: {said}; {tail}",
    }, crossed, p_value  # fmt: skip


def _errors(tally: Tally, t: CanaryThresholds, threshold: float) -> tuple[dict[str, Any], bool, float]:
    _, weights = stats.error_grid(t.min_error_ratio)
    log_lr = stats.mixture(tally.error_log_lr, weights)
    estimate, lo, hi = stats.rate_ratio_ci(tally.n1, tally.x1, tally.n2, tally.x2)
    power = stats.error_power(
        tally.n1, tally.x1, tally.n2, ratio=t.min_error_ratio, floor=t.error_rate_floor,
        threshold=threshold, ratios=tally.ratios, weights=weights,
    )  # fmt: skip
    share = tally.n2 / (tally.n1 + tally.n2) if tally.n1 + tally.n2 else 0.0
    if math.isnan(estimate):
        said = f"no errors yet in {tally.n1 + tally.n2} requests"
    else:
        said = (
            f"v2 made {tally.x2} of {tally.x1 + tally.x2} errors on {share:.1%} of the traffic: "
            f"{estimate:.2f}x v1's rate (95% CI {lo:.2f}-{hi:.2f})"
        )
    outcome, crossed, p_value = _outcome(
        "errors", said, log_lr, threshold, power, t.power, tally.min_p_errors,
        worse="v2 fails more often", unseen=f"a {t.min_error_ratio:g}x rise", clean="no evidence of a rise",
    )  # fmt: skip
    part = {
        "effect": _finite(estimate), "ci95": [_finite(lo), _finite(hi)],
        "v1_error_rate": _finite(tally.x1 / tally.n1 if tally.n1 else 0.0, 6),
        "v2_error_rate": _finite(tally.x2 / tally.n2 if tally.n2 else 0.0, 6),
        **outcome,
    }  # fmt: skip
    return part, crossed, p_value


def _latency(tally: Tally, t: CanaryThresholds, threshold: float) -> tuple[dict[str, Any], bool, float]:
    phi = stats.dispersion(tally.score, tally.info, tally.spread, tally.checks)
    score, info = tally.score / phi, tally.info / phi
    log_lr = stats.latency_log_lr(score, info, LATENCY_TAU)
    theta = stats.mann_whitney(tally.h1, tally.h2).theta
    lo, hi = stats.superiority_ci(tally.h1, tally.h2)
    effect = stats.scaled_superiority(tally.h1, BOUNDS, 1 + t.min_latency_shift) - 0.5
    power = stats.latency_power(info, effect, LATENCY_TAU, threshold)
    said = f"a v2 request was slower than a v1 request in {theta:.1%} of pairs (95% CI {lo:.1%}-{hi:.1%})"
    outcome, crossed, p_value = _outcome(
        "latency", said, log_lr, threshold, power, t.power, tally.min_p_latency,
        worse="v2 is slower", unseen=f"a {t.min_latency_shift:.0%} slowdown",
        clean="no evidence v2 is slower",
    )  # fmt: skip
    part = {
        "effect": round(theta, 4), "ci95": [round(lo, 4), round(hi, 4)],
        **outcome, "dispersion": round(phi, 4),
    }  # fmt: skip
    return part, crossed, p_value


def assess_statistical(
    window_v1: Window | None,
    window_v2: Window | None,
    inc_v1: Window | None,
    inc_v2: Window | None,
    thresholds: CanaryThresholds,
    history: History,
    tally: Tally | None,
    *,
    now: float,
    until: int,
    failures_to_act: int = 1,
    shadow: ShadowFigures | None = None,
    note: str | None = None,
) -> tuple[Verdict, Tally | None]:
    """Judge v2 against v1: safety nets on the window, sequential tests on the whole period.

    ``inc_v1``/``inc_v2`` are the seconds after ``tally.until`` (without a tally: since the period
    began) up to ``until``; ``None`` when they
    could not be read (the tally is kept as it was, the check is ERROR). ``note`` (an unreadable
    stored tally) is added to the reason.
    """
    t = thresholds
    limits = thresholds_dict(t)
    ratios, _ = stats.error_grid(t.min_error_ratio)
    if tally is not None and tally.ratios != ratios:
        tally, note = None, "the error grid changed with the settings; counting restarted"
    if tally is None:
        tally = Tally.fresh(now, 0, ratios)  # the increment given is the period's first
    if inc_v1 is None or inc_v2 is None or window_v1 is None or window_v2 is None:
        verdict = assess(None, None, t, history, failures_to_act=failures_to_act)
        return dataclasses.replace(verdict, limits=limits), tally
    if until > tally.until:
        if not (_sound(inc_v1) and _sound(inc_v2)):
            # hostile or corrupted per-second hashes: not judged, and not read again
            skipped = tally.model_copy(update={"until": until})
            verdict = Verdict(
                Status.ERROR,
                f"counts of seconds {tally.until + 1}-{until} are invalid (negative, more errors than "
                "requests, or another bucket layout); not judged",
                limits=limits, consecutive_failures=history.consecutive_failures,
            )  # fmt: skip
            return verdict, skipped
        tally = add_increment(tally, inc_v1, inc_v2, until)

    # Bonferroni: the two false-alarm bounds add up to alpha
    errors, errors_crossed, p_errors = _errors(tally, t, -math.log(t.alpha * ERROR_SHARE_OF_ALPHA))
    latency, latency_crossed, p_latency = _latency(tally, t, -math.log(t.alpha * (1 - ERROR_SHARE_OF_ALPHA)))
    tally = tally.model_copy(update={"min_p_errors": p_errors, "min_p_latency": p_latency})
    statistics: dict[str, Any] = {
        "since": tally.start, "until": tally.until,
        "requests": {"v1": tally.n1, "v2": tally.n2}, "alpha": t.alpha,
        "errors": errors, "latency": latency,
    }  # fmt: skip
    if note:
        statistics["note"] = note

    # the absolute limits as safety nets: the fixed ratio checks are switched off
    nets = t.model_copy(update={"max_error_rate_ratio": math.inf, "max_p95_ratio": math.inf})
    safety = assess(window_v1, window_v2, nets, history, failures_to_act=failures_to_act, shadow=shadow)
    safety = dataclasses.replace(safety, limits=limits, statistics=statistics)
    kept = history.consecutive_failures

    def decide(status: Status, reason: str, check: str | None = None, act: bool = False) -> Verdict:
        streak = kept + 1 if status is Status.FAIL else (0 if status is Status.PASS else kept)
        return Verdict(
            status, reason, check, safety.v1, safety.v2, limits, streak, rollback=act, statistics=statistics
        )

    if safety.status is Status.ERROR:
        return safety, tally
    if errors_crossed:
        return decide(Status.FAIL, errors["reason"], ERROR_CHECK, act=True), tally
    if latency_crossed:
        return decide(Status.FAIL, latency["reason"], LATENCY_CHECK, act=True), tally
    if safety.status is not Status.PASS:
        return safety, tally  # an absolute limit failed (streak rule), or the window is too small
    if not (errors["enough_data"] and latency["enough_data"]):
        short = [p["reason"] for p in (errors, latency) if not p["enough_data"]]
        return decide(Status.INSUFFICIENT_DATA, "; ".join(short)), tally
    return decide(Status.PASS, f"no evidence v2 is worse; {errors['reason']}; {latency['reason']}"), tally
