"""Races between the leader and people, landed deterministically.

Two hooks put the competing write at an exact moment: ``Rollouts.race_hook`` between a
transaction's read (under WATCH) and its write, and ``CanaryController.race_hook`` between a check's
reads and its action (the wider window, where the leader acts on what it read earlier). The
competing write goes through a second connection, as another process's would. Each race runs 50
times against the real Redis, in-process with an injected clock.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from proxy.canary import records
from proxy.canary.rollout import PAUSED, PROGRESSING, ROLLED_BACK, Rollouts
from proxy.control.client import ControlClient
from tests.canary.test_loop import Rig, run

ITERATIONS = 50
Race = Callable[[Rollouts, ControlClient], Awaitable[object]]


class Operator:
    """A person at another terminal: their own connection, our real tools."""

    def __init__(self, rig: Rig) -> None:
        self.redis = aioredis.Redis.from_url(rig.settings.redis_url or "")
        self.rollouts = Rollouts(self.redis, rig.keys, rig.clock)
        self.control = ControlClient(self.redis, rig.keys, self.rollouts.manual_split)


async def due_rollout(rig: Rig, steps: list[float] | None = None) -> None:
    """A fresh Redis, a rollout at its first step, one passing second short of advancing."""
    await rig.redis.flushdb()
    rig.new_controller()
    await rig.rollouts.start("default", steps or [10, 50, 100], 2, "test")
    await rig.second()  # the start's own second is not judged
    await rig.second()  # 1 s judged of 2


def race_at(rig: Rig, where: str, action: str, race: Race, op: Operator) -> list[bool]:
    """Arm ``race`` to run once at ``where`` ("rollout" hook or "controller" hook) for ``action``."""
    fired: list[bool] = []

    async def hook(name: str, group: str) -> None:
        if name == action and not fired:
            fired.append(True)
            await race(op.rollouts, op.control)

    if where == "rollout":
        rig.rollouts.race_hook = hook
    else:
        rig.controller.race_hook = hook
    return fired


def disarm(rig: Rig) -> None:
    rig.rollouts.race_hook = None
    rig.controller.race_hook = None


async def rollbacks_alerted(rig: Rig) -> int:
    return [e.kind for e in rig.notifier.events].count("rolled_back")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["rollout", "controller"])
@pytest.mark.parametrize("value", [0, 30])
def test_a_manual_set_during_the_leaders_advance_always_wins(redis_url: str, where: str, value: int) -> None:
    """Item 1: `strangler set`/`rollback` landing while the leader promotes is never undone."""

    async def body(rig: Rig) -> None:
        op = Operator(rig)
        for _ in range(ITERATIONS):
            await due_rollout(rig)
            fired = race_at(
                rig,
                where,
                "advance" if where == "rollout" else "decided",
                lambda r, c: c.set_split(value),
                op,
            )
            await rig.second()  # the leader advances now: the manual write lands inside it
            disarm(rig)
            assert fired
            for _ in range(4):  # and later ticks never raise it again
                await rig.second()
            state = await rig.rollouts.get("default")
            assert state is not None and await rig.split() == f"{value:g}"
            assert (state.state, state.percentage) == ((ROLLED_BACK, 0) if value == 0 else (PAUSED, value))
            assert state.last["by"] == "operator"
        await op.redis.aclose()

    run(redis_url, body)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["rollout", "controller"])
def test_pause_during_the_check_is_honoured(redis_url: str, where: str) -> None:
    """Item 2: a pause that lands after the leader read the state stops the advance."""

    async def body(rig: Rig) -> None:
        op = Operator(rig)
        for _ in range(ITERATIONS):
            await due_rollout(rig)
            action = "advance" if where == "rollout" else "decided"
            fired = race_at(rig, where, action, lambda r, c: r.pause("default", "op"), op)
            for _ in range(5):
                await rig.second()
            disarm(rig)
            assert fired
            state = await rig.rollouts.get("default")
            assert state is not None and (state.state, state.percentage) == (PAUSED, 10)
            assert await rig.split() == "10"
        await op.redis.aclose()

    run(redis_url, body)


@pytest.mark.slow
@pytest.mark.parametrize("action", ["promote", "resume_after_pause"])
def test_a_promote_during_the_automatic_rollback_never_raises_traffic(redis_url: str, action: str) -> None:
    """Item 4: rollback wins over every concurrent action; one rollback, one critical alert."""

    async def body(rig: Rig) -> None:
        op = Operator(rig)
        for _ in range(ITERATIONS):
            await rig.redis.flushdb()
            rig.notifier.events.clear()
            rig.new_controller()
            await rig.rollouts.start("default", [30, 50, 100], 3600, "test")
            if action == "resume_after_pause":
                await rig.rollouts.pause("default", "op")

            async def race(r: Rollouts, c: ControlClient) -> object:
                if action == "promote":
                    return await r.promote("default", "op")
                return await r.resume("default", "op")

            await rig.second()
            fired = race_at(rig, "rollout", "rollback", race, op)
            for _ in range(4):
                await rig.second(v2_errors=20)
            disarm(rig)
            assert fired
            state = await rig.rollouts.get("default")
            assert state is not None and (state.state, state.percentage) == (ROLLED_BACK, 0)
            assert await rig.split() == "0"
            decision = json.loads(await rig.redis.get(records.decision_key(rig.keys, "default")))
            assert decision["from_percentage"] == 30  # judged at 30%, the promote did not count
            assert await rollbacks_alerted(rig) == 1
            with pytest.raises(Exception, match="rolled_back"):
                await op.rollouts.promote("default", "op")  # and it stays rolled back
        await op.redis.aclose()

    run(redis_url, body, step_interval_seconds=3600)


@pytest.mark.slow
def test_a_manual_promote_during_the_leaders_check_advances_one_step(redis_url: str) -> None:
    """Item 5: each step is entered once and held for its full judged interval."""

    async def body(rig: Rig) -> None:
        op = Operator(rig)
        for _ in range(ITERATIONS):
            await due_rollout(rig, [10, 25, 50, 100])
            fired = race_at(rig, "controller", "decided", lambda r, c: r.promote("default", "op"), op)
            await rig.second()
            disarm(rig)
            assert fired
            state = await rig.rollouts.get("default")
            assert state is not None and state.percentage == 25 and await rig.split() == "25"
            await rig.second()  # 1 s into the 25% step: not held long enough
            state = await rig.rollouts.get("default")
            assert state is not None and state.percentage == 25
            await rig.second()
            await rig.second()
            state = await rig.rollouts.get("default")
            assert state is not None and state.percentage == 50
            history = await rig.rollouts.history("default", 10)
            assert [h["to"]["percentage"] for h in reversed(history)] == [10, 25, 50]
        await op.redis.aclose()

    run(redis_url, body)


@pytest.mark.slow
def test_a_deposed_leader_never_acts_on_what_it_judged(redis_url: str) -> None:
    """Item 9: ownership is checked in the same transaction as the write."""

    async def body(rig: Rig) -> None:
        op = Operator(rig)

        async def steal(r: Rollouts, c: ControlClient) -> object:
            return await op.redis.set(records.leader_key(rig.keys), "someone-else", px=60_000)

        for i in range(ITERATIONS):
            await due_rollout(rig)
            action = "advance" if i % 2 else "rollback"
            if action == "rollback":
                await rig.second(v2_errors=20)
                await rig.second(v2_errors=20)
            fired = race_at(rig, "rollout", action, steal, op)
            await rig.second(v2_errors=20 if action == "rollback" else 0)
            disarm(rig)
            assert fired
            state = await rig.rollouts.get("default")
            assert state is not None and (state.state, state.percentage) == (PROGRESSING, 10)
            assert await rig.split() == "10"
            assert await op.redis.get(records.decision_key(rig.keys, "default")) is None
        await op.redis.aclose()

    run(redis_url, body)
