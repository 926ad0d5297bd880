"""Real servers for tests: redis-server, backends and the proxy, each on a free 127.0.0.1 port.

The proxy runs as ``strangler serve`` in its own process (:class:`ProxyProcess`) where a test kills,
signals or measures that process, and otherwise as the same ``serve()`` on its own event loop in a
thread of the test process (:class:`ProxyThread`): the same server, sockets and Redis, without a
second of interpreter start-up per proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
import yaml

from proxy.control.embedded import find_redis_server, free_port

ROOT = Path(__file__).resolve().parent.parent


class KeptClient:
    """A kept-alive HTTP client for a test's own calls to one server (control, metrics, health):
    a new ``httpx.Client`` per call costs ~20 ms of TLS context set-up, more than the call."""

    _http: httpx.Client | None = None

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(timeout=5)
        return self._http

    def close_http(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


def stop_process(process: subprocess.Popen[Any]) -> None:
    """Stop a child we started: resumed first (a test may have frozen it), asked to terminate,
    killed if it has not gone within 5 s."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGCONT)
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02, message: str = "") -> Any:
    """Poll until ``predicate()`` is truthy; return its value or fail with ``message``."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last one
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {message or predicate} (last error: {last_exc!r})")


class RedisServer:
    """A real redis-server process; can be killed, frozen and restarted on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        wait_until(lambda: client.ping(), timeout=10, message="redis-server start")
        client.close()
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(
            self.url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True
        )

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


# A test's own calls to a backend leave no connection open: tests count the proxy's connections to
# its backends, and a proxy in a thread shares this process with the test.
_CLOSE = {"Connection": "close"}


class Backend(KeptClient):
    """tests/backends.py in its own process; ``control`` changes its behaviour live."""

    def __init__(self, name: str, workdir: Path, port: int = 0) -> None:
        self.name = name
        self.workdir = workdir
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Backend:
        self.workdir.mkdir(parents=True, exist_ok=True)
        port_file = self.workdir / f"backend-{self.name}-{os.getpid()}-{id(self)}.port"
        port_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.backends", "--name", self.name, "--port", str(self.port),
             "--port-file", str(port_file)],
            cwd=ROOT,
        )  # fmt: skip
        wait_until(port_file.exists, timeout=15, message=f"backend {self.name} start")
        self.port = int(port_file.read_text())
        return self

    def control(self, **state: Any) -> None:
        self.http.post(f"{self.url}/__control", json=state, headers=_CLOSE).raise_for_status()

    def log(self, clear: bool = False) -> list[dict[str, Any]]:
        response = self.http.request("DELETE" if clear else "GET", f"{self.url}/__log", headers=_CLOSE)
        return list(response.json())

    def stop(self) -> None:
        self.close_http()
        if self.process is not None:
            stop_process(self.process)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> Backend:
        """Same port again (so a running proxy finds it)."""
        self.stop()
        return self.start()

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


class ProxyProcess(KeptClient):
    """``strangler serve`` as a real process, configured through a YAML file and CLI flags."""

    def __init__(self, workdir: Path, settings: dict[str, Any], extra_env: dict[str, str] | None = None):
        self.workdir = workdir
        self.settings = settings
        self.port = settings.get("port") or free_port()
        self.settings["port"] = self.port
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"proxy-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return self.url + self.settings.get("admin_prefix", "/_strangler")

    @property
    def token(self) -> str:
        """The admin token: configured, or the one `strangler serve` generated in its directory."""
        configured = self.settings.get("admin_token")
        if configured:
            return str(configured)
        return (self.workdir / ".strangler" / "admin-token").read_text().strip()

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self, wait: bool = True) -> ProxyProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / f"strangler-{self.port}.yaml"
        config.write_text(yaml.safe_dump(self.settings))
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
        env.update(self.extra_env)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
            cwd=self.workdir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"proxy exited early:\n{self.output()}")
            return self.http.get(self.admin + "/health", timeout=1).status_code == 200

        wait_until(up, timeout=timeout, message="proxy health")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> str:
        return self.http.get(self.admin + "/metrics").text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of samples of ``name`` whose labels include ``labels`` (0 when absent)."""
        return metric_value(self.metrics(), name, **labels)

    def worker_pid(self) -> int:
        """The process that serves (``workers: 1``): ``strangler serve`` is a parent that forks its
        workers and serves nothing itself; the embedded Redis, if any, is its child too."""
        assert self.process is not None
        proc = psutil.Process(self.process.pid)
        workers = wait_until(
            lambda: [c for c in proc.children() if "redis" not in " ".join(c.cmdline())], timeout=10
        )
        return int(workers[0].pid)

    def rss(self) -> int:
        assert self.process is not None
        proc = psutil.Process(self.process.pid)
        return int(sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]))

    def stop(self) -> None:
        self.close_http()
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class _ThreadLog(logging.Handler):
    """Records logged on one thread (the proxy's event loop), formatted as ``strangler serve`` would."""

    def __init__(self, thread_id: int, level: int) -> None:
        super().__init__(level)
        self.thread_id = thread_id
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.thread_id

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class ProxyThread(ProxyProcess):
    """The proxy's own ``serve(settings, app)`` on a uvloop event loop in a thread of the test process
    (as httpx's ``serve_in_thread``), stopped at teardown like Ctrl-C stops ``strangler serve``.

    Settings go through the same YAML file and loader as the process; the admin token is generated
    into ``workdir/.strangler`` as ``strangler serve`` does in its working directory. What only a
    process has (``kill``, signals, memory, the embedded Redis, workers) is refused with a clear
    error: ask the factory for ``process=True`` there.
    """

    def __init__(self, workdir: Path, settings: dict[str, Any]) -> None:
        super().__init__(workdir, settings)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._group: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._log_handler: _ThreadLog | None = None

    def start(self, wait: bool = True) -> ProxyThread:
        from proxy.admin.token import ensure_admin_token
        from proxy.server import raise_open_file_limit
        from proxy.settings import load_settings

        assert self.settings.get("redis_url"), "a proxy in a thread needs redis_url (no embedded Redis)"
        assert self.settings.get("workers", 1) == 1, "workers > 1 need a process"
        leaked = [k for k in os.environ if k.startswith("STRANGLER_")]
        assert not leaked, f"STRANGLER_* in the test environment would configure the proxy: {leaked}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / f"strangler-{self.port}.yaml"
        config.write_text(yaml.safe_dump(self.settings))
        settings = load_settings(config)
        token_file = self.workdir / ".strangler" / "admin-token"
        settings = ensure_admin_token(settings.model_copy(update={"admin_token_file": token_file}))
        raise_open_file_limit()
        self._thread = threading.Thread(
            target=self._run, args=(settings,), name=f"strangler-proxy-{self.port}", daemon=True
        )
        self._thread.start()
        if wait:
            self.wait_ready()
        return self

    def _run(self, settings: Any) -> None:
        import uvloop

        from proxy.app import create_app
        from proxy.server import ServerGroup, serve

        level = getattr(logging, settings.log_level.upper())
        self._log_handler = _ThreadLog(threading.get_ident(), level)
        root, ours = logging.getLogger(), logging.getLogger("strangler")
        root.addHandler(self._log_handler)
        if ours.getEffectiveLevel() > level:  # as configure_logging() does in the process
            ours.setLevel(level)

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._group = ServerGroup()
            self._ready.set()
            await serve(settings, create_app(settings), group=self._group)

        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by wait_ready/stop in the test thread
            self._error = exc
            logging.getLogger("strangler").exception("proxy thread failed")
        finally:
            self._ready.set()
            root.removeHandler(self._log_handler)

    def wait_ready(self, timeout: float = 20.0) -> None:
        def up() -> bool:
            assert self._thread is not None
            if not self._thread.is_alive():
                raise AssertionError(f"proxy stopped early: {self._error!r}\n{self.output()}")
            return self.http.get(self.admin + "/health", timeout=1).status_code == 200

        wait_until(up, timeout=timeout, message="proxy health")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def output(self) -> str:
        return "\n".join(self._log_handler.lines) + "\n" if self._log_handler else ""

    def stop(self) -> None:
        """As Ctrl-C: stop listening, drain, run the app's shutdown. If that does not finish (where
        ``strangler serve`` would be SIGKILLed by :meth:`ProxyProcess.stop`), the loop is stopped
        hard so the proxy cannot outlive its test, and the teardown fails with where it hung."""
        self.close_http()
        if self._thread is None:
            return
        self._ready.wait(20)
        hung = ""
        if self._loop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                self._loop.call_soon_threadsafe(self._group.stop)
            self._thread.join(float(self.settings.get("drain_timeout_seconds", 10)) + 5)
            if self._thread.is_alive():
                frame = sys._current_frames().get(self._thread.ident or 0)
                hung = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)"
                with contextlib.suppress(Exception):  # diagnostics only: what the loop waits for
                    for task in asyncio.all_tasks(self._loop):
                        stack = "".join(traceback.format_list(traceback.extract_stack(task.get_stack()[-1])))
                        hung += f"\ntask {task.get_name()} {task.get_coro()!r}:\n{stack}"
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
        alive = self._thread.is_alive()
        self._thread = None
        if hung or alive:
            raise AssertionError(f"proxy did not stop (still running: {alive}); it hung in:\n{hung}"
                                 f"\nlog:\n{self.output()}")  # fmt: skip

    def kill(self) -> None:
        raise AssertionError("a proxy in a thread cannot be killed: start it with process=True")

    def rss(self) -> int:
        raise AssertionError("a proxy in a thread has no memory of its own: start it with process=True")


def generation(proxy: ProxyProcess) -> int:
    """How many control refreshes from Redis the proxy has done (``/status``)."""
    response = proxy.http.get(proxy.admin + "/status", headers=proxy.auth)
    assert response.status_code == 200, response.text
    return int(response.json()["proxy"]["snapshot_generation"])


def wait_refreshed(*proxies: ProxyProcess, timeout: float = 5.0) -> None:
    """Return once each proxy has finished a control refresh that began after this call, so what
    was written to Redis before it is in force now, or was rejected. Two refreshes, not one: the
    one in flight at the call may have read Redis before the write."""
    for proxy in proxies:
        start = generation(proxy)
        wait_until(lambda p=proxy, s=start: generation(p) >= s + 2, timeout=timeout, message="two refreshes")


def versions_by_user(proxy: ProxyProcess, users: Any, path: str = "/") -> dict[str, str]:
    """The version (X-API-Version) each user key is served by, one request per key."""
    seen: dict[str, str] = {}
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for user in users:
            response = client.get(path, headers={"X-User-ID": f"user-{user}"})
            assert response.status_code == 200, response.text
            seen[str(user)] = response.headers["x-api-version"]
    return seen


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match.group(1) != name:
            continue
        found = dict(_LABEL.findall(match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


@contextmanager
def running(*things: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for thing in reversed(things):
            thing.stop()


@contextlib.contextmanager
def asgi_adapter(
    v1_url: str, v2_url: str, redis_url: str, prefix: str, cwd: Path, *uvicorn_args: str
) -> Iterator[str]:
    """``proxy.app:app`` (the ASGI adapter over the same core) under uvicorn, configured from the
    environment as a user would; yields its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
    env.update({"STRANGLER_V1_URL": v1_url, "STRANGLER_V2_URL": v2_url, "STRANGLER_REDIS_URL": redis_url,
                "STRANGLER_SPLIT_KEY": f"{prefix}split", "STRANGLER_KEY_PREFIX": prefix})  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "proxy.app:app", "--port", str(port), "--log-level", "warning",
         *uvicorn_args],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/_strangler/health", timeout=1).status_code == 200, timeout=20)
        yield url
    finally:
        process.terminate()
        process.wait(10)
