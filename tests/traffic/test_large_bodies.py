"""200 MB up and down through the proxy without holding it in memory (peak RSS, not a snapshot)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Backend, ProxyProcess, RedisServer

MB = 1024 * 1024


@pytest.fixture(scope="module")
def shared_proxy(
    workdir: Path, backends: tuple[Backend, Backend], redis_server: RedisServer
) -> Iterator[ProxyProcess]:
    """Its own process, unlike the folder's shared proxy: its peak memory is measured."""
    v1, v2 = backends
    settings = {"v1_url": v1.url, "v2_url": v2.url, "redis_url": redis_server.url, "log_level": "warning",
                "key_prefix": "large-bodies:", "split_key": "large-bodies:split"}  # fmt: skip
    proxy = ProxyProcess(workdir / "proxies", settings).start()
    yield proxy
    proxy.stop()


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_200mb_upload_and_download_stream_through(shared_proxy: ProxyProcess) -> None:
    assert shared_proxy.process is not None
    pid = shared_proxy.worker_pid()  # the worker: the parent only holds the sockets
    for _ in range(20):  # warm up pools and buffers before the baseline
        httpx.post(shared_proxy.url + "/upload", content=b"w" * 200_000)
    baseline = peak_rss(pid)

    block = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        for _ in range(200):
            digest.update(block)
            yield block

    response = httpx.post(
        shared_proxy.url + "/upload", content=body(), headers={"Content-Length": str(200 * MB)}, timeout=120
    )
    assert response.status_code == 200
    assert response.json()["length"] == 200 * MB
    assert response.json()["sha256"] == digest.hexdigest()

    received = 0
    with httpx.stream("GET", shared_proxy.url + f"/stream?bytes={200 * MB}&sized=1", timeout=120) as down:
        assert down.status_code == 200
        assert down.headers["content-length"] == str(200 * MB)
        for part in down.iter_raw():
            received += len(part)
    assert received == 200 * MB

    growth = peak_rss(pid) - baseline
    assert growth < 50 * MB, f"proxy peak RSS grew by {growth / MB:.1f} MB"
