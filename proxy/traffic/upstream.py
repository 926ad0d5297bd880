"""Pooled aiohttp sessions to the two fixed backends, and the one place aiohttp errors are mapped.

The base URL comes only from settings: request targets and Host headers are appended as a path,
never parsed for a scheme or authority, so the proxy cannot be turned into an open proxy.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from yarl import URL

from proxy.settings import Settings
from proxy.traffic.errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)

# aiohttp adds these by itself unless told not to; a proxy must pass the client's own (or none)
SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


class Upstream:
    """One backend: a base URL and a pooled keep-alive session. Opened and closed by the lifespan."""

    def __init__(self, version: str, base_url: str, settings: Settings) -> None:
        self.version = version
        base = URL(base_url)
        self._origin = f"{base.scheme}://{base.raw_authority}"
        self._base_path = base.raw_path.rstrip("/")
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[bytes, URL] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("upstream session used before start()")
        return self._session

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._settings.upstream_pool_size,
            limit_per_host=self._settings.upstream_pool_size,
            keepalive_timeout=4.0,  # below the usual 5 s server idle timeout: no reuse races
            enable_cleanup_closed=False,
            ttl_dns_cache=60,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self._settings.connect_timeout_seconds,
                sock_read=self._settings.read_timeout_seconds,
            ),
            skip_auto_headers=SKIP_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, raw_target: bytes) -> URL:
        """Base URL + the raw request target, percent-encoding untouched (``%2F`` stays).

        Building a yarl URL costs several microseconds; hot targets repeat, so a small bounded
        cache pays for itself (cleared whole when full: no LRU bookkeeping per request)."""
        url = self._urls.get(raw_target)
        if url is None:
            url = URL(self._origin + self._base_path + raw_target.decode("latin-1"), encoded=True)
            if len(self._urls) >= 4096:
                self._urls.clear()
            self._urls[raw_target] = url
        return url

    async def send(
        self,
        method: str,
        raw_target: bytes,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | bytes | None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> aiohttp.ClientResponse:
        """Send the request; return the response with its body still unread."""
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            return await self.session.request(
                method,
                self.url(raw_target),
                headers=headers,
                data=body,
                allow_redirects=False,
                **extra,
            )
        except Exception as exc:
            raise translate(self.version, exc) from exc


def translate(version: str, exc: BaseException) -> UpstreamError:
    """Map aiohttp/asyncio errors to our tree. The order matters: subclasses first."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamConnectTimeout(version, "connect timeout")
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError | TimeoutError):
        return UpstreamTimeout(version, "read timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError(version, f"cannot connect: {exc.os_error.strerror or exc.os_error}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamReset(version, "connection lost mid-answer")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamProtocolError(version, "backend closed the connection without an answer")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamProtocolError(version, f"invalid answer: {exc.message}")
    if isinstance(exc, aiohttp.ClientOSError | OSError):
        return UpstreamProtocolError(version, f"connection error: {exc}")
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamProtocolError(version, f"{type(exc).__name__}")
    return UpstreamProtocolError(version, f"unexpected {type(exc).__name__}")


def raw_headers_text(raw: Any) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]
