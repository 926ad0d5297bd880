"""Writes batched to the end of a loop pass (proxy/edge/writebatch.py) keep their order and are
never lost: not behind a large write, not behind a close, not behind a refusal.

Real sockets on 127.0.0.1 (a socket pair for the batch itself, our server for the refusal)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from proxy.edge.client import Origin, PoolLimits, UpstreamPool, UpstreamResponse
from proxy.edge.errors import UpstreamError
from proxy.edge.server import HttpServer, NativeExchange, ServerLimits
from proxy.edge.writebatch import DIRECT, WriteBatch


async def _transport() -> tuple[asyncio.Transport, socket.socket]:
    """Our end as an asyncio transport, the other end as a plain non-blocking socket."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    transport, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, sock=ours)
    return transport, theirs


def _received(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_small_writes_wait_for_the_end_of_the_pass_and_keep_their_order() -> None:
    async def main() -> None:
        batch = WriteBatch()
        transport, theirs = await _transport()
        batch.write(transport, b"one ")
        batch.write(transport, b"two ")
        assert _received(theirs) == b""  # nothing written during the pass
        await asyncio.sleep(0)  # the pass ends: the batch is flushed
        assert _received(theirs) == b"one two "
        transport.close()

    asyncio.run(main())


def test_a_large_write_goes_out_at_once_after_what_was_queued() -> None:
    async def main() -> None:
        batch = WriteBatch()
        transport, theirs = await _transport()
        large = b"L" * DIRECT
        batch.write(transport, b"first ")
        batch.write(transport, large)
        assert _received(theirs) == b"first " + large  # at once, and behind what was queued
        batch.write(transport, b" last")
        assert _received(theirs) == b""
        await asyncio.sleep(0)
        assert _received(theirs) == b" last"
        transport.close()

    asyncio.run(main())


def test_a_closed_transport_is_skipped_and_the_others_still_get_their_bytes() -> None:
    async def main() -> None:
        batch = WriteBatch()
        gone, _gone_peer = await _transport()
        live, theirs = await _transport()
        batch.write(gone, b"lost")
        batch.write(live, b"kept")
        gone.abort()
        await asyncio.sleep(0)
        assert _received(theirs) == b"kept"
        live.close()

    asyncio.run(main())


async def _served(data: bytes) -> bytes:
    """What our server, with a fast handler that answers at once, says to ``data`` until it closes."""

    def fast(ex: NativeExchange) -> Any:
        ex.respond_now(200, [(b"content-type", b"text/plain")], b"answer to " + ex.raw_path)
        return None

    async def handler(ex: NativeExchange) -> None:
        raise AssertionError("every request here is taken by the fast handler")

    server = HttpServer(handler, ServerLimits(), fast=fast)
    listener = await server.listen("127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        reply = await asyncio.wait_for(reader.read(), 5)  # until the server closes
        writer.close()
        return reply
    finally:
        await server.stop(0.1)


def test_an_answer_that_closes_the_connection_is_sent_before_the_close() -> None:
    reply = asyncio.run(_served(b"GET /a HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"))
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:80]
    assert reply.endswith(b"answer to /a")


def test_a_refusal_comes_after_the_answer_queued_before_it() -> None:
    """A fast handler answers the first request at once (the answer waits in the batch); the
    pipelined second request is malformed, so the server refuses it in the same callback. The
    refusal must not overtake the answer, or the client reads the 400 as the answer to its first
    request (a response desync)."""
    good = b"GET /a HTTP/1.1\r\nHost: a.test\r\n\r\n"
    bad = b"GET /b HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    reply = asyncio.run(_served(good + bad))
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:80]
    assert reply.count(b"HTTP/1.1 ") == 2
    answer, refusal = reply.split(b"HTTP/1.1 ")[1:]
    assert answer.endswith(b"answer to /a")
    assert refusal.startswith(b"400 ")


class _Sink:
    """What a fast-path caller hears of one ``send_now`` exchange."""

    def __init__(self) -> None:
        self.answers: list[bytes] = []
        self.failures: list[tuple[str, bool]] = []

    def head(self, response: UpstreamResponse) -> bool:
        return True

    def done(self, response: UpstreamResponse) -> None:
        self.answers.append(response.buffered())

    def failed(self, error: UpstreamError, retryable: bool) -> None:
        self.failures.append((error.detail, retryable))


def test_bytes_a_backend_sends_before_our_request_has_left_are_no_answer() -> None:
    """A pooled connection is taken and its request head queued for the end of the pass; in the
    same pass, before the head is written, the backend's bytes arrive (as when both are in one
    epoll batch). They cannot answer a request the backend has not seen: the connection is
    dropped, the request is reported as never sent (retryable on a fresh connection), and the
    backend never receives it."""

    async def main() -> tuple[_Sink, list[bytes], bool]:
        heads: list[bytes] = []

        async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                heads.append(head.split(b" ")[1])
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

        server = await asyncio.start_server(backend, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool("v1", Origin.parse(f"http://127.0.0.1:{port}"), PoolLimits())
        try:
            first = await pool.request(b"GET", b"/warm", [])
            assert await first.read() == b"ok"
            conn = pool.take_idle()
            assert conn is not None
            sink = _Sink()
            conn.send_now(pool.head_for(b"GET", b"/second", [], True, b""), False, 5.0, sink)
            # the loop hands over the backend's early bytes in the pass that queued the head
            conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nPOISONED")
            await asyncio.sleep(0.1)
            return sink, heads, conn.closed
        finally:
            await pool.close()
            server.close()

    sink, heads, closed = asyncio.run(main())
    assert sink.answers == []
    assert sink.failures == [("backend answered before the request was sent", True)]
    assert closed
    assert heads == [b"/warm"]  # the queued head was dropped with the connection
