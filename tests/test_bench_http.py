"""``strangler bench``: the HTTP table runs end to end against each kind of backend, the nginx
backend (the issue's layout) answers the ~300-byte JSON through the proxy, ``--json`` is one
document with every figure, and a bad ``--peer`` is refused before anything starts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import httpx
import pytest

from proxy.bench import NGINX_BODY, bench, nginx_binary, render, start_backend, stop
from tests.clirun import strangler

# The tests that measure are in the long suite (pinned load for seconds, one test at a time).
measuring = pytest.mark.soak


def test_an_unknown_peer_is_one_line_before_anything_starts() -> None:
    result = strangler("bench", "--peer", "envoy,nosuch")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: --peer 'nosuch' is not a peer: use envoy, asgiproxy or a command with {port} and {upstream}"
    ]
    assert result.stdout == ""
    # nothing was started: it used to start Redis, backends and the proxy, wait 20 s, then a traceback


@measuring
def test_json_is_one_document_with_every_figure() -> None:
    result = strangler(
        "bench", "--seconds", "1", "--rounds", "1", "--connections", "4", "--backend", "python", "--json"
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # one document, no progress and no table around it
    assert document["rounds"] == 1 and document["backend"] == "python" and document["websocket"] is None
    names = [r["name"] for r in document["http"]]
    assert names == ["direct (backend v1)", "strangler (1 worker, split 10%, metrics on)"]
    for figure in document["http"]:
        assert figure["rps"] > 0 and figure["errors"] == 0 and figure["cpu_us"] > 0
        assert set(figure) >= {"p50_ms", "p99_ms", "requests"}
    assert [r["name"] for r in document["paced"]["results"]] == names


@measuring
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


@measuring
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
