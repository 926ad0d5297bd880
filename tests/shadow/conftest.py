"""Fixtures for the shadow tests: two scripted backends (v1, v2) and a proxy in front of them."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.shadow.helpers import BASE_SHADOW
from tests.support import ROOT, Backend, ProxyProcess, wait_until

_prefixes = itertools.count()


class Scripted(Backend):
    """tests/shadow/scripted.py in its own process: answers exactly what the test scripts."""

    def start(self) -> Scripted:
        self.workdir.mkdir(parents=True, exist_ok=True)
        port_file = self.workdir / f"scripted-{self.name}-{os.getpid()}-{id(self)}.port"
        port_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.shadow.scripted",
                "--name",
                self.name,
                "--port-file",
                str(port_file),
            ],
            cwd=ROOT,
        )
        wait_until(port_file.exists, timeout=15, message=f"scripted backend {self.name} start")
        self.port = int(port_file.read_text())
        return self

    def script(self, path: str, **kinds: list[dict[str, Any]]) -> None:
        httpx.post(f"{self.url}/__script", json={path: kinds}, timeout=5).raise_for_status()

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        entries = list(httpx.get(f"{self.url}/__log", timeout=5).json())
        return [e for e in entries if path is None or e["path"].split("?")[0] == path]

    def reset(self) -> None:
        httpx.post(f"{self.url}/__reset", timeout=5).raise_for_status()


@pytest.fixture(scope="session")
def scripted_backends(workdir: Path) -> Iterator[tuple[Scripted, Scripted]]:
    v1 = Scripted("v1", workdir).start()
    v2 = Scripted("v2", workdir).start()
    yield v1, v2
    v1.stop()
    v2.stop()


@pytest.fixture()
def scripted(scripted_backends: tuple[Scripted, Scripted]) -> tuple[Scripted, Scripted]:
    for backend in scripted_backends:
        backend.reset()
    return scripted_backends


@pytest.fixture()
def shadow_proxy(
    proxy_factory: Callable[..., ProxyProcess], scripted: tuple[Scripted, Scripted], redis_url: str
) -> Callable[..., ProxyProcess]:
    """A proxy mirroring everything to the scripted v2, one worker (answers handled in order), its
    own key prefix (a clean report), no exclusions; ``prefix=`` shares a report between proxies."""
    v1, v2 = scripted
    default_prefix = f"shadowtest{next(_prefixes)}-{os.getpid()}:"

    def start(
        prefix: str | None = None,
        routes: list[dict[str, Any]] | None = None,
        process: bool = False,
        **shadow: Any,
    ) -> ProxyProcess:
        config = {**BASE_SHADOW, "exclude_paths": [], "concurrency": 1, **shadow}
        return proxy_factory(
            process=process,
            v1_url=v1.url,
            v2_url=v2.url,
            redis_url=redis_url,
            routes=routes or [],
            key_prefix=prefix or default_prefix,
            shadow=config,
        )

    return start
