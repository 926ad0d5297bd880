"""``proxy.app:app`` under another ASGI server (uvicorn here) runs the same forwarding core."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Backend, asgi_adapter, free_port


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


def test_a_bad_config_under_uvicorn_is_one_line_and_the_server_refuses_to_start(
    redis_url: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("shadow:\n  enabeld: true\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
    env.update({"STRANGLER_CONFIG": str(bad), "STRANGLER_REDIS_URL": redis_url})
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "proxy.app:app", "--port", str(free_port())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr  # uvicorn's "startup failed"
    assert "Traceback" not in done.stderr
    expected = f"ERROR:    strangler: {bad}:2:3: shadow.enabeld: unknown key; did you mean 'enabled'?"
    assert expected in done.stderr.splitlines(), done.stderr
