"""``strangler bench --grpc`` and ``--h2-to-h1``: the HTTP/2 tables run end to end in their smallest
form (so the mode cannot rot), the nginx h2c backend answers a real grpcio client with its message
and status OK, a target answering 200 without the gRPC trailer is not measured, and a machine
without h2load is told how to install it."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from proxy.bench import envoy_binary, nginx_binary, stop
from proxy.bench_grpc import (
    DIRECT,
    GRPC_PATH,
    GRPC_REQUEST,
    H2LOAD_INSTALL,
    Backend,
    bench_h2,
    check_grpc,
    check_json,
    grpc_answer,
    h2load_binary,
    render_h2,
    start_h2_backend,
)
from tests.clirun import strangler

# Measuring tests are in the long suite, as tests/test_bench_http.py (pinned load for seconds).
measuring = pytest.mark.soak
needs_nginx = pytest.mark.skipif(
    nginx_binary() is None,
    reason="nginx is not installed (scripts/test installs nginx-light as root on Debian)",
)
needs_h2load = pytest.mark.skipif(
    h2load_binary() is None,
    reason="h2load is not installed (scripts/test installs nghttp2-client as root on Debian)",
)


@pytest.fixture
def grpc_backend() -> Iterator[Backend]:
    with tempfile.TemporaryDirectory() as tmp:
        backend = start_h2_backend("v2", Path(tmp), grpc=True)
        try:
            yield backend
        finally:
            stop(backend.proc)


@needs_nginx
def test_the_nginx_backend_answers_a_real_grpc_client(grpc_backend: Backend) -> None:
    """grpcio (not our own client) calls the fixed method: the message back, status OK from the
    trailer nginx adds."""
    with grpc.insecure_channel(f"127.0.0.1:{grpc_backend.h2_port}") as channel:
        call = channel.unary_unary(GRPC_PATH)  # bytes in, bytes out: no generated code
        for _ in range(3):  # one connection, several streams
            message, outcome = call.with_call(GRPC_REQUEST[5:], timeout=5)
            assert message == grpc_answer("v2")[5:]
            assert outcome.code() == grpc.StatusCode.OK
    assert check_grpc(grpc_backend.h2_port) is None


@needs_nginx
def test_a_target_answering_without_the_grpc_trailer_is_not_measured() -> None:
    """The h2-to-h1 backend's h2c port answers 200 with JSON: as a gRPC target it fails the check
    (it would otherwise count as fast), and as a JSON target it passes."""
    with tempfile.TemporaryDirectory() as tmp:
        backend = start_h2_backend("v1", Path(tmp), grpc=False)
        try:
            problem = check_grpc(backend.h2_port)
            assert problem is not None and "application/json" in problem
            assert check_json(backend.h2_port) is None
            assert check_json(backend.h1_port) is not None  # HTTP/1.1 only: no HTTP/2 answer
        finally:
            stop(backend.proc)


def test_without_h2load_the_bench_says_how_to_install_it() -> None:
    result = strangler("bench", "--grpc", "--no-http", env={"PATH": "/nonexistent"})
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: {H2LOAD_INSTALL}"]


@measuring
@needs_nginx
@needs_h2load
@pytest.mark.parametrize("grpc_mode", [True, False], ids=["grpc", "h2-to-h1"])
def test_the_h2_bench_measures_every_target_without_errors(grpc_mode: bool) -> None:
    with_envoy = envoy_binary() is not None  # the bench extra; CI installs the test extra only
    results = bench_h2(grpc_mode, connections=2, streams=2, seconds=1, rounds=1, warmup=0.5, envoy=with_envoy)
    names = [r.name for r in results]
    assert names[0] == DIRECT and names[1].startswith("strangler (1 worker, h2")
    assert len(names) == 3 if with_envoy else 2
    for result in results:
        assert result.note == "" and result.errors == 0 and result.rps > 0, result
        assert result.cpu_us is not None and result.cpu_us > 0
        assert 0 < result.p50_ms <= result.p99_ms
    table = render_h2(results, grpc_mode, 2, 2, 1, 1)
    assert "vs envoy" in table and "2 connections x 2 streams" in table


@measuring
@needs_nginx
@needs_h2load
def test_json_holds_the_grpc_table_and_no_http_table() -> None:
    result = strangler(
        "bench", "--no-http", "--grpc", "--seconds", "1", "--rounds", "1",
        "--connections", "4", "--streams", "2", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["http"] is None and document["h2_to_h1"] is None
    assert document["grpc"]["connections"] == 2 and document["grpc"]["streams"] == 2
    rows = document["grpc"]["results"]
    assert [r["name"] for r in rows][:2] == [
        DIRECT,
        "strangler (1 worker, h2 both sides, split 10%, metrics on)",
    ]
    for row in rows:
        assert row["rps"] > 0 and row["errors"] == 0 and row["note"] == "", row
