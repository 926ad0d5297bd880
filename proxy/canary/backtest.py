"""Replay stored checks through a candidate set of checks: when would it have held, advanced or
rolled back, next to what actually happened. Pure: checks in, a ``Replay`` out; no Redis, no clock.

The decision rules are the leader's (``controller._check_group``): ``assess`` judges each stored
window with the candidate's thresholds; a failure streak of ``consecutive_failures`` with v2 traffic
rolls back; passing checks add judged time to the rollout's hold (a gap counts two check intervals
at most) and a hold of ``interval`` advances; insufficient data and errors hold; a fresh history (a
new rollout, a split set by hand) restarts the streak.

What a replay cannot know: the traffic a different decision would have produced. It judges the
windows as they were. After the candidate's rollback the later checks of that history are
``not_judged`` (v2 would have served nothing) until the history starts afresh; an earlier candidate
advance is judged on the traffic of the step actually served.

Seam for other judges: ``judges`` are called in order per check with a ``Judging`` (the stored
check, the built-in verdict or the previous judge's, the streak before this check) and return the
verdict to act on, as the leader's own steps do after ``assess`` (metric gates: ``decide.combine``
over gate records re-evaluated at the check's time; the statistical judge: its verdict from the
stored increment, with its tally kept in the closure). ``outcome_judge`` adapts a simple
pass/fail/inconclusive answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import Field, field_validator

from proxy.canary.analysis import History, Status, Verdict, assess
from proxy.canary.history import Check
from proxy.settings import CanarySettings, CanaryThresholds, Gate, HttpGate, PrometheusGate, StrictModel

ROLLBACK, ADVANCE, HOLD, NOT_JUDGED = "rollback", "advance", "hold", "not_judged"
PROGRESSING = "progressing"


class CandidateFile(StrictModel):
    """The ``--gates FILE`` shape: the judging parts of the canary settings, each optional (what is
    left out is taken from the running configuration)."""

    thresholds: CanaryThresholds | None = None
    group_thresholds: dict[str, CanaryThresholds] | None = None
    consecutive_failures: int | None = Field(default=None, ge=1, le=1000)
    gates: dict[str, list[Gate]] | None = None

    @field_validator("gates")
    @classmethod
    def _unique_gate_names(cls, value: dict[str, list[Gate]] | None) -> dict[str, list[Gate]] | None:
        """The settings' rule: gate names unique per group, counting those for every group."""
        for group, gates in (value or {}).items():
            names = [g.name for g in gates] + [g.name for g in (value or {}).get("*", []) if group != "*"]
            if len(names) != len(set(names)):
                raise ValueError(f"gate names must be unique per group (with '*'): {group}: {names}")
        return value


@dataclass(frozen=True)
class Candidate:
    thresholds: CanaryThresholds
    group_thresholds: dict[str, CanaryThresholds]
    consecutive_failures: int
    check_interval_seconds: float
    gates: dict[str, list[PrometheusGate | HttpGate]] = field(default_factory=dict)
    window_seconds: float = 60.0

    @classmethod
    def of(cls, canary: CanarySettings, given: CandidateFile | None = None) -> Candidate:
        given = given or CandidateFile()
        return cls(
            given.thresholds if given.thresholds is not None else canary.thresholds,
            given.group_thresholds if given.group_thresholds is not None else dict(canary.group_thresholds),
            given.consecutive_failures or canary.consecutive_failures,
            canary.check_interval_seconds,
            dict(given.gates if given.gates is not None else canary.gates),
            canary.window_seconds,
        )

    def for_group(self, group: str) -> CanaryThresholds:
        return self.group_thresholds.get(group, self.thresholds)

    def gates_for(self, group: str) -> list[PrometheusGate | HttpGate]:
        """As ``CanarySettings.gates_for``: the group's own gates, then those for every group."""
        return [*self.gates.get(group, []), *self.gates.get("*", [])]


@dataclass(frozen=True, slots=True)
class Judging:
    """What a judge sees for one stored check."""

    group: str
    check: Check
    verdict: Verdict  # the built-in verdict (or the previous judge's)
    streak: int  # failed checks in a row before this one
    thresholds: CanaryThresholds
    failures_to_act: int


Judge = Callable[[Judging], Verdict]
"""The verdict to act on for one stored check (its ``rollback`` rolls back, its
``consecutive_failures`` is the streak the next check starts from)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """A simple answer about one stored check (a gate, a judge): pass, fail or inconclusive."""

    status: Status
    reason: str
    check: str


def outcome_judge(answer: Callable[[str, Check], Outcome | None]) -> Judge:
    """A judge from a simple answer: a failure fails the check (and counts toward the streak as
    the built-in checks' failures do); otherwise an inconclusive answer (``ERROR``,
    ``INSUFFICIENT_DATA``) holds a passing check; None or a pass leaves the verdict as it is."""

    def judge(j: Judging) -> Verdict:
        verdict, got = j.verdict, answer(j.group, j.check)
        if got is None or got.status is Status.PASS or verdict.status is Status.FAIL:
            return verdict
        if got.status is Status.FAIL:
            streak = j.streak + 1
            return replace(verdict, status=Status.FAIL, reason=got.reason, failed_check=got.check,
                           consecutive_failures=streak, rollback=streak >= j.failures_to_act)  # fmt: skip
        if verdict.status is Status.PASS:
            return replace(verdict, status=got.status, reason=got.reason, consecutive_failures=j.streak)
        return verdict

    return judge


@dataclass(frozen=True, slots=True)
class Step:
    """One check in the timeline: what actually happened and what the candidate would have done."""

    at: float
    split: float
    rollout: float | None  # the rollout's share at the check, None without a rollout
    actual_status: str
    actual_action: str
    actual_failed_check: str | None
    status: str
    action: str
    failed_check: str | None
    reason: str
    streak: int

    @property
    def notable(self) -> bool:
        return self.action in (ROLLBACK, ADVANCE) or self.actual_action in (ROLLBACK, ADVANCE)


@dataclass
class Replay:
    group: str
    steps: list[Step] = field(default_factory=list)

    def first(self, action: str, actual: bool) -> Step | None:
        for step in self.steps:
            if (step.actual_action if actual else step.action) == action:
                return step
        return None

    def count(self, action: str, actual: bool) -> int:
        return sum(1 for s in self.steps if (s.actual_action if actual else s.action) == action)


def _actual_action(check: Check, after: Check | None) -> str:
    """What the leader did at ``check``: the rollback it recorded, or the advance it was due to
    make, confirmed by the next stored check's rollout being on a new hold (an advance refused by
    a race, e.g. a pause landing meanwhile, is a hold)."""
    if check.action == "rolled_back":
        return ROLLBACK
    if check.action == "advance_due":
        if after is None or after.rollout is None or check.rollout is None:
            return ADVANCE
        return ADVANCE if after.rollout.hold != check.rollout.hold else HOLD
    return HOLD


def _held(check: Check) -> bool:
    """A step the checks allowed but something else held at this check (parity behind, an
    approval not given, a confirm hook refusing): the candidate does not advance there either."""
    return bool(check.extras.get("parity_hold") or check.extras.get("step_hold"))


def replay(group: str, checks: Sequence[Check], candidate: Candidate, judges: Sequence[Judge] = ()) -> Replay:
    """The candidate's decisions over ``checks`` (oldest first)."""
    thresholds = candidate.for_group(group)
    out = Replay(group)
    streak = 0
    stopped = False  # the candidate rolled back: later checks of this history are not judged
    hold: tuple[Any, ...] | None = None
    judged = 0.0
    last_at: float | None = None
    counted_from = 0.0  # judged time counts from the later of the step's start and the last advance
    for index, check in enumerate(checks):
        after = checks[index + 1] if index + 1 < len(checks) else None
        if check.fresh:
            streak, stopped = 0, False
        rollout = check.rollout
        actual = (check.at, check.split, rollout.percentage if rollout else None, check.status,
                  _actual_action(check, after), check.failed_check)  # fmt: skip
        if stopped:
            out.steps.append(Step(*actual, "", NOT_JUDGED, None, "after the candidate's rollback", 0))
            last_at = check.at
            continue
        cf = candidate.consecutive_failures
        verdict = assess(check.v1, check.v2, thresholds, History(streak), failures_to_act=cf)
        for judge in judges:
            verdict = judge(Judging(group, check, verdict, streak, thresholds, cf))
        status, reason, failed = verdict.status, verdict.reason, verdict.failed_check
        streak = verdict.consecutive_failures
        action = HOLD
        if verdict.rollback and check.split > 0:
            action, stopped = ROLLBACK, True
        elif rollout is not None and rollout.state == PROGRESSING:
            if rollout.hold != hold:
                hold, judged, counted_from = rollout.hold, 0.0, rollout.step_started_at
            if status is Status.PASS:
                start = max(last_at or 0.0, counted_from)
                judged += max(0.0, min(check.at - start, 2 * candidate.check_interval_seconds))
                if judged >= rollout.interval and not _held(check):
                    action, judged, counted_from = ADVANCE, 0.0, check.at
        out.steps.append(Step(*actual, status.value, action, failed, reason, streak))
        last_at = check.at
    return out


# --- the summary --------------------------------------------------------------------------------


def clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(at))


def _gap(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def summary(result: Replay) -> str:
    """One sentence comparing the candidate's first rollback (and advances) with what happened."""
    if not result.steps:
        return f"{result.group}: no stored checks in that time"
    mine, theirs = result.first(ROLLBACK, False), result.first(ROLLBACK, True)
    if mine and theirs:
        delta = theirs.at - mine.at
        if abs(delta) < 0.5:
            text = f"candidate would have rolled back at {clock(mine.at)}, as the actual rollback did"
        else:
            side = "earlier" if delta > 0 else "later"
            text = (
                f"candidate would have rolled back at {clock(mine.at)}, {_gap(delta)} {side} than the "
                f"actual rollback ({clock(theirs.at)})"
            )
    elif mine:
        text = f"candidate would have rolled back at {clock(mine.at)}; there was no actual rollback"
    elif theirs:
        text = f"candidate would not have rolled back; the actual rollback was at {clock(theirs.at)}"
    else:
        text = "no rollback, candidate or actual"
    advances = (result.count(ADVANCE, False), result.count(ADVANCE, True))
    if any(advances):
        text += f"; advances: candidate {advances[0]}, actual {advances[1]}"
    return f"{result.group}: {text}"


def view(result: Replay, candidate: Candidate, since: float, skipped: int = 0) -> dict[str, Any]:
    """The JSON view (docs/schemas/backtest.json) of one group's replay: the notable steps only
    (any rollback or advance, candidate or actual), counts of every verdict on both sides."""

    def counts(actual: bool) -> dict[str, int]:
        out: dict[str, int] = {}
        for step in result.steps:
            key = step.actual_status if actual else (step.status or NOT_JUDGED)
            out[key] = out.get(key, 0) + 1
        return out

    def first(action: str, actual: bool) -> float | None:
        step = result.first(action, actual)
        return None if step is None else step.at

    return {
        "group": result.group,
        "since": since,
        "checks": len(result.steps),
        "skipped_records": skipped,
        "candidate": {
            "thresholds": candidate.for_group(result.group).model_dump(),
            "consecutive_failures": candidate.consecutive_failures,
            "gates": [gate.name for gate in candidate.gates_for(result.group)],
        },
        "summary": summary(result),
        "first_rollback": {"candidate": first(ROLLBACK, False), "actual": first(ROLLBACK, True)},
        "advances": {"candidate": result.count(ADVANCE, False), "actual": result.count(ADVANCE, True)},
        "verdicts": {"candidate": counts(False), "actual": counts(True)},
        "timeline": [
            {
                "at": s.at,
                "split": s.split,
                "rollout_percentage": s.rollout,
                "actual": {
                    "status": s.actual_status,
                    "action": s.actual_action,
                    "failed_check": s.actual_failed_check,
                },
                "candidate": {
                    "status": s.status or None,
                    "action": s.action,
                    "failed_check": s.failed_check,
                    "reason": s.reason,
                    "streak": s.streak,
                },
            }  # fmt: skip
            for s in result.steps
            if s.notable
        ],
    }
