"""``strangler serve`` at start: "ready" only once every listener is bound, a taken port is one line
(exit 1: the flag is valid, the action failed), and a backend that does not resolve or connect is a
one-line warning per backend, never a failure.

Real processes: what is under test is the command's output and exit code.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, Backend, free_port, stop_process


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
    return {**clean, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


@pytest.fixture()
def taken() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def run_serve(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60, env=env(),
    )  # fmt: skip


def test_a_taken_port_is_one_line_and_never_ready(
    taken: int, v1v2: tuple[Backend, Backend], redis_url: str, tmp_path: Path
) -> None:
    v1, v2 = v1v2
    common = ["--v1", v1.url, "--v2", v2.url, "--redis-url", redis_url]
    for extra in ([], ["--workers", "2"]):
        result = run_serve(["--port", str(taken), *common, *extra], tmp_path)
        assert result.returncode == 1, result.stderr
        assert result.stderr.splitlines() == [
            f"error: cannot listen on 127.0.0.1:{taken} (port): Address already in use"
        ]
        assert "strangler ready" not in result.stdout + result.stderr


def test_a_taken_admin_port_is_one_line_and_never_ready(
    taken: int, v1v2: tuple[Backend, Backend], redis_url: str, tmp_path: Path
) -> None:
    v1, v2 = v1v2
    config = tmp_path / "strangler.yaml"
    config.write_text(f"admin_port: {taken}\n")
    args = [
        "-c",
        str(config),
        "--port",
        str(free_port()),
        "--v1",
        v1.url,
        "--v2",
        v2.url,
        "--redis-url",
        redis_url,
    ]
    result = run_serve(args, tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{taken} (admin_port): Address already in use"
    ]
    assert "strangler ready" not in result.stdout + result.stderr


def test_backends_that_do_not_answer_are_a_warning_each(redis_url: str, tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there: refused
    v1 = "http://no-such-host.invalid:8001"
    v2 = f"http://127.0.0.1:{closed}"
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--v1", v1, "--v2", v2, "--port", str(port),
         "--redis-url", redis_url],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(),
    )  # fmt: skip
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 30
        assert process.stderr is not None
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line, f"serve ended: {lines}"
            lines.append(line.rstrip("\n"))
            if "strangler ready" in line:
                break
        warnings = [line for line in lines if "warning:" in line]
        assert warnings == [
            f"strangler: warning: v1 backend {v1}: no-such-host.invalid does not resolve",
            f"strangler: warning: v2 backend {v2}: connection refused",
        ]
        assert lines.index(warnings[-1]) < len(lines) - 1  # before "ready", which still comes
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it serves
    finally:
        stop_process(process)


def test_reachable_backends_give_no_warning(
    v1v2: tuple[Backend, Backend], redis_url: str, tmp_path: Path
) -> None:
    from proxy.server import BackendCheck
    from proxy.settings import Settings

    v1, v2 = v1v2
    assert BackendCheck(Settings(v1_url=v1.url, v2_url=v2.url)).report() == []


def test_a_backend_that_does_not_answer_is_a_timeout_within_a_second(v1v2: tuple[Backend, Backend]) -> None:
    """A listener whose accept queue is full drops new connections: connecting times out."""
    from proxy.server import BackendCheck
    from proxy.settings import Settings

    _, v2 = v1v2
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        queued = []
        for _ in range(3):  # fill the queue (non-blocking connects, never accepted)
            client = socket.socket()
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                client.connect(("127.0.0.1", port))
            queued.append(client)
        time.sleep(0.1)
        lines = BackendCheck(Settings(v1_url=f"http://127.0.0.1:{port}", v2_url=v2.url)).report()
        for client in queued:
            client.close()
    assert lines == [
        f"strangler: warning: v1 backend http://127.0.0.1:{port}: no answer within 1 s (timed out)"
    ]
