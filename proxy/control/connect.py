"""One place that turns ``redis_url`` into a client: plain Redis, Sentinel, or Cluster.

- ``redis://`` / ``rediss://`` / ``unix://``: ``Redis.from_url``.
- ``redis+sentinel://[user:pass@]host1:26379,host2:26379/<db>/<master-name>`` (the grammar
  python-socketio and redisvl use): ``Sentinel(...).master_for(master)``. Every new connection asks
  the sentinels where the master is, so after a failover the next command (and the pub/sub loop's
  next subscribe) reaches the new master. The credentials are the master's; sentinels that need
  their own password take ``?sentinel_password=...``.
- ``redis+cluster://host:port[,host:port]``: ``RedisCluster``. Our multi-key operations stay in one
  slot because :func:`cluster_keys` puts every control key under one hash tag.

The URL grammar and its parser are in ``proxy/redis_url.py``.
"""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

from proxy.redis_url import CLUSTER, SENTINEL, parse


def connect(url: str, timeout: float, **options: Any) -> aioredis.Redis:
    """A client for ``url``; ``options`` go to every connection (e.g. ``health_check_interval``)."""
    target = parse(url)
    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout, **options}
    if target.kind == SENTINEL:
        sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        if target.sentinel_password:
            sentinel_kwargs["password"] = target.sentinel_password
        sentinel = Sentinel(target.nodes, sentinel_kwargs=sentinel_kwargs, **common)
        return sentinel.master_for(
            target.master, db=target.db, username=target.username, password=target.password
        )
    if target.kind == CLUSTER:
        common.pop("health_check_interval", None)
        common.pop("retry_on_timeout", None)
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            username=target.username, password=target.password, **common,
        )  # fmt: skip
        return cast(aioredis.Redis, cluster)  # the commands we use have the same signatures
    return aioredis.Redis.from_url(url, **common)
