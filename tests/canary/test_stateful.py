"""The canary's safety properties: operator actions, leader ticks, leader crashes and Redis data loss
interleaved at random (Hypothesis stateful testing) against the real session Redis, with:

- the split always equals what the rollout state says;
- a manual change or rollback is never undone by automation (only a rollback on checks made
  after it, with v2 failing after it, may move the split, and only to 0);
- every transition is in the log;
- every rollback produces exactly one delivered critical alert;
- the leader never leaves an approval step (``25!``) without an approval of that hold.

Runs with the ``fast`` Hypothesis profile by default, ``HYPOTHESIS_PROFILE=deep`` for more.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from proxy.canary.rollout import RolloutError
from proxy.control.store import ControlStore
from proxy.metrics import Metrics
from tests.canary.test_loop import Rig

REDIS_URL: dict[str, str] = {}
APPROVAL_STEPS = (25, 50)  # every ladder below marks these (when it has them) as approval steps


class Migration(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.rig = Rig(REDIS_URL["url"], step_interval_seconds=2, consecutive_failures=2)
        self.store = ControlStore(self.rig.settings, self.rig.redis, Metrics())
        self.do(self.rig.redis.flushdb())
        self.do(self.store.refresh())
        self.crashes = 0
        self.manual: float | None = None  # the last share a person set, while it must stand
        self.failing_since_manual = 0
        self.checks_since_manual = 0

    def do(self, awaitable: Any) -> Any:
        return self.loop.run_until_complete(awaitable)

    def teardown(self) -> None:
        self.do(self.rig.redis.aclose())
        self.loop.close()

    def person(self) -> None:
        """Any operator action ends what the manual-change invariant protects."""
        self.manual = None

    async def attempt(self, action: Any) -> None:
        try:
            await action
        except RolloutError:
            pass

    # --- operator actions ------------------------------------------------------------------

    @rule(steps=st.sampled_from([[10, 50, 100], [25, 100], [5, 10, 20, 40, 100], [10, 25, 50, 100]]))
    def start(self, steps: list[float]) -> None:
        self.person()
        held = [step for step in steps if step in APPROVAL_STEPS]
        self.do(self.attempt(self.rig.rollouts.start("default", steps, 2, "op", held)))

    @rule()
    def approve(self) -> None:
        self.do(self.attempt(self.rig.rollouts.approve("default", "op")))

    @rule(action=st.sampled_from(["pause", "resume", "promote", "abort"]))
    def rollout_command(self, action: str) -> None:
        self.person()
        self.do(self.attempt(getattr(self.rig.rollouts, action)("default", "op")))

    @rule(value=st.sampled_from([0, 10, 30, 100]))
    def set_split(self, value: float) -> None:
        self.do(self.rig.control.set_split(value))
        self.manual = value
        self.failing_since_manual = self.checks_since_manual = 0

    # --- the fleet -------------------------------------------------------------------------

    @rule(failing=st.booleans())
    def second(self, failing: bool) -> None:
        self.do(self.rig.second(v2_errors=30 if failing else 0))
        self.do(self.store.refresh())
        self.checks_since_manual += 1
        if failing:
            self.failing_since_manual += 1

    @rule()
    def leader_crashes(self) -> None:
        """The leader process dies (no shutdown); its lock expires; another one takes over."""
        self.crashes += 1
        self.do(self.rig.redis.delete("strangler:canary:leader"))
        self.rig.new_controller(f"leader-{self.crashes}")

    @rule()
    def redis_loses_its_data(self) -> None:
        self.do(self.rig.redis.flushdb())
        self.manual = None  # Redis lost it, not automation
        self.do(self.store.refresh())

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def split_equals_state(self) -> None:
        state = self.do(self.rig.rollouts.get("default"))
        if state is not None:
            assert self.do(self.rig.split()) == f"{state.percentage:g}", state

    @invariant()
    def manual_change_stands(self) -> None:
        if self.manual is None:
            return
        split = float(self.do(self.rig.split()) or 0)
        if split != self.manual:
            # only a rollback judged on failures after the change: enough checks, v2 failing in them
            assert split == 0 and self.checks_since_manual >= 2 and self.failing_since_manual >= 1

    @invariant()
    def every_transition_is_logged(self) -> None:
        state = self.do(self.rig.rollouts.get("default"))
        if state is None:
            return
        history = self.do(self.rig.rollouts.history("default", 200))
        if state.seq <= 100:
            assert len(history) == state.seq
        assert history[0] == state.last

    @invariant()
    def no_approval_step_is_left_by_the_leader_unapproved(self) -> None:
        history = list(reversed(self.do(self.rig.rollouts.history("default", 200))))
        approved = False
        for entry in history:
            action = entry["action"]
            came_from = entry.get("from") or {}
            if (
                entry["by"].startswith("leader")
                and action in ("step_advanced", "completed")
                and came_from.get("percentage") in APPROVAL_STEPS
            ):
                assert approved, history
            approved = action == "approved" or (approved and action == "paused")

    @invariant()
    def one_critical_alert_per_rollback(self) -> None:
        rollbacks = sum(
            sample.value
            for metric in self.rig.metrics.rollbacks.collect()
            for sample in metric.samples
            if sample.name.endswith("_total") and sample.labels.get("reason") != "aborted"
        )
        alerts = [e for e in self.rig.notifier.events if e.kind == "rolled_back"]
        assert all(e.severity == "critical" for e in alerts)
        assert len({e.id for e in alerts}) == len(alerts) == rollbacks


@pytest.mark.slow
def test_rollouts_hold_under_random_interleavings(redis_url: str) -> None:
    REDIS_URL["url"] = redis_url
    from hypothesis.stateful import run_state_machine_as_test

    # the fast profile keeps the default run short; HYPOTHESIS_PROFILE=deep runs the profile's count
    examples = min(settings.default.max_examples, 20) if settings.default.max_examples <= 50 else None
    chosen = settings(
        settings.default, stateful_step_count=30, **({"max_examples": examples} if examples else {})
    )
    run_state_machine_as_test(Migration, settings=chosen)
