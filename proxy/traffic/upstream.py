"""The two fixed backends, each a pool of our edge client, and the one place foreign errors are mapped.

Where a request goes comes only from settings: the edge client writes the configured origin's
path plus the request path as one component, and connects only to the configured host and port.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable

from proxy.edge.client import Headers, Origin, PoolLimits, UpstreamPool, UpstreamResponse
from proxy.edge.errors import (
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.edge.h2client import H2Pool
from proxy.edge.headers import HOP_BY_HOP
from proxy.settings import Settings

VERSION_HEADER = b"x-api-version"  # which version answered: set by the proxy, a backend's copy dropped
# response headers never relayed: hop-by-hop ones, and our own version header
RESPONSE_STRIP = HOP_BY_HOP | {VERSION_HEADER}


def tls_context(settings: Settings) -> ssl.SSLContext:
    """Verification (SNI, hostname, chain) against the system store or the configured CA bundle;
    a client certificate when the backend asks for one."""
    ca = settings.upstream_ca_file
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if settings.upstream_client_cert_file is not None:
        key = settings.upstream_client_key_file
        context.load_cert_chain(str(settings.upstream_client_cert_file), str(key) if key else None)
    return context


class Upstream:
    """One backend: its origin and a keep-alive pool. Opened and closed by the lifespan.

    ``protocol`` is how the backend is spoken to (``v1_protocol``/``v2_protocol``): with ``h2``,
    requests go through ``h2`` (multiplexed streams, ``proxy/traffic/duplex.py``) and ``pool``
    (HTTP/1.1) only serves WebSocket upgrades' origin and TLS context."""

    def __init__(
        self,
        version: str,
        base_url: str,
        settings: Settings,
        pool_size: int | None = None,
        read_timeout: float | None = None,
        on_drop: Callable[[str], None] | None = None,
        protocol: str | None = None,
    ) -> None:
        self.version = version
        self.protocol = protocol or (settings.v1_protocol if version == "v1" else settings.v2_protocol)
        origin = Origin.parse(base_url)
        limits = PoolLimits(
            size=pool_size or settings.upstream_pool_size,
            connect_timeout=settings.connect_timeout_seconds,
            read_timeout=read_timeout or settings.read_timeout_seconds,
            pool_timeout=settings.pool_timeout_seconds,
            max_head_bytes=settings.limits.max_response_head_bytes,
            strict_states=settings.limits.strict_states,
        )
        self.pool = UpstreamPool(
            version, origin, limits, tls_context(settings) if origin.scheme == "https" else None, on_drop,
            strip=RESPONSE_STRIP,
        )  # fmt: skip
        self.h2: H2Pool | None = None
        if self.protocol == "h2":
            self.h2 = H2Pool(
                version,
                origin,
                limits,
                tls_context(settings) if origin.scheme == "https" else None,
                RESPONSE_STRIP,
            )

    async def start(self) -> None:
        """Connections are opened on demand; nothing to do before the first request."""

    async def close(self) -> None:
        await self.pool.close()
        if self.h2 is not None:
            await self.h2.close()

    async def send(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: bytes | AsyncIterator[bytes] | None = None,
        *,
        content_length: int | None = None,
        add_host: bool = True,
        read_timeout: float | None = None,
        fresh: bool = False,
    ) -> UpstreamResponse:
        """Send the request; return the response with its body still unread. ``fresh``: on a new
        connection (the one retry after the keep-alive race; see ``UpstreamPool.request``)."""
        return await self.pool.request(
            method, target, headers, body,
            content_length=content_length, add_host=add_host, read_timeout=read_timeout, fresh=fresh,
        )  # fmt: skip


def translate(version: str, exc: BaseException) -> UpstreamError:
    """Anything not already ours (a bug, an OS error) becomes an upstream error of the right kind."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return UpstreamTimeout(version, "read timeout")
    if isinstance(exc, ConnectionError):
        return UpstreamReset(version, "connection lost")
    return UpstreamProtocolError(version, f"unexpected {type(exc).__name__}")
