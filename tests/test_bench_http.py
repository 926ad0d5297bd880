"""``strangler bench``: the HTTP table runs end to end against each kind of backend, and the
nginx backend (the issue's layout) answers the ~300-byte JSON through the proxy."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import pytest

from proxy.bench import NGINX_BODY, bench, nginx_binary, render, start_backend, stop

pytestmark = pytest.mark.soak  # pinned load for seconds: the long suite, one test at a time


@pytest.mark.parametrize("backend", ["python", "nginx"])
def test_the_http_bench_measures_direct_and_strangler_without_errors(backend: str) -> None:
    if backend == "nginx" and nginx_binary() is None:
        pytest.skip("nginx is not installed (scripts/test installs nginx-light as root on Debian)")
    results = bench(connections=4, seconds=1, rounds=1, warmup=1, paced_rate=0, backend=backend)
    names = [r.name for r in results]
    assert names == ["direct (backend v1)", "strangler (1 worker, split 10%, metrics on)"]
    for result in results:
        assert result.errors == 0 and result.rps > 0, result
        assert result.cpu_us is not None and result.cpu_us > 0
    assert "strangler/this" in render(results, 4, 1, "test", 1)


def test_the_nginx_backend_answers_its_json_with_keep_alive() -> None:
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (scripts/test installs nginx-light as root on Debian)")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_backend("v2", "nginx", Path(tmp))
        try:
            with httpx.Client() as client:
                for _ in range(3):
                    answer = client.get(url + "/items/42")
                    assert answer.status_code == 200
                    assert answer.json()["version"] == "v2"
                    assert answer.headers["content-type"] == "application/json"
            assert len(NGINX_BODY) >= 290
        finally:
            stop(proc)
