"""``strangler upgrade`` (issue 26, item 2): a new generation of the whole proxy takes the listening
sockets from the running one and the old one drains and exits. Real ``strangler serve`` processes,
raw keep-alive clients that check every answer's length, WebSockets that must be told 1001 and come
back; a new generation that cannot start leaves the old one serving.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis

from proxy.settings import ConfigError, load_settings
from tests.clirun import strangler
from tests.supervisor.conftest import Supervised
from tests.support import free_port, metric_value, wait_until

UPGRADED = re.compile(
    r"upgraded: pid (\d+) -> (\d+), (\d+) workers? ready in \d+\.\d s; "
    r"the old generation drains \(up to (\S+) s\)"
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def all_ready(sup: Supervised, workers: int) -> None:
    """Every worker of the first generation serves (an upgrade before that is refused: starting)."""
    wait_until(lambda: len(sup.workers()) == workers, timeout=20, message=f"{workers} workers ready")


@pytest.fixture()
def stop_pids() -> Iterator[list[int]]:
    """Parents started by an upgrade are not the test's children: stopped here (SIGINT, then KILL)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with_signal(pid, signal.SIGINT)
        if not wait_gone(pid, 15):
            with_signal(pid, signal.SIGKILL)
            wait_gone(pid, 5)


def with_signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


@dataclass
class KeepAlive:
    """Raw keep-alive clients sending GETs back to back; every answer is read to its Content-Length.
    A ``Connection: close`` answer means: reconnect. Counted: ok, 5xx, reset (ECONNRESET anywhere),
    refused, cut (the connection ended inside an answer or with a request unanswered)."""

    port: int
    clients: int = 4
    outcomes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> KeepAlive:
        for i in range(self.clients):
            thread = threading.Thread(target=self._run, args=(i,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def stop(self) -> Counter[str]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(15)
        return self.outcomes

    def count(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome != "ok" and len(self.problems) < 20:
                self.problems.append(f"{outcome}: {detail}")

    def _run(self, client: int) -> None:
        n = 0
        while not self.stopping.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            except ConnectionRefusedError:
                self.count("refused")
                time.sleep(0.01)
                continue
            with sock:
                while not self.stopping.is_set():
                    n += 1
                    path = f"/load/{client}/{n}"
                    try:
                        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n".encode())
                        status, close, complete = read_answer(sock)
                    except ConnectionResetError as exc:
                        self.count("reset", f"{path}: {exc}")
                        break
                    except OSError as exc:
                        self.count("cut", f"{path}: {exc!r}")
                        break
                    if not complete:
                        self.count("cut", f"{path}: {status}")
                        break
                    self.count("5xx" if status >= 500 else "ok", f"{path}: {status}")
                    if close:
                        break


def read_answer(sock: socket.socket) -> tuple[int, bool, bool]:
    """(status, says close, complete): complete when the head and Content-Length bytes arrived."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, True, False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    status = int(lines[0].split()[1])
    length = int(headers.get(b"content-length", b"0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return status, True, False
        body += chunk
    return status, headers.get(b"connection", b"").lower() == b"close", True


@dataclass
class Socket:
    """A WebSocket through the proxy to the v2 backend (forced), echoing until closed; then one
    reconnect that must echo too."""

    url: str
    closed_with: int | None = None
    reconnected: bool = False
    error: str = ""
    ready: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        headers = {"X-Strangler-Version": "v2"}
        try:
            with connect(self.url, open_timeout=10, compression=None, additional_headers=headers) as ws:
                self.ready.set()
                try:
                    while True:
                        ws.send("ping")
                        assert ws.recv(timeout=10) == "ping"
                        time.sleep(0.05)
                except ConnectionClosed as closed:
                    self.closed_with = closed.rcvd.code if closed.rcvd is not None else None
            with connect(self.url, open_timeout=10, compression=None, additional_headers=headers) as ws:
                ws.send("again")
                self.reconnected = ws.recv(timeout=10) == "again"
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = repr(exc)
            self.ready.set()


def test_upgrade_under_load_hands_over_without_a_dropped_request(
    supervised: Callable[..., Supervised], stop_pids: list[int], redis_url: str
) -> None:
    from tests.wsbackend import WsBackend

    ws_backend = WsBackend("v2").start()
    try:
        prefix = f"upgrade{os.getpid()}:"  # this test's canary windows, apart from the session's
        sup = supervised(
            workers=2, v2_url=ws_backend.url, drain_timeout_seconds=5, key_prefix=prefix,
            websocket={"drain_grace_seconds": 0.3}, limits={"drain_idle_grace_seconds": 0.3},
        )  # fmt: skip
        proxy = sup.proxy
        assert proxy.process is not None
        old_pid = proxy.process.pid
        all_ready(sup, 2)
        load = KeepAlive(proxy.port).start()
        sockets = [Socket(proxy.url.replace("http://", "ws://") + "/echo") for _ in range(3)]
        threads = [threading.Thread(target=s.run, daemon=True) for s in sockets]
        for thread in threads:
            thread.start()
        for s in sockets:
            assert s.ready.wait(10) and not s.error, s.error
        wait_until(lambda: load.outcomes["ok"] > 100, timeout=10, message="load before the upgrade")

        ran = strangler("upgrade", "--socket", str(sup.socket))
        said = UPGRADED.fullmatch(ran.stdout.strip())
        assert ran.returncode == 0 and said is not None, (ran.stdout, ran.stderr, proxy.output()[-3000:])
        new_pid = int(said.group(2))
        stop_pids.append(new_pid)
        assert (int(said.group(1)), said.group(3), said.group(4)) == (old_pid, "2", "5")

        assert proxy.process.wait(15) == 0  # the old generation drained and exited
        before = load.outcomes["ok"]
        wait_until(lambda: load.outcomes["ok"] > before + 100, timeout=10, message="load after the upgrade")
        for thread in threads:
            thread.join(15)
        outcomes = load.stop()
        assert set(outcomes) == {"ok"}, (outcomes, load.problems)
        assert [(s.closed_with, s.reconnected, s.error) for s in sockets] == [(1001, True, "")] * 3

        assert alive(new_pid)
        assert (sup.socket.parent / "strangler.pid").read_text().strip() == str(new_pid)
        status = sup.status()  # the control socket answers from the new parent
        assert {w["state"] for w in status["workers"]} == {"ready"} and len(status["workers"]) == 2
        metrics = proxy.metrics()
        assert metric_value(metrics, "strangler_upgrades_total", result="ok") == 1
        # the canary windows lose nothing: the old generation flushed its last deltas as it stopped
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            wait_until(
                lambda: sum(int(r.hget(key, "r") or 0) for key in r.scan_iter(f"{prefix}win:default:v1:*"))
                == outcomes["ok"],
                timeout=5, message="every answered request counted in the canary windows",
            )  # fmt: skip
        finally:
            r.close()
    finally:
        ws_backend.stop()


def test_a_new_generation_that_cannot_start_leaves_the_old_one_serving(
    supervised: Callable[..., Supervised], stop_pids: list[int]
) -> None:
    sup = supervised(workers=1)
    proxy = sup.proxy
    assert proxy.process is not None
    old_pid = proxy.process.pid
    sup.rewrite(port="many")  # the file became invalid since the start
    ran = strangler("upgrade", "--socket", str(sup.socket), "--json")
    assert ran.returncode == 1, (ran.stdout, ran.stderr)
    answer = json.loads(ran.stdout)
    new_pid = answer.get("new_pid")
    if new_pid:
        stop_pids.append(int(new_pid))
    with pytest.raises(ConfigError) as invalid:
        load_settings(sup.config)
    expected = str(invalid.value)  # the new process's own line: file, line, field, problem
    assert expected.startswith(f"{sup.config}:") and "port: Input should be a valid integer" in expected
    assert (answer["ok"], answer["result"], answer["error"]) == (False, "failed", expected)
    ran = strangler("upgrade", "--socket", str(sup.socket))
    assert (ran.returncode, ran.stdout, ran.stderr.splitlines()) == (
        1, "", [f"error: upgrade failed, pid {old_pid} keeps serving: {expected}"]
    )  # fmt: skip
    assert proxy.process.poll() is None
    assert proxy.http.get(proxy.url + "/after").status_code == 200
    assert metric_value(proxy.metrics(), "strangler_upgrades_total", result="failed") == 2
    assert not (sup.socket.parent / "control.sock.handover").exists()


def test_sigusr2_upgrades_and_the_embedded_redis_changes_hands_without_a_restart(
    supervised: Callable[..., Supervised], stop_pids: list[int]
) -> None:
    """No redis_url: the old parent started the embedded Redis; the new one adopts it (the same
    redis-server process, never stopped, never started twice) and stops it when it stops."""
    sup = supervised(redis_url=None, embedded_redis_port=0)
    proxy = sup.proxy
    assert proxy.process is not None
    old_pid = proxy.process.pid
    url_file = proxy.workdir / ".strangler" / "redis" / "redis.url"
    url = url_file.read_text().split()[0]
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        redis_pid = r.info("server")["process_id"]
        r.set("feature:v2_traffic_percentage", "100")
        os.kill(old_pid, signal.SIGUSR2)
        pid_file = sup.socket.parent / "strangler.pid"

        def new_parent() -> str | None:
            text = pid_file.read_text().strip()
            return text if text != str(old_pid) else None

        new_pid = int(wait_until(new_parent, timeout=20, message="the new parent's pid file"))
        stop_pids.append(new_pid)
        assert proxy.process.wait(15) == 0
        assert r.info("server")["process_id"] == redis_pid  # the same Redis, still up
        assert url_file.read_text().split() == [url, str(new_pid)]
        assert proxy.http.get(proxy.url + "/after").headers["x-api-version"] == "v2"
        assert metric_value(proxy.metrics(), "strangler_upgrades_total", result="ok") == 1
        with_signal(new_pid, signal.SIGINT)
        assert wait_gone(new_pid, 15)
        wait_until(lambda: not url_file.exists(), timeout=10, message="the new owner stopped Redis")
        with pytest.raises(redis.ConnectionError):
            r.ping()
    finally:
        r.close()


@pytest.mark.parametrize("change", ["port", "workers"])
def test_settings_the_sockets_cannot_follow_are_refused_by_the_new_generation(
    supervised: Callable[..., Supervised], stop_pids: list[int], change: str
) -> None:
    """A new port, or fewer workers (the sockets given up would reset their queues): the new
    parent refuses the hand-over in one line, the old one keeps serving."""
    sup = supervised(workers=2)
    proxy = sup.proxy
    assert proxy.process is not None
    old_pid, port = proxy.process.pid, proxy.port
    all_ready(sup, 2)
    if change == "port":
        other = free_port()
        sup.rewrite(port=other)
        reason = (
            f"the listener handed over is bound to 127.0.0.1:{port}, these settings want 127.0.0.1:{other} "
            "(host/port changed: restart instead)"
        )
    else:
        sup.rewrite(workers=1)
        reason = (
            "workers cannot shrink on an upgrade (2 -> 1): the sockets given up would reset the "
            "connections queued on them; restart instead"
        )
    ran = strangler("upgrade", "--socket", str(sup.socket))
    assert (ran.returncode, ran.stdout, ran.stderr.splitlines()) == (
        1, "", [f"error: upgrade failed, pid {old_pid} keeps serving: {reason}"]
    )  # fmt: skip
    assert proxy.process.poll() is None
    assert proxy.http.get(proxy.url + "/after").status_code == 200
