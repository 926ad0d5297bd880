"""proxy/supervisor/handover.py alone: two real processes (tests/supervisor/handover_peer.py) hand a
listening socket over while raw clients connect in a tight loop; not one connection may be reset or
refused. Then the refusals: a socket bound elsewhere, a new process that fails or exits first."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.supervisor import handover
from tests.support import ROOT, stop_process, wait_until


class Peer:
    """The ``old`` peer process; its stdout lines are collected in a thread."""

    def __init__(self, tmp_path: Path, *new_args: str) -> None:
        args = [sys.executable, "-m", "tests.supervisor.handover_peer", "old", "--dir", str(tmp_path)]
        for arg in new_args:
            args.append(f"--new-arg={arg}")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        first = wait_until(lambda: self.line("listening "), timeout=15, message="old peer listening")
        self.port = int(first.split()[1])

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def line(self, prefix: str) -> str | None:
        return next((line for line in self.lines if line.startswith(prefix)), None)

    def new_pid(self) -> int | None:
        started = self.line("started ")
        return int(started.split()[1]) if started else None


class Clients:
    """Raw clients connecting in a tight loop: one request per connection, every outcome counted."""

    def __init__(self, port: int, threads: int = 2) -> None:
        self.port = port
        self.outcomes: Counter[str] = Counter()
        self.pids: list[int] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _one(self) -> str:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
        except ConnectionResetError:
            return "reset"
        except ConnectionRefusedError:
            return "refused"
        except OSError as exc:
            return f"error {exc!r}"
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            return "bad answer"
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        if len(body) != length:
            return "cut body"
        with self.lock:
            self.pids.append(int(body))
        return "ok"

    def _loop(self) -> None:
        while not self.stopping.is_set():
            outcome = self._one()
            with self.lock:
                self.outcomes[outcome] += 1

    def stop(self) -> Counter[str]:
        self.stopping.set()
        for thread in self.threads:
            thread.join()
        return self.outcomes


@pytest.fixture()
def peers(tmp_path: Path) -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for peer in started:
        stop_process(peer.process)
        pid = peer.new_pid()
        if pid is not None:
            with_pid_gone(pid)


def with_pid_gone(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (our child's child, reaped by init later) counts as gone
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[1][0] != "Z"


def test_handover_under_a_connect_loop_resets_nothing(tmp_path: Path, peers: list[Peer]) -> None:
    old = Peer(tmp_path)
    peers.append(old)
    clients = Clients(old.port)
    wait_until(lambda: clients.outcomes["ok"] > 50, timeout=10, message="load before the hand-over")
    old.process.send_signal(signal.SIGUSR2)
    assert old.process.wait(15) == 0
    new_pid = old.new_pid()
    assert new_pid is not None
    assert old.line("handed over to ") == f"handed over to {new_pid} (workers 1)"
    before = len(clients.pids)
    wait_until(lambda: len(clients.pids) > before + 50, timeout=10, message="load after the hand-over")
    outcomes = clients.stop()
    assert set(outcomes) == {"ok"}, outcomes
    assert clients.pids[0] == old.process.pid
    assert clients.pids[-1] == new_pid  # the old one has exited: only the new one answers
    assert alive(new_pid)


@pytest.mark.parametrize(
    ("new_arg", "reason"),
    [
        # the settings of the new process want another port: it refuses, names both addresses
        (
            "--want-port=1",
            "upgrade: the listener handed over is bound to 127.0.0.1:{port}, these settings "
            "want 127.0.0.1:1 (host/port changed: restart instead)",
        ),
        # it failed before asking (an invalid configuration): its own line reaches the old one
        (
            "--fail=error: strangler.yaml:3:7: port: Input should be a valid integer",
            "error: strangler.yaml:3:7: port: Input should be a valid integer",
        ),
        # it died without a word
        ("--exit=3", "the new process exited with status 3 before it connected"),
    ],
)
def test_a_refused_handover_keeps_the_old_one_serving(
    tmp_path: Path, peers: list[Peer], new_arg: str, reason: str
) -> None:
    old = Peer(tmp_path, new_arg)
    peers.append(old)
    clients = Clients(old.port, threads=1)
    wait_until(lambda: clients.outcomes["ok"] > 20, timeout=10, message="load before the hand-over")
    old.process.send_signal(signal.SIGUSR2)
    failed = wait_until(lambda: old.line("failed: "), timeout=15, message="the hand-over fails")
    assert failed == "failed: " + reason.format(port=old.port)
    before = len(clients.pids)
    wait_until(lambda: len(clients.pids) > before + 20, timeout=10, message="load after the refusal")
    outcomes = clients.stop()
    assert set(outcomes) == {"ok"}, outcomes
    assert set(clients.pids) == {old.process.pid}
    assert old.process.poll() is None
    assert not (tmp_path / "handover.sock").exists()


def test_the_checks_refuse_what_is_not_a_listener_of_ours(tmp_path: Path) -> None:
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    idle = socket.socket()
    idle.bind(("127.0.0.1", 0))
    described = {"role": "main", "family": "inet"}
    try:
        assert handover.check(listening, described, {"main": ("127.0.0.1", port)}) is None
        assert handover.check(listening, described, {"main": ("127.0.0.1", 0)}) is None
        assert handover.check(idle, described, {"main": ("127.0.0.1", 0)}) == (
            "upgrade: the listener handed over is not listening"
        )
        assert handover.check(listening, {**described, "role": "admin"}, {"main": ("127.0.0.1", 0)}) == (
            "upgrade: the old generation hands over the admin listener, which these settings do not have"
        )
        assert handover.check(listening, described, {"main": ("0.0.0.0", port)}) == (
            f"upgrade: the listener handed over is bound to 127.0.0.1:{port}, these settings want "
            f"0.0.0.0:{port} (host/port changed: restart instead)"
        )
    finally:
        listening.close()
        idle.close()


def test_a_new_process_of_another_protocol_version_is_refused(tmp_path: Path) -> None:
    """In one process, two threads: the old side refuses a hello of protocol 2 and says why."""
    path = tmp_path / "h.sock"
    errors: list[str] = []
    with handover.Offer(path) as offer:
        assert path.stat().st_mode & 0o777 == 0o600

        def old_side() -> None:
            deadline = time.monotonic() + 5
            offer.accept(deadline)
            try:
                offer.give([], {}, deadline)
            except handover.HandoverError as exc:
                errors.append(str(exc))

        thread = threading.Thread(target=old_side)
        thread.start()
        taker = handover.Taker(path)
        taker.sock.sendall(b'{"v": 2, "op": "hello", "pid": 1}')
        answer = taker.sock.recv(4096)
        thread.join()
        taker.close()
    expected = "the new process speaks hand-over protocol 2, this one 1: restart instead"
    assert errors == [expected]
    assert answer == b'{"v": 1, "op": "refused", "error": "' + expected.encode() + b'"}'


def test_a_new_process_that_said_why_and_exited_is_reported_by_its_words(tmp_path: Path) -> None:
    """The old parent's loop may notice the exit before it reads the message: the reason it sent
    still wins over its exit status."""
    from proxy.supervisor.upgrade import Launch, Upgrade

    said = "error: strangler.yaml:3:7: port: Input should be a valid integer"
    code = (
        f"from proxy.supervisor.handover import report_failure; report_failure({said!r}); raise SystemExit(2)"
    )
    launch = Launch([sys.executable, "-c", code], str(ROOT), {**os.environ, "PYTHONPATH": str(ROOT)})
    upgrade = Upgrade(launch, tmp_path / "h.sock", [], {}, {}, 1.0)
    assert upgrade.process is not None
    assert upgrade.process.wait(15) == 2  # gone before the loop looked at the socket
    with pytest.raises(handover.HandoverError) as failed:
        upgrade.expired(time.monotonic())
    upgrade.abort()
    assert str(failed.value) == said
