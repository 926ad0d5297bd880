"""The read deadline holds for every exchange on a reused connection, though a busy connection
keeps one timer across exchanges (proxy/edge/client.py ``_arm``).

A real keep-alive backend on 127.0.0.1: it answers ``/fast`` at once and never answers ``/hang``.
"""

from __future__ import annotations

import asyncio

import pytest

from proxy.edge.client import Origin, PoolLimits, UpstreamPool
from proxy.edge.errors import UpstreamTimeout

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def _backend() -> tuple[asyncio.Server, int, list[int]]:
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if head.startswith(b"GET /fast "):
                writer.write(ANSWER)
            # /hang: read, never answered

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], connections


async def _timed_out_after(read_timeout: float, first_timeout: float, gap: float) -> tuple[float, int]:
    server, port, connections = await _backend()
    pool = UpstreamPool("v1", Origin.parse(f"http://127.0.0.1:{port}"), PoolLimits(read_timeout=read_timeout))
    loop = asyncio.get_running_loop()
    try:
        first = await pool.request(b"GET", b"/fast", [], read_timeout=first_timeout)
        assert await first.read() == b"ok"
        await asyncio.sleep(gap)  # the first exchange's timer is still pending
        started = loop.time()
        with pytest.raises(UpstreamTimeout):
            await pool.request(b"GET", b"/hang", [], read_timeout=read_timeout)
        return loop.time() - started, len(connections)
    finally:
        await pool.close()
        server.close()


def test_a_reused_connection_times_out_a_full_deadline_after_its_own_request() -> None:
    """Timer armed by the first exchange (due at 0.6 s); the second starts at 0.3 s, so its
    deadline is 0.9 s: the timer re-arms for the rest instead of firing early."""
    waited, connections = asyncio.run(_timed_out_after(0.6, 0.6, 0.3))
    assert connections == 1  # the second request did reuse the connection
    assert 0.55 <= waited < 3.0


def test_a_shorter_deadline_than_the_pending_timer_is_kept() -> None:
    """The first exchange left a 30 s timer; a 0.3 s deadline must not wait for it."""
    waited, connections = asyncio.run(_timed_out_after(0.3, 30.0, 0.0))
    assert connections == 1
    assert 0.25 <= waited < 3.0
