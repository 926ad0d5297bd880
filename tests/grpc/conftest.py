"""Fixtures for the gRPC tests: the interop protos compiled once, a grpcio backend per version,
a proxy speaking h2 to both (its own Redis state from the session Redis)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.grpc.interop import InteropServer, Protos, compile_protos
from tests.support import ProxyProcess


@pytest.fixture(scope="session")
def pb(tmp_path_factory: pytest.TempPathFactory) -> Protos:
    return compile_protos(tmp_path_factory.mktemp("protos"))


@pytest.fixture(scope="module")
def grpc_backends(pb: Protos) -> Iterator[tuple[InteropServer, InteropServer]]:
    v1, v2 = InteropServer("v1", pb), InteropServer("v2", pb)
    yield v1, v2
    v1.stop()
    v2.stop()


@pytest.fixture()
def grpc_v1v2(grpc_backends: tuple[InteropServer, InteropServer]) -> tuple[InteropServer, InteropServer]:
    for server in grpc_backends:
        server.reset()
    return grpc_backends


@pytest.fixture()
def grpc_proxy(
    proxy_factory: Callable[..., ProxyProcess], grpc_v1v2: tuple[InteropServer, InteropServer], redis_url: str
) -> Callable[..., ProxyProcess]:
    """A proxy with both backends over h2c; settings override."""
    v1, v2 = grpc_v1v2

    def start(**settings: Any) -> ProxyProcess:
        base = {
            "v1_url": v1.url,
            "v2_url": v2.url,
            "v1_protocol": "h2",
            "v2_protocol": "h2",
            "redis_url": redis_url,
        }
        return proxy_factory(**{**base, **settings})

    return start
