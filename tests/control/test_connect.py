"""redis_url forms: plain, Sentinel and Cluster URLs parsed into their parts; bad ones refused."""

from __future__ import annotations

import pytest

from proxy.redis_url import CLUSTER, PLAIN, SENTINEL, describe, parse
from proxy.settings import Settings


def test_sentinel_url_gives_nodes_db_master_and_credentials() -> None:
    target = parse(
        "redis+sentinel://app:s%40cret@10.0.0.1:26379,sentinel-b:26380/2/mymaster?sentinel_password=x"
    )
    assert target.kind == SENTINEL
    assert target.nodes == [("10.0.0.1", 26379), ("sentinel-b", 26380)]
    assert (target.db, target.master, target.username, target.password) == (2, "mymaster", "app", "s@cret")
    assert target.sentinel_password == "x"


def test_cluster_url_gives_startup_nodes() -> None:
    target = parse("redis+cluster://:pw@a:7000,b:7001")
    assert target.kind == CLUSTER and target.nodes == [("a", 7000), ("b", 7001)] and target.password == "pw"


def test_plain_urls_are_left_to_redis_py() -> None:
    assert parse("redis://localhost:6379/0").kind == PLAIN
    assert parse("unix:///tmp/redis.sock").kind == PLAIN


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://a:26379/mymaster", "give the database and the master name"),
        ("redis+sentinel://a/0/mymaster", "is not host:port"),
        ("redis+cluster://a:7000/0", "a cluster has no database"),
        ("redis+cluster://a:x", "is not host:port"),
    ],
)
def test_malformed_ha_urls_are_config_errors_with_the_expected_form(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Settings(redis_url=url)


def test_described_urls_carry_no_password() -> None:
    assert describe("redis+sentinel://u:secret@a:1,b:2/0/m") == "redis+sentinel://a:1,b:2/0/m"
    assert "secret" not in describe("redis://:secret@h:6379/0")
