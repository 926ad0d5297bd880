"""The upstream connection's states (proxy/edge/client.py ``State``, ``_Connection._to``), its
one reuse test and the retry policy, against real asyncio backends on 127.0.0.1.

The proxy-level cases (a real proxy in front of raw backends) are in
tests/hostile/test_upstream_lifecycle.py; these pin the client's own rules.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.edge.client import Origin, PoolLimits, UpstreamPool, UpstreamResponse, retry_allowed
from proxy.edge.errors import UpstreamError, UpstreamProtocolError, UpstreamTimeout
from proxy.edge.states import CLOSED, DONE, IDLE, SEND_BODY, SEND_RESPONSE, ImpossibleTransition

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


class Backend:
    """A keep-alive backend: ``handler(reader, writer, n)`` serves the n-th request of a
    connection (its head already read into ``heads``) and says whether to go on."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.heads: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Backend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    def pool(self, **limits: float) -> UpstreamPool:
        limits.setdefault("strict_states", True)
        return UpstreamPool("v1", Origin.parse(f"http://127.0.0.1:{self.port}"), PoolLimits(**limits))  # type: ignore[arg-type]

    def requests(self, line: bytes) -> int:
        return sum(1 for head in self.heads if head.startswith(line))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.heads.append(head)
                if not await self.handler(reader, writer, n):
                    return
                n += 1
        finally:
            writer.close()


def declared(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


async def body_of(reader: asyncio.StreamReader, head: bytes) -> bytes:
    return await reader.readexactly(declared(head))


async def chunks(*parts: bytes, pause: float = 0.0) -> AsyncIterator[bytes]:
    for part in parts:
        if pause:
            await asyncio.sleep(pause)
        yield part


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


# --- the table -----------------------------------------------------------------------------------


def test_an_exchange_walks_the_table_and_a_complete_one_is_reused() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(OK)
        return True

    async def main() -> None:
        async with Backend(serve) as backend:
            pool = backend.pool()
            response = await pool.request(b"GET", b"/a", [])
            assert await response.read() == b"ok"
            (conn,) = pool._idle
            assert (conn.ours, conn.theirs) == (IDLE, IDLE)
            for _ in range(3):
                response = await pool.request(b"GET", b"/b", [])
                await response.read()
            assert backend.connections == 1
            await pool.close()

    run(main)


def test_an_impossible_transition_raises_in_tests() -> None:
    """With ``strict_states`` (every test proxy) the table is strict: a bug is an exception."""

    async def main() -> None:
        async with Backend(lambda r, w, n: asyncio.sleep(0, True)) as backend:
            pool = backend.pool()
            conn = await pool._connect()
            with pytest.raises(ImpossibleTransition, match=r"\(IDLE, IDLE\) cannot become \(DONE, DONE\)"):
                conn._to(DONE, DONE)  # an answer nobody asked for cannot complete an exchange
            with pytest.raises(ImpossibleTransition):
                conn._to(SEND_BODY, SEND_BODY)
            assert (conn.ours, conn.theirs) == (IDLE, IDLE)  # unchanged
            conn.abort()
            assert (conn.ours, conn.theirs) == (CLOSED, CLOSED)
            with pytest.raises(ImpossibleTransition):
                conn._to(DONE, SEND_RESPONSE)  # nothing leaves CLOSED
            await pool.close()

    run(main)


def test_in_production_an_impossible_transition_drops_the_connection_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with Backend(lambda r, w, n: asyncio.sleep(0, True)) as backend:
            pool = backend.pool(strict_states=False)
            conn = await pool._connect()
            future: asyncio.Future[UpstreamResponse] = asyncio.get_running_loop().create_future()
            conn._begin(False, 5.0, future, None)
            conn._to(DONE, SEND_RESPONSE)
            with caplog.at_level(logging.ERROR, logger="strangler.edge"):
                conn._to(DONE, DONE)  # skipped SEND_BODY: impossible
            assert conn.closed
            assert pool.open_connections == 0
            with pytest.raises(UpstreamProtocolError, match="connection state error"):
                await future
            await pool.close()

    run(main)
    lines = [r for r in caplog.records if r.name == "strangler.edge"]
    assert len(lines) == 1
    assert "(DONE, SEND_RESPONSE) cannot become (DONE, DONE)" in lines[0].getMessage()


def test_a_must_close_answer_closes_the_connection() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
        return True

    async def main() -> None:
        async with Backend(serve) as backend:
            pool = backend.pool()
            response = await pool.request(b"GET", b"/a", [])
            conn = response._conn
            assert await response.read() == b"ok"
            assert pool.open_connections == 0 and pool._idle == []
            if conn is not None:  # the answer was still arriving when its head was handed over
                assert (conn.ours, conn.theirs) == (CLOSED, CLOSED)
            await pool.close()

    run(main)


# --- an early answer --------------------------------------------------------------------------------


def test_an_answer_complete_before_the_request_body_closes_the_connection() -> None:
    """The backend answers on the head and drains the body later. The answer is delivered; the
    connection, with the upload unfinished, is never handed to the next request."""
    drained: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(OK)
        try:
            drained.append(await reader.read(1 << 20))
        except ConnectionError:
            pass
        return True

    async def main() -> None:
        async with Backend(serve) as backend:
            pool = backend.pool()
            response = await pool.request(
                b"POST", b"/early", [], chunks(b"x" * 1000, b"y" * 1000, pause=0.2), content_length=2000
            )
            assert await response.read() == b"ok"
            await asyncio.sleep(0.1)
            assert pool._idle == [] and pool.open_connections == 0  # closed, not pooled
            second = await pool.request(b"GET", b"/next", [])
            assert await second.read() == b"ok"
            assert backend.connections == 2
            await pool.close()

    run(main)
    assert all(b"GET" not in body for body in drained)


def test_an_early_head_does_not_stop_the_upload_and_the_connection_is_reused_after_both() -> None:
    """Full duplex: the answer's head comes first, its body after the whole request (an echo)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        head = backend.heads[-1]
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % declared(head))
        writer.write(await body_of(reader, head))
        return True

    backend = Backend(serve)

    async def main() -> None:
        async with backend:
            pool = backend.pool()
            response = await pool.request(
                b"POST", b"/echo", [], chunks(b"a" * 3000, b"b" * 3000, pause=0.1), content_length=6000
            )
            assert await response.read() == b"a" * 3000 + b"b" * 3000
            await asyncio.sleep(0.05)
            assert len(pool._idle) == 1
            again = await pool.request(b"GET", b"/again", [], content_length=0)
            assert again.status == 200
            assert backend.connections == 1
            await pool.close()

    run(main)


# --- the retry policy ------------------------------------------------------------------------------------


def test_retry_allowed_follows_rfc_9110() -> None:
    for method in (b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"):
        assert retry_allowed(method, False)
    for method in (b"POST", b"PATCH", b"CONNECT", b"LOCK"):
        assert not retry_allowed(method, False)
        assert retry_allowed(method, True)  # nothing of it was written


async def drop_after_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
    """Answers the first request of a connection; closes on any later one without an answer."""
    if n == 0:
        writer.write(OK)
        return True
    return False


async def warmed(backend: Backend, idle: int) -> UpstreamPool:
    pool = backend.pool()
    responses = await asyncio.gather(*(pool.request(b"GET", b"/warm", []) for _ in range(idle)))
    for response in responses:
        await response.read()
    assert backend.connections == idle and len(pool._idle) == idle
    return pool


@pytest.mark.parametrize("idle", [1, 3])
def test_a_post_is_never_sent_twice(idle: int) -> None:
    async def main() -> None:
        async with Backend(drop_after_first) as backend:
            pool = await warmed(backend, idle)
            with pytest.raises(UpstreamProtocolError, match="without an answer"):
                await pool.request(b"POST", b"/pay", [], b"amount=1")
            assert backend.requests(b"POST /pay ") == 1
            await pool.close()

    run(main)


@pytest.mark.parametrize("idle", [1, 3])
def test_an_idempotent_request_goes_once_more_on_a_new_connection(idle: int) -> None:
    async def main() -> None:
        async with Backend(drop_after_first) as backend:
            pool = await warmed(backend, idle)
            response = await pool.request(b"DELETE", b"/doc", [])
            assert await response.read() == b"ok"
            assert backend.requests(b"DELETE /doc ") == 2
            assert backend.connections == idle + 1  # a new one, not another idle pooled one
            await pool.close()

    run(main)


def test_a_streamed_body_is_not_sent_again() -> None:
    async def main() -> None:
        async with Backend(drop_after_first) as backend:
            pool = await warmed(backend, 1)
            with pytest.raises(UpstreamError):
                await pool.request(b"PUT", b"/big", [], chunks(b"x" * 100), content_length=100)
            assert backend.requests(b"PUT /big ") == 1
            await pool.close()

    run(main)


def test_a_fresh_request_takes_no_idle_connection_and_is_not_retried() -> None:
    async def main() -> None:
        async with Backend(drop_after_first) as backend:
            pool = await warmed(backend, 2)
            response = await pool.request(b"GET", b"/fresh", [], fresh=True)
            assert await response.read() == b"ok"
            assert backend.connections == 3
            await pool.close()

    run(main)


def test_a_fresh_request_on_a_full_pool_replaces_an_idle_connection() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(OK)
        return True

    async def main() -> None:
        async with Backend(serve) as backend:
            pool = backend.pool(size=1)
            await (await pool.request(b"GET", b"/a", [])).read()
            response = await pool.request(b"GET", b"/b", [], fresh=True)
            assert await response.read() == b"ok"
            assert backend.connections == 2
            assert pool.open_connections == 1
            await pool.close()

    run(main)


class _Sink:
    def __init__(self) -> None:
        self.failures: list[tuple[str, bool]] = []
        self.answers: list[bytes] = []
        self.ended = asyncio.Event()

    def head(self, response: UpstreamResponse) -> bool:
        return True

    def done(self, response: UpstreamResponse) -> None:
        self.answers.append(response.buffered())
        self.ended.set()

    def failed(self, error: UpstreamError, retryable: bool) -> None:
        self.failures.append((error.detail, retryable))
        self.ended.set()


@pytest.mark.parametrize(("method", "retryable"), [(b"GET", True), (b"POST", False)])
def test_the_fast_path_retry_follows_the_method(method: bytes, retryable: bool) -> None:
    """``send_now`` on a reused connection the backend closes without answering: the sink may
    resend a GET (on a new connection), never a POST."""

    async def main() -> None:
        async with Backend(drop_after_first) as backend:
            pool = await warmed(backend, 1)
            conn = pool.take_idle()
            assert conn is not None
            sink = _Sink()
            conn.send_now(pool.head_for(method, b"/x", [], True, b"content-length: 0\r\n"), False, 5.0, sink)
            await asyncio.wait_for(sink.ended.wait(), 5)
            assert sink.failures == [("backend closed the connection without an answer", retryable)]
            await pool.close()

    run(main)


def test_a_request_never_written_may_go_again_whatever_its_method() -> None:
    """Bytes from the backend before our request head left the write batch: the POST was never
    sent, so the sink may send it on a new connection."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(OK)
        return True

    async def main() -> None:
        async with Backend(serve) as backend:
            pool = backend.pool()
            await (await pool.request(b"GET", b"/warm", [])).read()
            conn = pool.take_idle()
            assert conn is not None
            sink = _Sink()
            conn.send_now(
                pool.head_for(b"POST", b"/pay", [], True, b"content-length: 0\r\n"), False, 5.0, sink
            )
            conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nPOISONED")
            assert sink.failures == [("backend answered before the request was sent", True)]
            await asyncio.sleep(0.1)
            assert backend.requests(b"POST") == 0
            await pool.close()

    run(main)


# --- the answer head limit ----------------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
def test_an_answer_head_over_the_limit_is_refused(split: bool) -> None:
    """One packet (the head is measured when complete) or many (measured as it arrives)."""
    head = b"HTTP/1.1 200 OK\r\nx-big: " + b"b" * 3000 + b"\r\ncontent-length: 2\r\n\r\nok"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if split:
            for at in range(0, len(head), 500):
                writer.write(head[at : at + 500])
                await writer.drain()
                await asyncio.sleep(0.01)
        else:
            writer.write(head)
        return True

    async def main() -> None:
        async with Backend(serve) as backend:
            pool = backend.pool(max_head_bytes=2048)
            with pytest.raises(UpstreamProtocolError, match="max_response_head_bytes"):
                await pool.request(b"GET", b"/big", [])
            assert pool.open_connections == 0
            big = backend.pool(max_head_bytes=4096)
            assert await (await big.request(b"GET", b"/big", [])).read() == b"ok"
            await pool.close()
            await big.close()

    run(main)


# --- the read deadline and the send timeout --------------------------------------------------------------


def test_the_read_deadline_waits_for_the_whole_request() -> None:
    """A body that takes 1.2 s to come (a slow client) under a 0.5 s read timeout: the backend
    answers once it has all of it, and that is in time."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        await body_of(reader, backend.heads[-1])
        writer.write(OK)
        return True

    backend = Backend(serve)

    async def main() -> None:
        async with backend:
            pool = backend.pool(read_timeout=0.5)
            parts = [b"x" * 100] * 4
            response = await pool.request(b"POST", b"/up", [], chunks(*parts, pause=0.3), content_length=400)
            assert await response.read() == b"ok"
            await pool.close()

    run(main)


def test_a_backend_that_never_reads_the_body_is_a_send_timeout() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        await asyncio.sleep(30)  # reads nothing more
        return False

    async def main() -> None:
        async with Backend(serve) as backend:
            pool = backend.pool(read_timeout=0.5)
            big = [b"x" * (1 << 20)] * 256
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(UpstreamTimeout, match="send timeout"):
                await pool.request(b"POST", b"/up", [], chunks(*big), content_length=len(big) << 20)
            assert loop.time() - started < 10
            assert pool.open_connections == 0
            await pool.close()

    run(main)
