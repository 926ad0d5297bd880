"""The statistical judge in the leader loop: ``tick()`` with an injected clock, real Redis, the real
recorder and flusher (the rig of test_loop.py)."""

from __future__ import annotations

import json
import logging
from typing import Any

import jsonschema
import pytest

from proxy.canary import records
from proxy.canary.rollout import ROLLED_BACK
from tests.canary.test_loop import Rig, run
from tests.support import ROOT


def check_schema(statistics: dict[str, Any]) -> None:
    """The verdict's and decision's ``statistics`` as the status views' schemas describe them."""
    for view in ("status", "rollout-status"):
        defs = json.loads((ROOT / "docs" / "schemas" / f"{view}.json").read_text())["$defs"]
        schema = {"$defs": defs, "$ref": "#/$defs/statistics"}
        jsonschema.validate(statistics, schema, cls=jsonschema.Draft202012Validator)


STATISTICAL = {"default": {"judge": "statistical", "min_requests": 20, "max_error_rate": 0.9}}


def test_the_tally_counts_every_second_once_and_a_new_leader_carries_it_on(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        await rig.control.set_split(20)
        for _ in range(6):
            await rig.second(v1=40, v2=10)
        first = (await rig.verdict())["tally"]
        await rig.redis.delete(records.leader_key(rig.keys))  # the leader died; its lock expired
        rig.new_controller("another")  # nothing in memory: only the record in Redis
        for _ in range(6):
            await rig.second(v1=40, v2=10)
        verdict = await rig.verdict()
        tally = verdict["tally"]
        assert tally["start"] == first["start"] and tally["until"] == int(rig.clock()) - 2
        # 12 seconds of traffic; a second is counted two seconds after it, when every replica's
        # flush is in: the first 11 counted, none skipped or twice across the change of leader
        assert tally["n1"] == 40 * 11 and tally["n2"] == 10 * 11
        assert verdict["statistics"]["requests"] == {"v1": tally["n1"], "v2": tally["n2"]}
        check_schema(verdict["statistics"])

    run(redis_url, body, group_thresholds=STATISTICAL)


def test_error_evidence_rolls_back_at_once_and_the_next_attempt_starts_afresh(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        await rig.rollouts.start("default", [10, 100], 3600, "test")
        await rig.second()
        await rig.second()
        failing = 0
        while await rig.split() != "0":
            failing += 1
            assert failing < 10, "no rollback"
            await rig.second(v2_errors=10)  # 20% against v1's 0%; the absolute limit is out of reach
        state = await rig.rollouts.get("default")
        assert state is not None and state.state == ROLLED_BACK
        decision = json.loads(await rig.redis.get(records.decision_key(rig.keys, "default")))
        assert decision["failed_check"] == "error_evidence" and decision["consecutive_failures"] == 1
        errors = decision["statistics"]["errors"]
        assert errors["log_lr"] >= errors["threshold"] and errors["ci95"][0] > 1
        check_schema(decision["statistics"])
        assert rig.metrics.rollbacks.labels("default", "error_evidence")._value.get() == 1
        assert rig.metrics.canary_evidence.labels("default", "errors")._value.get() >= 1
        assert "tally" not in await rig.verdict()
        for _ in range(3):  # the failing seconds are not judged again: no second rollback
            await rig.second(v2=0)
        verdict = await rig.verdict()
        assert verdict["statistics"]["requests"]["v2"] == 0 and verdict["status"] != "fail"
        assert rig.notifier.kinds().count("rolled_back") == 1

    run(redis_url, body, group_thresholds=STATISTICAL)


@pytest.mark.parametrize(
    "tally", ["garbage", [1, 2], {"start": 1, "until": 2, "ratios": [2.0], "error_log_lr": [1e300]}, None]
)
def test_a_hostile_tally_in_redis_restarts_the_count_with_one_line(
    redis_url: str, tally: object, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(rig: Rig) -> None:
        await rig.control.set_split(20)
        await rig.second()
        record = await rig.verdict()
        record["tally"] = tally
        await rig.redis.set(records.verdict_key(rig.keys, "default"), json.dumps(record))
        with caplog.at_level(logging.WARNING, "strangler.canary"):
            await rig.second()
        verdict = await rig.verdict()
        assert verdict["status"] in ("pass", "insufficient_data") and await rig.split() == "20"
        assert isinstance(verdict["tally"], dict)
        if tally is None:
            return
        assert "counting restarted" in verdict["statistics"]["note"]
        lines = [r.getMessage() for r in caplog.records if "counting restarted" in r.getMessage()]
        assert len(lines) == 1 and "\n" not in lines[0]

    run(redis_url, body, group_thresholds=STATISTICAL)
