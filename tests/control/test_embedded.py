"""The embedded default: no Redis configured -> a private redis-server whose data survives a restart."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.clirun import strangler
from tests.support import Backend, ProxyProcess, wait_until


def test_embedded_redis_prints_its_url_and_keeps_the_split_across_restarts(
    tmp_path: Path, v1v2: tuple[Backend, Backend]
) -> None:
    v1, v2 = v1v2
    settings = {"v1_url": v1.url, "v2_url": v2.url, "log_level": "warning"}
    proxy = ProxyProcess(tmp_path, dict(settings)).start()
    try:
        url = wait_until(
            lambda: re.search(r"embedded Redis at (redis://\S+)", proxy.output()), timeout=5
        ).group(1)
        assert (tmp_path / ".strangler/redis/redis.url").read_text().split()[0] == url
        result = strangler("set", "100", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: httpx.get(proxy.url + "/").headers["x-api-version"] == "v2", timeout=2)
    finally:
        proxy.stop()
    assert not (tmp_path / ".strangler/redis/redis.url").exists()  # stopped with the proxy

    again = ProxyProcess(tmp_path, dict(settings)).start()
    try:
        assert httpx.get(again.url + "/").headers["x-api-version"] == "v2"
    finally:
        again.stop()
