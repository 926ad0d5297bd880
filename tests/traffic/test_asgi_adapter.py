"""``proxy.app:app`` under another ASGI server (uvicorn here) runs the same forwarding core."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Backend, free_port, wait_until


@pytest.fixture()
def adapter(v1v2: tuple[Backend, Backend], redis_url: str, tmp_path: Path) -> Iterator[str]:
    v1, v2 = v1v2
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
    env.update({"STRANGLER_V1_URL": v1.url, "STRANGLER_V2_URL": v2.url, "STRANGLER_REDIS_URL": redis_url,
                "STRANGLER_SPLIT_KEY": "asgi:split", "STRANGLER_KEY_PREFIX": "asgi:"})  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "proxy.app:app", "--port", str(port), "--log-level", "warning"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/_strangler/health", timeout=1).status_code == 200, timeout=20)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def test_the_asgi_adapter_forwards_splits_and_guards_the_admin_api(adapter: str) -> None:
    answer = httpx.get(adapter + "/echo?x=1", timeout=5)
    assert answer.status_code == 200 and answer.headers["x-api-version"] == "v1"
    forced = httpx.get(adapter + "/echo", headers={"X-Strangler-Version": "v2"}, timeout=5)
    assert forced.headers["x-api-version"] == "v2"
    assert httpx.get(adapter + "/echo", headers={"X-Strangler-Version": "v3"}, timeout=5).status_code == 400
    # changes need the token here too
    assert httpx.put(adapter + "/_strangler/split", json={"percentage": 5}, timeout=5).status_code == 401
    assert httpx.get(adapter + "/_strangler/status", timeout=5).status_code == 200
