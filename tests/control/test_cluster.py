"""Proxies on a 3-master Redis Cluster: every control write (transactions, Lua, MGET) stays in one
slot, the seed's plain split key still works, change messages reach every proxy, and the canary's
fenced leader actions run unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from redis.crc import key_slot

from proxy.canary import records
from proxy.canary.leader import LeaderLock
from proxy.canary.rollout import Rollouts
from proxy.control.client import ControlClient
from proxy.control.connect import connect
from proxy.control.keys import Keys
from tests.ha import ClusterSetup
from tests.support import Backend, ProxyProcess, wait_until

pytestmark = [pytest.mark.failover, pytest.mark.slow, pytest.mark.timeout(180)]
KEYS = Keys(cluster=True)
OTHER = Keys(prefix="clustertest:", cluster=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    setup = ClusterSetup(tmp_path_factory.mktemp("cluster")).start()
    yield setup
    setup.stop()


def served(proxy: ProxyProcess) -> str:
    answer = httpx.get(proxy.url + "/t", headers={"X-User-ID": "u-1"}, timeout=5)
    assert answer.status_code == 200
    return answer.headers["x-api-version"]


def test_all_control_keys_share_one_slot_and_the_seed_key_stays_plain() -> None:
    names = [
        KEYS.split(), KEYS.split("checkout"), KEYS.changes_channel, KEYS.epoch, KEYS.under("rollout", "x"),
        records.leader_key(KEYS), records.since_key(KEYS, "x"), KEYS.hash("shadow"),
        OTHER.under("rollout", "x"),
    ]  # fmt: skip
    slots = {key_slot(name.encode()) for name in names}
    assert KEYS.split() == "feature:v2_traffic_percentage"
    assert len(slots) == 1, dict(zip(names, slots, strict=False))


def test_proxies_on_a_cluster_follow_changes_and_the_leader_writes_without_crossslot(
    cluster: ClusterSetup, proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend],
    tmp_path: Path,
) -> None:  # fmt: skip
    v1, v2 = v1v2
    proxies = [proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=cluster.url) for _ in range(2)]

    async def drive() -> dict[str, object]:
        client = connect(cluster.url, 2)
        try:
            rollouts = Rollouts(client, KEYS)
            control = ControlClient(client, KEYS, rollouts.manual_split)
            await control.set_split(100)  # WATCH/MULTI over state, split and history keys
            await asyncio.to_thread(
                wait_until, lambda: all(served(p) == "v2" for p in proxies), 10, 0.05, "set 100 never arrived"
            )
            await control.set_split(0)
            # the proxies' own canary leader holds strangler:'s lock: this rollout lives under another
            # prefix (same split key, same slot), so the test's leader is the only one there
            rollouts = Rollouts(client, OTHER)
            await rollouts.start("default", [10, 100], 1, "test")
            lock = LeaderLock(client, records.leader_key(OTHER), 30, "cluster-leader")
            assert await lock.ensure()  # Lua over the lock and its fencing counter
            state = await rollouts.get("default")
            assert state is not None
            advanced = await rollouts.advance("default", state.seq, lock.token(), {"verdict": "pass"})
            assert advanced is not None and advanced.percentage == 100
            listeners = [node.client().pubsub() for node in cluster.nodes]  # one on every master
            for listener in listeners:
                listener.subscribe(KEYS.changes_channel)
                assert listener.get_message(timeout=2)["type"] == "subscribe"
            changed = await control.rollback(None, ["default"])  # SCAN on every master, then writes
            for listener in listeners:  # the change message, published once, reached every node
                message = listener.get_message(timeout=2)
                assert message is not None and message["data"].startswith(b"split:"), message
                listener.close()
            numsub = 0
            for node in cluster.nodes:
                reply = node.client().pubsub_numsub(KEYS.changes_channel)
                numsub += int(reply[0][1])
            return {"changed": changed, "subscribers": numsub}
        finally:
            await client.aclose()

    result = asyncio.run(drive())
    assert result["subscribers"] >= 2  # each proxy subscribed (on whichever node it picked)
    wait_until(lambda: all(served(p) == "v1" for p in proxies), timeout=10, message="rollback never arrived")
    # the seed's plain key, written by hand (no publish): picked up by the poll
    seed = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    seed.set("feature:v2_traffic_percentage", "100")
    seed.close()
    wait_until(lambda: all(served(p) == "v2" for p in proxies), timeout=10, message="plain key ignored")
    for proxy in proxies:
        ready = httpx.get(proxy.admin + "/ready", timeout=5).json()
        assert ready["redis_ok"] is True
        for trouble in ("CROSSSLOT", "cluster mode", "Traceback", "ERROR"):
            assert trouble not in proxy.output(), proxy.output()[-3000:]
