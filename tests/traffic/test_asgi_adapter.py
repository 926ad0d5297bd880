"""``proxy.app:app`` under another ASGI server (uvicorn here) runs the same forwarding core."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Backend, asgi_adapter


@pytest.fixture()
def adapter(v1v2: tuple[Backend, Backend], redis_url: str, tmp_path: Path) -> Iterator[str]:
    v1, v2 = v1v2
    with asgi_adapter(v1.url, v2.url, redis_url, "asgi:", tmp_path) as url:
        yield url


def test_the_asgi_adapter_forwards_splits_and_guards_the_admin_api(adapter: str) -> None:
    answer = httpx.get(adapter + "/echo?x=1", timeout=5)
    assert answer.status_code == 200 and answer.headers["x-api-version"] == "v1"
    forced = httpx.get(adapter + "/echo", headers={"X-Strangler-Version": "v2"}, timeout=5)
    assert forced.headers["x-api-version"] == "v2"
    assert httpx.get(adapter + "/echo", headers={"X-Strangler-Version": "v3"}, timeout=5).status_code == 400
    # changes need the token here too
    assert httpx.put(adapter + "/_strangler/split", json={"percentage": 5}, timeout=5).status_code == 401
    assert httpx.get(adapter + "/_strangler/status", timeout=5).status_code == 200
