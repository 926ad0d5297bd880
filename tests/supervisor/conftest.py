"""A supervised proxy (``strangler serve``'s parent and its workers) with its own control socket,
its configuration file rewritable in place, and a keep-alive load that checks every answer."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.supervisor.control import request
from tests.support import ProxyProcess


class Supervised:
    def __init__(self, proxy: ProxyProcess, socket_path: Path) -> None:
        self.proxy = proxy
        self.socket = socket_path

    @property
    def config(self) -> Path:
        return self.proxy.workdir / f"strangler-{self.proxy.port}.yaml"

    def rewrite(self, **changes: Any) -> None:
        """The file serve was started with, changed (what an operator edits before a reload)."""
        self.proxy.settings.update(changes)
        self.config.write_text(yaml.safe_dump(self.proxy.settings))

    def status(self) -> dict[str, Any]:
        return request(self.socket, {"command": "status"}, timeout=5)

    def workers(self, state: str = "ready") -> dict[int, int]:
        """slot -> pid of the current generation's workers in ``state``."""
        doc = self.status()
        return {
            w["slot"]: w["pid"]
            for w in doc["workers"]
            if w["generation"] == doc["generation"] and w["state"] == state
        }


@pytest.fixture()
def supervised(start_proxy: Callable[..., ProxyProcess], tmp_path: Path) -> Callable[..., Supervised]:
    def start(**settings: Any) -> Supervised:
        path = tmp_path / "control.sock"
        proxy = start_proxy(process=True, control_socket=str(path), **settings)
        return Supervised(proxy, path)

    return start


@dataclass
class Load:
    """``clients`` threads, each one keep-alive connection at a time, asking ``/load/<n>`` in a loop.
    An answer is right when it is a 200 whose JSON names an expected version and the path asked
    (never another request's answer); anything else that arrives is wrong. A transport error is a
    failure (the connection closed under the request)."""

    url: str
    versions: set[str]
    clients: int = 4
    answers: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for i in range(self.clients):
            thread = threading.Thread(target=self._run, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _run(self, client_id: int) -> None:
        import time

        n = 0
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                n += 1
                path = f"/load/{client_id}/{n}"
                try:
                    reply = client.get(self.url + path)
                except httpx.TransportError as exc:
                    self.failures.append(f"{path}: {type(exc).__name__}: {exc}")
                    continue
                try:
                    doc = reply.json()
                    right = (
                        reply.status_code == 200 and doc["path"] == path and doc["version"] in self.versions
                    )
                except (ValueError, KeyError, TypeError):
                    right = False
                if not right:
                    self.wrong.append(f"{path}: {reply.status_code} {reply.text[:200]}")
                else:
                    self.answers.append((time.monotonic(), doc["version"]))
                time.sleep(0.002)


@pytest.fixture()
def load() -> Iterator[Callable[..., Load]]:
    made: list[Load] = []

    def make(url: str, versions: set[str], clients: int = 4) -> Load:
        started = Load(url, versions, clients).__enter__()
        made.append(started)
        return started

    yield make
    for started in made:
        started.__exit__()
