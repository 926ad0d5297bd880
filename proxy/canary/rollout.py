"""The step ladder as a state machine kept in Redis: progressing, paused, completed, rolled_back.

The state is one JSON value per group (``<prefix>rollout:<group>``). Every change to it is one
compare-and-set: WATCH the state, the group's split key (and, for the leader, its lock and the
group's history mark), decide from what was read, then write state + split + log + alert outbox in
one MULTI. So the split always equals what the state says, and a write that raced with ours makes
ours start again from the new facts. Who wins a race is decided by the rules each transition checks
on those fresh facts, not by timing:

- a manual split write (``strangler set``/``rollback``, the admin API) always applies; during a
  rollout it pauses it (``override`` holds the hand-set share) or, at 0, ends it;
- the automatic rollback applies over any concurrent promote, pause or resume, but yields to a
  manual split write made after the checks it acted on;
- an automatic advance needs the state still ``progressing`` at the version (``seq``) the leader
  judged, the split untouched, and the lock still held by that leader.

The ladder itself is arithmetic: the next step is ``steps[index + 1]``, 100 ends it.

Approval steps (``25!`` in a ladder, kept as ``approval_steps`` beside the numeric ``steps``): the
rollout reaches 25% as usual; leaving it needs both the judged time of its hold (the leader's rule)
and an approval of that very hold (``hold_id``). An approval is one more compare-and-set
(``approve``), recorded in the state and the log; a hold that ends (a step taken, a pause and
resume) takes its approval with it, so a new hold at the same step needs a new one. The automatic
rollback does not look at approvals: it stays armed during the hold.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from pydantic import TypeAdapter, ValidationError
from redis.exceptions import WatchError

from proxy.canary import events, records
from proxy.canary.events import Event
from proxy.canary.leader import LeaderToken
from proxy.control import splitstate
from proxy.control.keys import Keys
from proxy.control.snapshot import as_text
from proxy.settings import check_approval_steps, parse_ladder
from proxy.settings import check_steps as ladder_rule

PROGRESSING, PAUSED, COMPLETED, ROLLED_BACK = "progressing", "paused", "completed", "rolled_back"
ACTIVE = (PROGRESSING, PAUSED)
LOG_LIMIT = 100

# Called between the read and the write of every transition (action name, group). Tests use it to
# land a competing write at exactly that moment; production passes nothing.
RaceHook = Callable[[str, str], Awaitable[None]]


class RolloutError(Exception):
    """A transition that does not apply (no rollout, wrong state); the message says why."""


class Superseded(RolloutError):
    """An automatic action found the facts it decided on changed (or the lock lost): nothing done."""


@dataclass(frozen=True)
class Approval:
    """Who let a hold go, and when: valid for the hold it names only."""

    hold_id: int
    step: float
    by: str
    at: float


@dataclass(frozen=True)
class RolloutState:
    group: str
    state: str
    steps: list[float]
    index: int
    interval_seconds: float
    started_at: float
    step_started_at: float
    updated_at: float
    seq: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    override: float | None = None  # share set by hand during (or after) the rollout
    hold_id: int = 0  # changes whenever a hold starts (a step entered, a resume): judged time restarts
    approval_steps: list[float] = field(default_factory=list)  # steps held until approved (``25!``)
    approval: Approval | None = None  # the last approval given (it counts for its own hold only)

    @property
    def at_approval_step(self) -> bool:
        """Active, on the ladder (no hand-set share) and at a step written ``N!``."""
        return self.active and self.override is None and self.steps[self.index] in self.approval_steps

    @property
    def approved(self) -> bool:
        """The current hold was approved."""
        return self.approval is not None and self.approval.hold_id == self.hold_id

    @property
    def awaiting_approval(self) -> bool:
        """At an approval step whose hold nobody approved yet: the leader does not advance."""
        return self.at_approval_step and not self.approved

    @property
    def percentage(self) -> float:
        if self.override is not None:
            return self.override
        return 0.0 if self.state == ROLLED_BACK else self.steps[self.index]

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def held_for(self, now: float) -> float:
        return now - self.step_started_at

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["percentage"] = self.percentage
        data["awaiting_approval"] = self.awaiting_approval
        data["awaiting_since"] = self.step_started_at if self.awaiting_approval else None
        return data

    @classmethod
    def from_json(cls, raw: str | bytes) -> RolloutState:
        """Raises ValueError, one line naming the bad field, for a value that is not a rollout."""
        try:
            return _STATE.validate_json(raw)  # ``percentage`` (derived, in as_dict) is ignored
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(part) for part in err["loc"]) or "value"
            raise ValueError(f"rollout state in Redis is not valid: {where}: {err['msg']}") from None


_STATE: TypeAdapter[RolloutState] = TypeAdapter(RolloutState)


@dataclass(frozen=True)
class Facts:
    """What a transaction read under WATCH."""

    current: RolloutState | None
    split: str | None
    history_since: float | None
    lock_holder: str | None
    now: float

    def split_value(self) -> float | None:
        try:
            return None if self.split is None else float(self.split)
        except ValueError:
            return None


Change = Callable[[Facts], "tuple[RolloutState | None, Event | None, dict[str, Any]] | None"]


def parse_steps(text: str | list[Any]) -> tuple[list[float], list[float]]:
    """``1,5,25!,...,100`` (or the same as a list) -> (steps, approval steps), by the settings'
    rule (``proxy.settings.parse_ladder``), as a ``RolloutError``."""
    items: list[Any] = [part for part in text.split(",") if part.strip()] if isinstance(text, str) else text
    try:
        return parse_ladder(items)
    except ValueError as exc:
        raise RolloutError(str(exc)) from None


def check_steps(steps: list[float], approval_steps: list[float] | None = None) -> None:
    """The settings' ladder rules (``proxy.settings.check_steps``), as a ``RolloutError``."""
    try:
        ladder_rule(steps)
        check_approval_steps(steps, approval_steps or [])
    except ValueError as exc:
        raise RolloutError(str(exc)) from None


def parse_duration(text: str) -> float:
    """``300``, ``0.5s``, ``5m``, ``1h`` -> seconds."""
    raw = text.strip().lower()
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if raw.endswith(suffix):
            number, scale = raw[: -len(suffix)], units[suffix]
            break
    else:
        number, scale = raw, 1.0
    try:
        value = float(number) * scale
    except ValueError as exc:
        raise RolloutError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h)") from exc
    if not value > 0:
        raise RolloutError(f"duration must be positive: {text!r}")
    return value


class Rollouts:
    """Reads and transitions rollouts. Shared by the leader, the admin API and the CLI."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        wall: Callable[[], float] = time.time,
        race_hook: RaceHook | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.wall = wall
        self.race_hook = race_hook

    def key(self, group: str) -> str:
        return self.keys.rollout(group)

    def log_key(self, group: str) -> str:
        return self.keys.rollout_log(group)

    async def get(self, group: str) -> RolloutState | None:
        raw = await self.redis.get(self.key(group))
        return RolloutState.from_json(raw) if raw else None

    async def history(self, group: str, limit: int = 20) -> list[dict[str, Any]]:
        raw = await self.redis.lrange(self.log_key(group), 0, limit - 1)
        return [json.loads(item) for item in raw]

    # --- transitions made by people --------------------------------------------------------

    async def start(
        self,
        group: str,
        steps: list[float],
        interval: float,
        by: str,
        approval_steps: list[float] | None = None,
    ) -> RolloutState:
        approvals = sorted(set(approval_steps or []))
        check_steps(steps, approvals)

        def go(f: Facts) -> tuple[RolloutState, Event, dict[str, Any]]:
            current = f.current
            if current is not None and current.active:
                raise RolloutError(f"a rollout for {group} is already {current.state}; abort it first")
            hold = (current.hold_id + 1) if current else 1
            state = RolloutState(
                group, PROGRESSING, list(steps), 0, interval, f.now, f.now, f.now, hold_id=hold,
                approval_steps=approvals,
            )  # fmt: skip
            return state, events.make(
                "started", group, f"rollout of {group} started at {steps[0]:g}%", by,
                steps=steps, interval_seconds=interval, approval_steps=approvals,
            ), {"fresh_history": True, **_awaiting(state, by)}  # fmt: skip

        return await self._required(group, "start", go, by)

    async def pause(self, group: str, by: str) -> RolloutState:
        def go(f: Facts) -> tuple[RolloutState, Event, dict[str, Any]]:
            state = _require(f.current, group, PROGRESSING)
            return (
                replace(state, state=PAUSED),
                events.make("paused", group, f"rollout of {group} paused at {state.percentage:g}%", by),
                {},
            )

        return await self._required(group, "pause", go, by)

    async def resume(self, group: str, by: str) -> RolloutState:
        """Carry on from a pause. After a hand-set share the ladder resumes at the highest step
        not above it (the first step after a share of 0), and the split is set to that step in the
        same write, so what is printed is what is served. A rolled-back rollout is not resumed:
        start a new one."""

        def go(f: Facts) -> tuple[RolloutState, Event, dict[str, Any]]:
            state = f.current
            if state is not None and state.state == ROLLED_BACK:
                raise RolloutError(
                    f"the rollout for {group} was rolled back; start a new one with `strangler rollout start`"
                )
            state = _require(state, group, PAUSED)
            index = state.index
            if state.override is not None:
                below = [i for i, step in enumerate(state.steps) if step <= state.override]
                index = below[-1] if below else 0
            new = replace(
                state, state=PROGRESSING, index=index, override=None, step_started_at=f.now,
                hold_id=state.hold_id + 1,
            )  # fmt: skip
            return (
                new,
                events.make("resumed", group, f"rollout of {group} resumed at {new.percentage:g}%", by),
                _awaiting(new, by),
            )

        return await self._required(group, "resume", go, by)

    async def promote(
        self, group: str, by: str, full: bool = False, figures: dict[str, Any] | None = None
    ) -> RolloutState:
        """Next step now (``full``: straight to 100). After a hand-set share, the next step above it."""

        def go(f: Facts) -> tuple[RolloutState, Event, dict[str, Any]]:
            state = _require(f.current, group, *ACTIVE)
            return _advanced(state, group, by, f.now, full, figures)

        return await self._required(group, "promote", go, by, figures=figures)

    async def approve(self, group: str, by: str, hold_id: int | None = None) -> RolloutState:
        """Let the current approval hold go: the leader then leaves the step once the checks have
        passed for the hold's interval. Refused (nothing written), one line saying why: no rollout,
        not active, paused, not at an approval step (an approval given early is not kept), already
        approved, or ``hold_id`` (a Slack button's) naming a hold that is over."""

        def go(f: Facts) -> tuple[RolloutState, Event, dict[str, Any]]:
            return _approved(f.current, group, by, f.now, hold_id)

        return await self._required(group, "approve", go, by)

    async def abort(self, group: str, by: str, reason: str = "aborted") -> RolloutState:
        """Traffic to 0 and the state rolled back, in one write; refused (nothing written) unless
        the rollout is progressing or paused."""

        def go(f: Facts) -> tuple[RolloutState, Event, dict[str, Any]]:
            state = f.current
            if state is not None and not state.active:
                raise RolloutError(
                    f"nothing to abort: the rollout of {group} is {state.state} at {state.percentage:g}%"
                )
            state = _require(state, group, *ACTIVE)
            return replace(state, state=ROLLED_BACK, override=None), events.make(
                "aborted", group, f"rollout of {group} aborted at {state.percentage:g}%: v2 share is 0%", by,
                reason=reason,
            ), {}  # fmt: skip

        return await self._required(group, "abort", go, by)

    async def manual_split(self, group: str, value: float, by: str = "operator") -> RolloutState | None:
        """A share written by hand. It always applies and starts a fresh canary history. During a
        rollout it pauses it at that share (ends it at 0); after one it is recorded as the new share."""

        def go(f: Facts) -> tuple[RolloutState | None, Event | None, dict[str, Any]]:
            state = f.current
            extra: dict[str, Any] = {"fresh_history": True, "split": value, "ack_lost": True}
            if state is None:
                return None, None, extra
            if state.active:
                if value <= 0:
                    new = replace(state, state=ROLLED_BACK, override=None)
                    text = f"rollout of {group} ended: v2 share set to 0% by hand"
                else:
                    new = replace(state, state=PAUSED, override=value)
                    text = f"rollout of {group} paused: v2 share set to {value:g}% by hand"
                return new, events.make("overridden", group, text, by, percentage=value), extra
            base = replace(state, override=None).percentage
            new = replace(state, override=None if value == base else value)
            return new, None, {**extra, "action": "split_set"}

        return await self._transition(group, "manual_split", go, by)

    # --- transitions made by the leader ------------------------------------------------------

    async def advance(
        self, group: str, expect_seq: int, leader: LeaderToken, figures: dict[str, Any] | None = None
    ) -> RolloutState | None:
        """The timed advance: only from ``progressing`` at the version judged, with the split as the
        state says and the lock still ours. None (nothing written) otherwise."""
        by = f"leader {leader.identity}"

        def go(f: Facts) -> tuple[RolloutState, Event, dict[str, Any]] | None:
            state = f.current
            if state is None or state.state != PROGRESSING or state.seq != expect_seq:
                return None
            if state.override is not None or state.awaiting_approval:
                return None  # an approval hold is checked here too, on the facts under WATCH
            if f.split_value() != state.percentage:
                return None
            return _advanced(state, group, by, f.now, False, figures)

        return await self._transition(group, "advance", go, by, figures=figures, leader=leader)

    async def pause_overridden(self, group: str, expect_seq: int, leader: LeaderToken) -> RolloutState | None:
        """The split was changed outside our tools (``redis-cli SET``): pause at that share."""

        def go(f: Facts) -> tuple[RolloutState, Event, dict[str, Any]] | None:
            state = f.current
            if state is None or not state.active or state.seq != expect_seq:
                return None
            value = f.split_value()
            if value is not None and value == state.percentage:
                return None
            if value is not None and not 0 <= value <= 100:
                value = None
            text = f"rollout of {group} paused: its split was changed to {f.split} outside the rollout"
            if value is None:  # unset or invalid: the state's share is written back
                new = replace(state, state=PAUSED)
            else:
                new = replace(state, state=PAUSED, override=value)
            extra = {"fresh_history": True, **({"split": value} if value is not None else {})}
            return new, events.make("paused", group, text, f"leader: split changed to {f.split}"), extra

        return await self._transition(group, "pause_overridden", go, "leader", leader=leader)

    async def rollback(
        self,
        group: str,
        decision: dict[str, Any],
        event: Event,
        leader: LeaderToken,
        history_since: float | None,
    ) -> RolloutState | None | bool:
        """The automatic rollback: split 0, rollout rolled back, decision and critical alert, in one
        write. Wins over a concurrent promote/pause/resume (it just retries on their writes); yields
        to a manual split write made after the checks it acted on. False if nothing was done."""
        done: list[bool] = []

        def go(f: Facts) -> tuple[RolloutState | None, Event | None, dict[str, Any]] | None:
            if (f.history_since or 0) > (history_since or 0):
                return None  # a person changed the split after those checks: theirs stands
            if (f.split_value() or 0) <= 0 and (f.current is None or f.current.percentage <= 0):
                return None
            state = f.current
            new = None if state is None else replace(state, state=ROLLED_BACK, override=None)
            done.append(True)
            return new, event, {"split": 0.0, "decision": decision, "action": "rolled_back"}

        state = await self._transition(group, "rollback", go, event.by, figures=decision, leader=leader)
        return state if done else False

    async def rollback_for_alert(
        self,
        group: str,
        inherited: float,
        decision: dict[str, Any],
        event_for: Callable[[float], Event],
        by: str,
    ) -> float | None:
        """An alert (Alertmanager) rolls the group back: split 0, the rollout (any state) rolled
        back, decision and critical alert, in one write, as the leader's rollback. ``inherited``
        is the share the group serves when its own key is unset (the global split, or the
        configured default); ``event_for(share)`` makes the alert. Returns the share it had, or
        None (nothing written) when the group is already at 0: a repeated alert is a no-op."""
        had: list[float] = []

        def go(f: Facts) -> tuple[RolloutState | None, Event, dict[str, Any]] | None:
            had.clear()  # a retried transaction decides again on the new facts
            own = f.split_value()
            share = own if own is not None else inherited
            if share <= 0 and (f.current is None or f.current.percentage <= 0):
                return None
            state = f.current
            new = None if state is None else replace(state, state=ROLLED_BACK, override=None)
            had[:] = [share]
            taken = {**decision, "from_percentage": share}
            return new, event_for(share), {"split": 0.0, "decision": taken, "action": "rolled_back"}

        await self._transition(group, "rollback", go, by, figures=decision)
        return had[0] if had else None

    async def restore(self, remembered: RolloutState, by: str) -> RolloutState | None:
        """After Redis lost its data: write back a rollout the leader remembers, paused if it was
        active, at the share the proxies restored (or its own share if none was). Never over an
        existing state."""

        def go(f: Facts) -> tuple[RolloutState, None, dict[str, Any]] | None:
            if f.current is not None:
                return None
            state = replace(remembered, state=PAUSED) if remembered.active else remembered
            served = f.split_value()
            if served is not None and served != state.percentage:
                state = replace(state, override=served)
            return state, None, {"action": "restored", "fresh_history": True}

        return await self._transition(remembered.group, "restore", go, by)

    # --- the one compare-and-set ------------------------------------------------------------

    async def _required(
        self, group: str, action: str, change: Change, by: str, figures: dict[str, Any] | None = None
    ) -> RolloutState:
        state = await self._transition(group, action, change, by, figures=figures)
        assert state is not None
        return state

    async def _transition(
        self,
        group: str,
        action: str,
        change: Change,
        by: str,
        figures: dict[str, Any] | None = None,
        leader: LeaderToken | None = None,
    ) -> RolloutState | None:
        """WATCH state, split, history mark (and, for the leader, its lock and fencing counter);
        decide; MULTI. Returns the new state, or None when ``change`` declined (automatic actions
        whose facts moved on). A leader whose token is stale raises ``Superseded``: if a newer
        leader takes over between our reads and EXEC, the WATCH on the lock aborts EXEC and the
        retry finds the token stale."""
        key, split_key = self.key(group), self.keys.split(group)
        since_key = records.since_key(self.keys, group)
        watched = [key, split_key, since_key] + ([leader.key, leader.fence_key] if leader else [])
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(*watched)
                    values = [await pipe.get(name) for name in watched]  # cluster pipelines refuse MGET
                    raw, split_raw, since_raw = values[0], values[1], values[2]
                    holder = as_text(values[3]) if leader else None
                    if leader is not None:
                        fence = int(values[4] or 0)
                        if holder != leader.identity or fence != leader.fence:
                            await pipe.reset()
                            raise Superseded(
                                f"fencing token {leader.fence} of {leader.identity} is stale "
                                f"(lock at {fence}, held by {holder or 'nobody'})"
                            )
                    if self.race_hook is not None:
                        await self.race_hook(action, group)
                    facts = Facts(
                        RolloutState.from_json(raw) if raw else None,
                        as_text(split_raw),
                        float(since_raw) if since_raw else None,
                        holder,
                        self.wall(),
                    )
                    outcome = change(facts)
                    if outcome is None:
                        await pipe.reset()
                        return None
                    new, event, extra = outcome
                    pipe.multi()
                    current, now = facts.current, facts.now
                    if new is not None:
                        entry = {
                            "at": now,
                            "by": by,
                            "action": extra.get("action") or (event.kind if event else new.state),
                            "from": {"state": current.state, "percentage": current.percentage}
                            if current
                            else None,
                            "to": {"state": new.state, "percentage": new.percentage},
                            "figures": figures,
                        }
                        if leader is not None:
                            entry["fence"] = leader.fence
                        seq = (current.seq if current else 0) + 1
                        new = replace(new, updated_at=now, seq=seq, last=entry)
                        pipe.set(key, json.dumps(new.as_dict()))
                        pipe.lpush(self.log_key(group), json.dumps(entry, default=str))
                        pipe.ltrim(self.log_key(group), 0, LOG_LIMIT - 1)
                    split = extra.get("split", new.percentage if new is not None else None)
                    if split is not None:
                        pipe.set(split_key, f"{split:g}")
                        # rollback in force (match rules yield) and the pin epoch, in the same write
                        splitstate.note(
                            pipe, self.keys, group, split, action in ("rollback", "abort"), action == "start"
                        )
                    if extra.get("fresh_history"):
                        pipe.set(since_key, repr(now))
                    if extra.get("ack_lost"):
                        pipe.delete(records.lost_key(self.keys))
                    decision = extra.get("decision")
                    if decision is not None:
                        if leader is not None:
                            decision = {**decision, "fence": leader.fence}
                        text = json.dumps(decision, default=str)
                        pipe.set(records.decision_key(self.keys, group), text)
                        pipe.lpush(records.decisions_key(self.keys), text)
                        pipe.ltrim(records.decisions_key(self.keys), 0, records.DECISIONS_LIMIT - 1)
                    if event is not None:
                        events.push(pipe, self.keys, event)
                    for also in extra.get("also", ()):
                        events.push(pipe, self.keys, also)
                    await pipe.execute()
                    break
                except WatchError:
                    continue
        await self.redis.publish(self.keys.changes_channel, f"split:{group}")
        return new


def _advanced(
    state: RolloutState, group: str, by: str, now: float, full: bool, figures: dict[str, Any] | None
) -> tuple[RolloutState, Event, dict[str, Any]]:
    last = len(state.steps) - 1
    if full:
        index = last
    elif state.override is not None:
        above = [i for i, step in enumerate(state.steps) if step > state.override]
        index = above[0] if above else last
    else:
        index = min(state.index + 1, last)
    done = state.steps[index] >= 100
    new = replace(
        state, index=index, override=None, step_started_at=now, hold_id=state.hold_id + 1,
        state=COMPLETED if done else state.state,
    )  # fmt: skip
    kind = "completed" if done else "step_advanced"
    message = (
        f"rollout of {group} completed: v2 serves 100%"
        if done
        else f"rollout of {group} advanced {state.percentage:g}% -> {new.percentage:g}%"
    )
    extra = _awaiting(new, by)
    return new, events.make(kind, group, message, by, **({"figures": figures} if figures else {})), extra


def _awaiting(state: RolloutState, by: str) -> dict[str, Any]:
    """The ``awaiting_approval`` event (with the hold id a Slack button sends back) for a
    transition that starts an approval hold; queued in the same write (``extra["also"]``)."""
    if not (state.state == PROGRESSING and state.awaiting_approval):
        return {}
    event = events.make(
        "awaiting_approval", state.group,
        f"rollout of {state.group} holds at {state.percentage:g}% until approved "
        f"(strangler rollout approve --group {state.group})",
        by, step=state.percentage, hold_id=state.hold_id,
    )  # fmt: skip
    return {"also": [event]}


def _approved(
    state: RolloutState | None, group: str, by: str, now: float, hold_id: int | None
) -> tuple[RolloutState, Event, dict[str, Any]]:
    """The approval rule, pure: the new state and its event, or a ``RolloutError`` saying why not."""
    if state is None:
        raise RolloutError(f"no rollout for {group}: nothing to approve")
    where = f"{state.state} at {state.percentage:g}%"
    if hold_id is not None and hold_id != state.hold_id:
        raise RolloutError(
            f"stale approval for {group}: hold {hold_id} is over (the rollout is {where} now, hold "
            f"{state.hold_id}); nothing approved"
        )
    if not state.active:
        raise RolloutError(f"nothing to approve: the rollout of {group} is {where}")
    if state.approved and state.approval is not None:
        when = time.strftime("%H:%M:%S", time.gmtime(state.approval.at))
        raise RolloutError(
            f"the hold of {group} at {state.percentage:g}% is already approved "
            f"by {state.approval.by} at {when} UTC"
        )
    if not state.at_approval_step:
        marked = ", ".join(f"{s:g}" for s in state.approval_steps) or "none"
        raise RolloutError(
            f"the rollout of {group} is {where}, not at an approval step (approval steps: {marked}); "
            "approve once the step is reached"
        )
    if state.state == PAUSED:
        raise RolloutError(
            f"the rollout of {group} is paused at {state.percentage:g}%; resume it first "
            "(the resumed hold is the one to approve)"
        )
    new = replace(state, approval=Approval(state.hold_id, state.percentage, by, now))
    event = events.make(
        "approved", group, f"rollout of {group} approved at {state.percentage:g}% by {by}", by,
        step=state.percentage, hold_id=state.hold_id,
    )  # fmt: skip
    return new, event, {}


def _require(current: RolloutState | None, group: str, *states: str) -> RolloutState:
    if current is None:
        raise RolloutError(f"no rollout for {group}")
    if current.state not in states:
        raise RolloutError(f"the rollout for {group} is {current.state}, not {' or '.join(states)}")
    return current
