#!/usr/bin/env python3
"""How fast a split change reaches a running proxy, for both paths (publish and plain poll).

Starts a redis-server, two test backends and a proxy (real processes, as the tests do), then
flips the split 5 times each way and prints milliseconds until the proxy answers from the other
version. Usage: .venv/bin/python scripts/split_latency.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import Backend, ProxyProcess, RedisServer  # noqa: E402


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="strangler-latency-"))
    redis = RedisServer(tmp / "redis").start()
    v1, v2 = Backend("v1", tmp).start(), Backend("v2", tmp).start()
    settings = {"v1_url": v1.url, "v2_url": v2.url, "redis_url": redis.url, "log_level": "warning"}
    proxy = ProxyProcess(tmp, settings).start()
    client = redis.client()

    def until(version: str) -> float:
        start = time.perf_counter()
        with httpx.Client() as http:
            while http.get(proxy.url + "/").headers["x-api-version"] != version:
                time.sleep(0.002)
        return (time.perf_counter() - start) * 1000

    published, polled = [], []
    try:
        for _ in range(5):
            cli = [sys.executable, "-m", "proxy.cli", "set", "100", "--redis-url", redis.url]
            subprocess.run(cli, check=True, capture_output=True, cwd=ROOT)
            published.append(until("v2"))
            client.set("feature:v2_traffic_percentage", "0")  # no publish: only the poll sees it
            polled.append(until("v1"))
    finally:
        proxy.stop()
        v1.stop()
        v2.stop()
        redis.stop()
    print("after `strangler set` returned (ms):", [round(x) for x in published])
    print("after a plain redis SET (ms):      ", [round(x) for x in polled])


if __name__ == "__main__":
    main()
