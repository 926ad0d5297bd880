"""Approval steps (``25!``): the rollout reaches the step, then leaves it only with the checks'
judged time AND an approval of that hold. Driven by ``tick()`` with an injected clock against the
real Redis (tests/canary/test_loop.Rig); the leader change uses two controllers as test_races does.
"""

from __future__ import annotations

import json

import pytest

from proxy.canary import records
from proxy.canary.rollout import PROGRESSING, ROLLED_BACK, RolloutError, Rollouts, parse_steps
from tests.canary.test_loop import Rig, run

LADDER, HELD = [10.0, 25.0, 50.0, 100.0], [25.0]


async def at_hold(rig: Rig) -> None:
    """A rollout 10 -> 25! -> 50 -> 100 (2 s holds), walked up to its approval hold at 25%."""
    await rig.rollouts.start("default", LADDER, 2, "test", HELD)
    for _ in range(20):
        await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None
        if state.percentage == 25:
            return
    raise AssertionError("never reached 25%")


async def log_actions(rig: Rig) -> list[str]:
    return [entry["action"] for entry in reversed(await rig.rollouts.history("default", 100))]


def test_an_approval_step_holds_until_approved_then_the_ladder_goes_on(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        await at_hold(rig)
        for _ in range(10):  # five holds' worth of passing checks: no step without the approval
            await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None and (state.state, state.percentage) == (PROGRESSING, 25)
        assert state.awaiting_approval and state.as_dict()["awaiting_since"] == state.step_started_at
        assert (await rig.verdict())["step_hold"] == "awaiting approval of the hold at 25%"
        assert await rig.split() == "25"
        awaiting = rig.metrics.registry.get_sample_value
        assert awaiting("strangler_rollout_awaiting_approval", {"group": "default"}) == 1
        waiting = [e for e in rig.notifier.events if e.kind == "awaiting_approval"]
        assert len(waiting) == 1 and waiting[0].fields == {"step": 25.0, "hold_id": state.hold_id}

        approved = await rig.rollouts.approve("default", "alice")
        assert approved.approval is not None and approved.approval.by == "alice"
        assert approved.approval.at == rig.clock() and not approved.awaiting_approval
        await rig.second()  # judged time is long complete: the next check takes the step
        state = await rig.rollouts.get("default")
        assert state is not None and state.percentage == 50
        assert "step_hold" not in await rig.verdict()
        assert awaiting("strangler_rollout_awaiting_approval", {"group": "default"}) == 0
        entry = next(e for e in await rig.rollouts.history("default") if e["action"] == "approved")
        assert (entry["by"], entry["at"]) == ("alice", approved.approval.at)
        assert await log_actions(rig) == ["started", "step_advanced", "approved", "step_advanced"]
        assert rig.notifier.kinds()[-2:] == ["approved", "step_advanced"]

    run(redis_url, body)


def test_refusals_write_nothing(redis_url: str) -> None:
    """Early, twice, stale hold id, paused, no rollout, after the end: one line each, no write."""

    async def refused(rig: Rig, call: object, words: str) -> None:
        before = await rig.redis.get(rig.rollouts.key("default"))
        log = await rig.redis.llen(rig.rollouts.log_key("default"))
        with pytest.raises(RolloutError) as caught:
            await call  # type: ignore[misc]
        assert words in str(caught.value) and "\n" not in str(caught.value)
        assert await rig.redis.get(rig.rollouts.key("default")) == before
        assert await rig.redis.llen(rig.rollouts.log_key("default")) == log

    async def body(rig: Rig) -> None:
        r = rig.rollouts
        await refused(rig, r.approve("default", "x"), "no rollout for default")
        await r.start("default", LADDER, 2, "test", HELD)
        await refused(rig, r.approve("default", "x"), "not at an approval step (approval steps: 25)")
        await rig.redis.flushdb()
        await at_hold(rig)
        state = await r.get("default")
        assert state is not None
        await refused(rig, r.approve("default", "x", hold_id=state.hold_id - 1), "stale approval")
        await r.approve("default", "alice", hold_id=state.hold_id)
        await refused(rig, r.approve("default", "bob"), "already approved by alice")
        await r.pause("default", "test")
        await refused(rig, r.approve("default", "bob"), "already approved")
        await r.resume("default", "test")  # a new hold at the same step: its own approval
        resumed = await r.get("default")
        assert resumed is not None and resumed.awaiting_approval and resumed.percentage == 25
        await r.pause("default", "test")
        await refused(rig, r.approve("default", "bob"), "paused at 25%; resume it first")
        await r.abort("default", "test")
        await refused(rig, r.approve("default", "bob"), "nothing to approve")

    run(redis_url, body)


def test_the_automatic_rollback_stays_armed_during_an_approval_hold(redis_url: str) -> None:
    """Flagger #1801: a hold must not disarm the checks. v2 fails while awaiting approval."""

    async def body(rig: Rig) -> None:
        await at_hold(rig)
        for _ in range(4):
            await rig.second(v2_errors=30)
        state = await rig.rollouts.get("default")
        assert state is not None and state.state == ROLLED_BACK
        assert await rig.split() == "0"
        decision = json.loads(await rig.redis.get(records.decision_key(rig.keys, "default")))
        assert decision["rollout_step"] == 25 and decision["failed_check"] == "error_rate"

    run(redis_url, body)


def test_an_approved_hold_also_rolls_back_on_failure(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        await at_hold(rig)
        await rig.rollouts.approve("default", "alice")
        for _ in range(4):
            await rig.second(v2_errors=30, v2=40)
        state = await rig.rollouts.get("default")
        assert state is not None and state.state == ROLLED_BACK and await rig.split() == "0"

    run(redis_url, body, step_interval_seconds=60)


def test_across_a_change_of_leader_held_then_approved_once_never_skipped(redis_url: str) -> None:
    """Leader A brings the rollout to the hold and dies; B holds it too. The approval arrives; A,
    deposed while deciding to step, cannot write; B takes the step once: 25 -> 50, nothing skipped."""

    async def body(rig: Rig) -> None:
        await at_hold(rig)
        a = rig.controller
        await rig.redis.delete(records.leader_key(rig.keys))  # A dies; its lock expires
        b = rig.new_controller("leader-b")
        for _ in range(6):
            await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None and state.percentage == 25 and state.awaiting_approval
        assert (await rig.verdict())["leader"] == "leader-b"

        await rig.rollouts.approve("default", "alice")
        # A comes back and leads again, judges the step due; while it decides, B takes over
        await rig.redis.delete(records.leader_key(rig.keys))
        assert await a.keep_lock()
        taken: list[bool] = []

        async def take_over(name: str, group: str) -> None:
            if not taken:
                taken.append(True)
                await rig.redis.delete(records.leader_key(rig.keys))
                assert await b.keep_lock()

        a.race_hook = take_over
        rig.traffic(50, 50)
        await rig.flusher.tick()
        rig.clock.advance(1)
        await a.tick()
        assert taken
        state = await rig.rollouts.get("default")
        assert state is not None and state.percentage == 25  # A's advance was fenced out
        for _ in range(3):
            await rig.second()  # B
            state = await rig.rollouts.get("default")
            assert state is not None
            if state.percentage != 25:
                break
        assert state.percentage == 50
        history = list(reversed(await rig.rollouts.history("default", 100)))
        steps = [
            (h["from"]["percentage"], h["to"]["percentage"])
            for h in history
            if h["action"] == "step_advanced"
        ]
        assert steps[:2] == [(10, 25), (25, 50)]
        assert [h["action"] for h in history].count("approved") == 1
        assert next(h for h in history if h["to"]["percentage"] == 50)["by"] == "leader leader-b"

    run(redis_url, body)


def test_old_states_without_approval_fields_still_load(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        old = {
            "group": "default", "state": "progressing", "steps": [10, 100], "index": 0,
            "interval_seconds": 5, "started_at": 1, "step_started_at": 1, "updated_at": 1,
            "seq": 1, "last": {}, "override": None, "hold_id": 1, "percentage": 10,
        }  # fmt: skip
        await rig.redis.set(rig.rollouts.key("default"), json.dumps(old))
        state = await rig.rollouts.get("default")
        assert state is not None and state.approval_steps == [] and not state.awaiting_approval

    run(redis_url, body)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("10,25!!,100", "'25!!' must be a number, or a number followed by one '!'"),
        ("10,!25,100", "'!25' must be a number"),
        ("10,25,100!", "100 cannot be an approval step"),
        ("10,abc!,100", "'abc!' must be a number"),
        ("10,nan!,100", "finite"),
        ("10,!,100", "'!' must be a number"),
        ("25!,10,100", "increase strictly"),
        ("1," + "9" * 5000 + "!", "must be a number"),
    ],
)
def test_hostile_ladders_are_one_line_refusals(text: str, words: str) -> None:
    with pytest.raises(RolloutError) as caught:
        parse_steps(text)
    assert words in str(caught.value) and "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_ladders_parse_marks() -> None:
    assert parse_steps("1, 5 ,25!,50!, 100") == ([1, 5, 25, 50, 100], [25, 50])
    assert parse_steps([1, "25 !", 100]) == ([1, 25, 100], [25])
    assert parse_steps("10,100") == ([10, 100], [])


def test_a_rollout_can_start_on_an_approval_step(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        state = await rig.rollouts.start("default", [5, 100], 1, "test", [5])
        assert state.awaiting_approval and state.state == PROGRESSING
        for _ in range(4):
            await rig.second()
        assert await rig.split() == "5"
        await rig.rollouts.approve("default", "x")
        await rig.second()
        assert await rig.split() == "100"
        refused = Rollouts(rig.redis, rig.keys)
        with pytest.raises(RolloutError, match="not on the ladder"):
            await refused.start("other", [5, 100], 1, "t", [7])
        # the same write queued both; the courier sends the warning first
        assert sorted(rig.notifier.kinds()[:2]) == ["awaiting_approval", "started"]

    run(redis_url, body)


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"approval_steps": "25"}, "approval_steps"),
        ({"approval_steps": [None]}, "approval_steps.0"),
        ({"approval": "yes"}, "approval"),
        ({"approval": {"hold_id": "x", "step": 25, "by": "a", "at": 1}}, "approval.hold_id"),
        ({"approval": {"hold_id": 1, "step": 25, "by": ["a"], "at": 1}}, "approval.by"),
        ({"approval": {"hold_id": 1}}, "approval.step"),
    ],
)
def test_a_garbage_approval_in_redis_is_one_line_naming_the_field(
    fields: dict[str, object], where: str
) -> None:
    from proxy.canary.rollout import RolloutState

    state = RolloutState("default", "progressing", [25.0, 100.0], 0, 5.0, 1.0, 1.0, 1.0).as_dict()
    with pytest.raises(ValueError) as caught:
        RolloutState.from_json(json.dumps({**state, **fields}))
    assert f"rollout state in Redis is not valid: {where}" in str(caught.value)
    assert "\n" not in str(caught.value)
