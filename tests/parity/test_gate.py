"""A rollout step does not advance while a configured table is out of parity, and a parity
difference reaches the notifiers through the canary outbox (leader loop driven by tick())."""

from __future__ import annotations

from proxy.parity.report import TableResult
from proxy.parity.store import read_last_results, store_results
from tests.canary.test_loop import Rig, run


def test_rollout_waits_for_parity_and_differences_are_alerted(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", [10, 50, 100], 2, "test")
        for _ in range(4):
            await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None and state.percentage == 10  # never checked: held
        assert (await rig.verdict())["parity_hold"] == ["orders"]

        different = TableResult("orders", "different", source_rows=10, target_rows=9, missing=1)
        await store_results(rig.redis, rig.keys, [different, TableResult("users")], "sql")
        for _ in range(4):
            await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None and state.percentage == 10
        assert "parity_different" in rig.notifier.kinds()
        [alert] = [e for e in rig.notifier.events if e.kind == "parity_different"]
        assert alert.group == "orders" and "1 missing" in alert.message

        await store_results(rig.redis, rig.keys, [TableResult("orders", "equal")], "sql")
        await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None and state.percentage == 50  # the step was due: it goes at once
        assert "parity_hold" not in await rig.verdict()
        last = await read_last_results(rig.redis, rig.keys)
        assert last["orders"]["status"] == "equal" and last["users"]["status"] == "equal"

    run(redis_url, body, parity_tables=["orders"])


def test_without_configured_tables_parity_does_not_gate(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", [10, 100], 2, "test")
        await store_results(rig.redis, rig.keys, [TableResult("orders", "different", changed=1)], "sql")
        for _ in range(4):
            await rig.second()
        state = await rig.rollouts.get("default")
        assert state is not None and state.percentage == 100

    run(redis_url, body)
