"""The canary status view (CLI ``rollout status``/``watch``/``status``, the admin API): per group the
split, the rollout, the last verdict and decision, plus who leads and whether Redis lost its data.

Its own module so that ``records`` (key names, a leaf) and ``rollout`` (which writes those keys) do
not import each other: this view needs both and sits above them.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from proxy.canary import records
from proxy.canary.rollout import RolloutState
from proxy.control.keys import Keys


async def read_status(redis: aioredis.Redis, keys: Keys, groups: list[str]) -> dict[str, Any]:
    """Per group: split (raw), rollout, last verdict, last decision; plus who leads and whether
    Redis lost its data."""
    columns = [
        [keys.split(g) for g in groups], [keys.rollout(g) for g in groups],
        [records.verdict_key(keys, g) for g in groups], [records.decision_key(keys, g) for g in groups],
    ]  # fmt: skip
    async with redis.pipeline(transaction=False) as pipe:
        for column in columns:
            for key in column:  # GETs, not MGET: cluster pipelines refuse MGET
                pipe.get(key)
        pipe.get(records.leader_key(keys))
        pipe.get(records.lost_key(keys))
        results = await pipe.execute()
    n = len(groups)
    splits, rollouts, verdicts, decisions = (results[i * n : (i + 1) * n] for i in range(4))
    leader, lost = results[4 * n], results[4 * n + 1]
    out: dict[str, Any] = {
        "leader": leader.decode() if isinstance(leader, bytes) else leader,
        "state_lost": records.load(lost),
        "groups": {},
    }
    for i, group in enumerate(groups):
        raw_split = splits[i].decode() if isinstance(splits[i], bytes) else splits[i]
        rollout = RolloutState.from_json(rollouts[i]).as_dict() if rollouts[i] else None
        out["groups"][group] = {
            "split_raw": raw_split,
            "rollout": rollout,
            "verdict": records.load(verdicts[i]),
            "decision": records.load(decisions[i]),
            "state_lost": out["state_lost"],
        }
    return out
