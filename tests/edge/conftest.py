"""The edge's proxies run with ``limits.strict_states``: an impossible client connection state
change raises (and is logged) instead of quietly aborting one connection, and each test fails if
its proxy logged one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support import ProxyProcess


@pytest.fixture()
def start_proxy(start_proxy: Callable[..., ProxyProcess]) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(**settings: Any) -> ProxyProcess:
        settings["limits"] = {"strict_states": True, **settings.get("limits", {})}
        proxy = start_proxy(**settings)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        output = proxy.output()
        assert "StateError" not in output and "impossible state change" not in output, output[-3000:]
