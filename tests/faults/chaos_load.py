"""Chaos under load: a checksummed backend, a paced keep-alive load generator and its tallies.

Every body is checksummed end to end. A request carries the SHA-256 of its body
(``X-Body-Sha256``); the backend (:func:`backend_main`, run as ``python -m
tests.faults.chaos_load``) answers with ``X-Received-Sha256``/``X-Received-Length`` of what it
received, a deterministic body of the asked size (Content-Length or chunked) with its own
``X-Body-Sha256``, the request's id and its name. The client parses what the proxy writes with
httptools (llhttp: strict framing; h11 costs ten times the CPU, too much at 1,000 req/s beside
the proxy on two cores) and records, per request: status, whether the answer was complete and
correct, latency.

Outcomes: ``ok`` (200, every checksum right), ``error`` (a complete non-200 answer; ``clean`` when
it is a JSON error body), ``corrupt`` (complete by its framing but a checksum, a length or the id
is wrong, or bytes llhttp refuses: a silent truncation or a splice), ``cut`` (some of the answer,
then the connection closed), ``lost`` (the request was written on an open connection and the
connection closed before any byte of an answer) and ``timeout`` (no complete answer within the
client's timeout: a hang). A connection refused is no request (the proxy was not listening); the
worker tries again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import yaml

from tests.support import ROOT, Backend, ProxyProcess, wait_until

# --- the backend -----------------------------------------------------------------------------------

BLOCK_BYTES = 1 << 20
CHUNK = 16384


def answer_body(block: bytes, request_id: str, size: int) -> bytes:
    """``size`` bytes of ``block`` (cycled), starting at an offset given by the request id, so two
    requests of the same size get different bodies and a splice shows in the checksum."""
    if size <= 0:
        return b""
    offset = zlib.crc32(request_id.encode()) % BLOCK_BYTES
    if offset + size <= len(block):
        return block[offset : offset + size]
    repeats = (offset + size) // BLOCK_BYTES + 1
    return (block[:BLOCK_BYTES] * repeats)[offset : offset + size]


class _BackendConnection(asyncio.Protocol):
    """One connection to the chaos backend: llhttp parses the requests (pipelined ones too), each
    answer is written whole as its request completes, so answers keep the requests' order."""

    def __init__(self, name: str, block: bytes) -> None:
        import httptools

        self.name = name.encode()
        self.block = block
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.request_id = b""
        self.digest = hashlib.sha256()
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            self.transport.close()

    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-chaos-id":
            self.request_id = value

    def on_body(self, body: bytes) -> None:
        self.digest.update(body)
        self.received += len(body)

    def on_message_complete(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        query = dict(part.split(b"=", 1) for part in self.url.partition(b"?")[2].split(b"&") if b"=" in part)
        size = int(query.get(b"size", b"0"))
        chunked = query.get(b"chunked") == b"1"
        body = answer_body(self.block, self.request_id.decode("latin-1"), size)
        keep_alive = self.parser.should_keep_alive()
        head = [
            b"HTTP/1.1 200 OK",
            b"Content-Type: application/octet-stream",
            b"X-Chaos-Id: " + self.request_id,
            b"X-Received-Sha256: " + self.digest.hexdigest().encode(),
            b"X-Received-Length: %d" % self.received,
            b"X-Body-Sha256: " + hashlib.sha256(body).hexdigest().encode(),
            b"X-Backend: " + self.name,
        ]
        if not keep_alive:
            head.append(b"Connection: close")
        if chunked:
            head.append(b"Transfer-Encoding: chunked")
            parts = [b"\r\n".join(head) + b"\r\n\r\n"]
            for start in range(0, len(body), CHUNK):
                piece = body[start : start + CHUNK]
                parts.append(b"%x\r\n%s\r\n" % (len(piece), piece))
            parts.append(b"0\r\n\r\n")
            transport.write(b"".join(parts))
        else:
            head.append(b"Content-Length: %d" % len(body))
            transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        if not keep_alive:
            transport.close()


def backend_main() -> None:
    """``python -m tests.faults.chaos_load --name v1 --port 0 --port-file F``: the chaos backend
    (raw asyncio and llhttp on uvloop: a third of aiohttp's CPU per request, which the proxy
    needs more on two shared cores)."""
    import uvloop

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="v1")
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args()
    block = random.Random(args.name).randbytes(BLOCK_BYTES)
    block += block  # any answer up to BLOCK_BYTES is one slice

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _BackendConnection(args.name, block),
            "127.0.0.1",
            args.port,
            reuse_address=True,
            backlog=1024,
        )
        port = server.sockets[0].getsockname()[1]
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.port_file)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve())


class ChaosBackend(Backend):
    """The chaos backend in its own process; killed and started again on the same port."""

    def start(self) -> ChaosBackend:
        self.workdir.mkdir(parents=True, exist_ok=True)
        port_file = self.workdir / f"chaos-{self.name}-{os.getpid()}-{id(self)}.port"
        port_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.chaos_load", "--name", self.name, "--port", str(self.port),
             "--port-file", str(port_file)],
            cwd=ROOT,
        )  # fmt: skip
        wait_until(port_file.exists, timeout=15, message=f"chaos backend {self.name} start")
        self.port = int(port_file.read_text())
        return self


# --- the proxy, started in a second -------------------------------------------------------------
#
# Twenty graceful stops and starts of `strangler serve` cost twenty interpreter start-ups, 1.3 s of
# CPU each for the imports alone, 5-10 s each on two cores shared with other work. A zygote
# imports them once and forks one `strangler serve --config F` per start: the same command, the
# same signal handling and drain, in a fresh process, in well under a second.


def zygote_main() -> None:
    """``python -m tests.faults.chaos_load zygote``: for each line ``workdir<TAB>config<TAB>log`` on
    stdin, fork ``strangler serve --config config`` (in workdir, output to log) and answer
    ``pid N``; report ``exit N code`` when it ends. Children are killed when stdin closes."""
    import selectors

    import proxy.app  # noqa: F401 - the expensive imports, done once
    import proxy.cli
    import proxy.server  # noqa: F401

    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ)
    children: set[int] = set()
    out = sys.stdout
    while True:
        if selector.select(0.02):
            line = sys.stdin.readline()
            if not line:
                break
            workdir, config, log = line.rstrip("\n").split("\t")
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.chdir(workdir)
                    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    null = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(null, 0)
                    sys.argv = ["strangler", "serve", "--config", config]
                    proxy.cli.main()
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                except BaseException:  # noqa: BLE001 - reported in the log, exit code 1
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            children.add(pid)
            out.write(f"pid {pid}\n")
            out.flush()
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                out.write(f"exit {pid} {os.waitstatus_to_exitcode(status)}\n")
                out.flush()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


class Zygote:
    """The test's end of :func:`zygote_main`."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.chaos_load", "zygote"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env,
        )  # fmt: skip
        self._lock = threading.Condition()
        self._pids: list[int] = []
        self.exits: dict[int, int] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            kind, pid, *rest = line.split()
            with self._lock:
                if kind == "pid":
                    self._pids.append(int(pid))
                else:
                    self.exits[int(pid)] = int(rest[0])
                self._lock.notify_all()

    def fork(self, workdir: Path, config: Path, log: Path) -> ForkedProcess:
        assert self.process.stdin is not None
        with self._lock:
            self.process.stdin.write(f"{workdir}\t{config}\t{log}\n")
            self.process.stdin.flush()
            if not self._lock.wait_for(lambda: self._pids, 30):
                raise AssertionError("the zygote did not fork")
            return ForkedProcess(self, self._pids.pop())

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        with self._lock:
            self._lock.wait_for(lambda: pid in self.exits, timeout)
            return self.exits.get(pid)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ForkedProcess:
    """A child of the zygote, with the part of ``subprocess.Popen`` the proxy helpers use."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.zygote = zygote
        self.pid = pid
        self.args = ["strangler", "serve"]

    def poll(self) -> int | None:
        return self.zygote.exits.get(self.pid)

    def wait(self, timeout: float | None = None) -> int:
        code = self.zygote.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkedProxy(ProxyProcess):
    """``strangler serve`` forked by a :class:`Zygote`: a :class:`ProxyProcess` in every other way."""

    def __init__(self, zygote: Zygote, workdir: Path, settings: dict[str, Any]) -> None:
        super().__init__(workdir, settings)
        self.zygote = zygote

    def start(self, wait: bool = True) -> ForkedProxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / f"strangler-{self.port}.yaml"
        config.write_text(yaml.safe_dump(self.settings))
        self.process = self.zygote.fork(self.workdir, config, self.log_path)  # type: ignore[assignment]
        if wait:
            self.wait_ready()
        return self


# --- the load ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Record:
    """One request as the client saw it."""

    kind: str
    started: float
    ended: float
    outcome: str  # ok | error | corrupt | cut | lost | timeout
    status: int = 0
    version: str = ""  # X-Api-Version of the answer ("" without one)
    clean: bool = False  # an error answer with a JSON error body
    close: bool = False  # the answer said Connection: close
    detail: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    @property
    def failed(self) -> bool:
        return self.outcome != "ok"


@dataclass(slots=True)
class _Request:
    kind: str
    method: str
    size: int  # the answer's size
    chunked_answer: bool
    body: bytes | None
    chunked_body: bool


class _Connection(asyncio.Protocol):
    """One keep-alive client connection; answers parsed with httptools (llhttp, strict framing).

    ``send`` returns a future that ends as ``complete`` (a whole answer, framed by Content-Length
    or chunked), ``cut`` (the connection ended after some of the answer), ``lost`` (it ended
    before any byte of one) or ``corrupt`` (bytes llhttp refuses)."""

    def __init__(self) -> None:
        import httptools

        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.eof = False
        self.unsolicited = 0
        self.reusable = False
        self._waiter: asyncio.Future[str] | None = None
        self._reset()

    def _reset(self) -> None:
        self.received = 0
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.digest = hashlib.sha256()
        self.length = 0
        self.kept = bytearray()
        self.problem = ""

    def send(self, payload: bytes) -> asyncio.Future[str]:
        assert self.transport is not None
        self._reset()
        self.reusable = False
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        if self.eof:
            self._end("lost", "connection closed before the request")
        else:
            self.transport.write(payload)
        return waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _end(self, outcome: str, problem: str = "") -> None:
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            self.problem = problem
            waiter.set_result(outcome)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        import httptools

        if self._waiter is None:
            self.unsolicited += 1
            self.close()
            return
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._end("corrupt", f"unparsable answer: {exc}")
            self.close()

    def eof_received(self) -> bool:
        self._gone("connection closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone(f"connection lost ({exc!r})" if exc else "connection closed")

    def _gone(self, why: str) -> None:
        self.eof = True
        if self._waiter is not None:
            self._end("cut" if self.received else "lost", why)

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._waiter is None:  # a second answer in the packet of the first
            self.unsolicited += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.digest.update(body)
        self.length += len(body)
        if self.status != 200 and len(self.kept) < 65536:
            self.kept += body

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        self._end("complete")


# (weight, kind, method, answer sizes, chunked answer, body sizes or None, chunked body)
MIX: list[tuple[int, str, str, tuple[int, int], bool, tuple[int, int] | None, bool]] = [
    (50, "get_small", "GET", (0, 2048), False, None, False),
    (10, "get_medium", "GET", (2048, 65536), False, None, False),
    (5, "get_chunked", "GET", (0, 65536), True, None, False),
    (2, "get_large", "GET", (65536, 1 << 20), False, None, False),
    (2, "get_large_chunked", "GET", (65536, 1 << 20), True, None, False),
    (20, "post_small", "POST", (0, 2048), False, (0, 4096), False),
    (5, "post_large", "POST", (0, 2048), False, (4096, 256 * 1024), False),
    (3, "post_chunked", "POST", (0, 8192), False, (0, 256 * 1024), True),
    (3, "post_chunked_answer", "POST", (0, 65536), True, (0, 65536), False),
]
SMALL_MIX = [row for row in MIX if row[1] in ("get_small", "post_small", "get_chunked")]


class ChaosLoad:
    """``workers`` keep-alive connections to 127.0.0.1:``port``, sending back to back, paced to
    ``rate`` requests/s in all (None: as fast as they go), on a uvloop loop in a thread."""

    def __init__(
        self,
        port: int,
        rate: float | None = 1000.0,
        workers: int = 16,
        mix: Iterable[tuple[Any, ...]] = MIX,
        timeout: float = 10.0,
        seed: int = 23,
    ) -> None:
        self.port = port
        self.rate = rate
        self.workers = workers
        self.mix = list(mix)
        self.timeout = timeout
        self.seed = seed
        self.records: list[Record] = []
        self.refused = 0  # connection attempts refused (the proxy not listening): no request
        self.unsolicited = 0  # connections on which bytes came that no request asked for
        self.extras: dict[str, Any] = {}
        self._stop = False
        self._next = 0.0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._body_block = random.Random(seed).randbytes(BLOCK_BYTES)
        self._host = f"127.0.0.1:{port}".encode()

    # --- running -----------------------------------------------------------------------------------

    def start(self) -> ChaosLoad:
        ready = threading.Event()

        def run() -> None:
            import uvloop

            async def main() -> None:
                self._loop = asyncio.get_running_loop()
                ready.set()
                self._next = time.monotonic()
                tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]
                self._tasks = tasks
                await asyncio.gather(*tasks, return_exceptions=True)
                extras = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                await asyncio.gather(*extras, return_exceptions=True)

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main())

        self._thread = threading.Thread(target=run, name="chaos-load", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(self.timeout + 30)
            assert not self._thread.is_alive(), "the load did not stop"

    def spawn(self, coro_factory: Callable[[], Any]) -> None:
        """Run another client (slow uploader...) on the load's loop."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(coro_factory()))  # type: ignore[union-attr]

    # --- one worker --------------------------------------------------------------------------------

    async def _pace(self) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + 1.0 / self.rate
        if slot > now:
            await asyncio.sleep(slot - now)

    async def _connect(self) -> _Connection | None:
        loop = asyncio.get_running_loop()
        while not self._stop:
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(_Connection, "127.0.0.1", self.port), self.timeout
                )
                return conn
            except (ConnectionRefusedError, ConnectionResetError, TimeoutError):
                self.refused += 1
                await asyncio.sleep(0.02)
        return None

    def _pick(self, rng: random.Random) -> _Request:
        rows = self.mix
        weights = [row[0] for row in rows]
        _, kind, method, sizes, chunked_answer, body_sizes, chunked_body = rng.choices(rows, weights)[0]
        body = None
        if body_sizes is not None:
            length = rng.randint(*body_sizes)
            offset = rng.randint(0, BLOCK_BYTES - length)
            body = self._body_block[offset : offset + length]
        return _Request(kind, method, rng.randint(*sizes), chunked_answer, body, chunked_body)

    async def _worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        conn: _Connection | None = None
        seq = 0
        while not self._stop:
            await self._pace()
            if conn is not None and (conn.eof or conn.unsolicited):
                # the proxy closed it while idle (no request was sent on it), or sent bytes nobody
                # asked for (counted: a second answer is a splice)
                self.unsolicited += conn.unsolicited
                conn.close()
                conn = None
            if conn is None:
                conn = await self._connect()
                if conn is None:
                    return
            seq += 1
            record = await self._exchange(conn, self._pick(rng), f"w{index}-{seq}", rng)
            self.records.append(record)
            if not conn.reusable:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _payload(self, request: _Request, request_id: str, sent_sha: str, rng: random.Random) -> bytes:
        target = b"/c/%s?size=%d&chunked=%d" % (request.kind.encode(), request.size, request.chunked_answer)
        head = [
            b"%s %s HTTP/1.1" % (request.method.encode(), target),
            b"Host: " + self._host,
            b"X-Chaos-Id: " + request_id.encode(),
            b"X-User-ID: user-%d" % rng.randrange(1 << 30),
            b"X-Body-Sha256: " + sent_sha.encode(),
        ]
        body = request.body
        if body is None:
            return b"\r\n".join(head) + b"\r\n\r\n"
        if not request.chunked_body:
            head.append(b"Content-Length: %d" % len(body))
            return b"\r\n".join(head) + b"\r\n\r\n" + body
        head.append(b"Transfer-Encoding: chunked")
        parts = [b"\r\n".join(head) + b"\r\n\r\n"]
        start = 0
        while start < len(body):
            piece = body[start : start + rng.randint(1, 65536)]
            parts.append(b"%x\r\n%s\r\n" % (len(piece), piece))
            start += len(piece)
        parts.append(b"0\r\n\r\n")
        return b"".join(parts)

    async def _exchange(
        self, conn: _Connection, request: _Request, request_id: str, rng: random.Random
    ) -> Record:
        sent_sha = hashlib.sha256(request.body or b"").hexdigest()
        payload = self._payload(request, request_id, sent_sha, rng)
        started = time.monotonic()
        record = Record(request.kind, started, started, "timeout")
        answer = conn.send(payload)
        try:
            async with asyncio.timeout(self.timeout):
                await answer
        except TimeoutError:
            record.ended = time.monotonic()
            record.detail = f"no complete answer in {self.timeout}s ({conn.received} bytes)"
            conn.reusable = False
            return record
        record.ended = time.monotonic()
        outcome = answer.result()
        record.status = conn.status
        if outcome != "complete":
            record.outcome = outcome
            record.detail = f"{conn.problem} after {conn.received} bytes"
            conn.reusable = False
            return record
        headers = conn.headers
        record.version = headers.get(b"x-api-version", b"").decode()
        record.close = not conn.reusable
        if conn.status != 200:
            record.outcome = "error"
            record.clean = _clean_error(headers, bytes(conn.kept))
            record.detail = bytes(conn.kept[:200]).decode("latin-1")
            return record
        problems = []
        if headers.get(b"x-chaos-id", b"").decode() != request_id:
            problems.append(f"answer of {headers.get(b'x-chaos-id')!r}")
        if headers.get(b"x-received-sha256", b"").decode() != sent_sha:
            problems.append(f"backend received other bytes ({headers.get(b'x-received-length')!r})")
        if conn.length != request.size:
            problems.append(f"{conn.length} bytes of {request.size}")
        if headers.get(b"x-body-sha256", b"").decode() != conn.digest.hexdigest():
            problems.append("answer checksum")
        record.outcome = "corrupt" if problems else "ok"
        record.detail = "; ".join(problems)
        if not problems and record.version != headers.get(b"x-backend", b"").decode():
            record.detail = f"labelled {record.version!r}, served by {headers.get(b'x-backend')!r}"
        return record

    # --- tallies -----------------------------------------------------------------------------------

    def between(self, start: float, end: float) -> list[Record]:
        """Requests that started in [start, end)."""
        return [r for r in self.records if start <= r.started < end]

    def in_flight(self, at_start: float, at_end: float) -> list[Record]:
        """Requests started before ``at_end`` and still open at ``at_start``."""
        return [r for r in self.records if r.started < at_end and r.ended > at_start]


def _clean_error(headers: dict[bytes, bytes], body: bytes) -> bool:
    if not headers.get(b"content-type", b"").startswith(b"application/json"):
        return False
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and "error" in parsed


@dataclass
class Tally:
    """Counts of a set of requests, for asserts and the one-line summaries."""

    records: list[Record]
    seconds: float = 0.0
    by_outcome: dict[str, int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for r in self.records:
            self.by_outcome[r.outcome] = self.by_outcome.get(r.outcome, 0) + 1
            if r.outcome in ("ok", "error"):
                self.statuses[r.status] = self.statuses.get(r.status, 0) + 1

    def count(self, outcome: str) -> int:
        return self.by_outcome.get(outcome, 0)

    @property
    def sent(self) -> int:
        return len(self.records)

    @property
    def failed(self) -> int:
        return self.sent - self.count("ok")

    def percentile(self, q: float) -> float:
        ordered = sorted(r.seconds for r in self.records)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    def line(self, name: str) -> str:
        rate = f" {self.sent / self.seconds:.0f} req/s" if self.seconds else ""
        errors = ",".join(f"{s}x{n}" for s, n in sorted(self.statuses.items()) if s != 200) or "-"
        unclean = sum(1 for r in self.records if r.outcome == "error" and not r.clean)
        return (f"{name}: sent={self.sent}{rate} ok={self.count('ok')} failed={self.failed} "
                f"(errors={self.count('error')} [{errors}] unclean={unclean} cut={self.count('cut')} "
                f"lost={self.count('lost')} timeout={self.count('timeout')}) corrupt={self.count('corrupt')} "
                f"p50={self.percentile(0.5) * 1000:.1f}ms p99={self.percentile(0.99) * 1000:.1f}ms "
                f"max={self.percentile(1.0) * 1000:.0f}ms")  # fmt: skip


# --- the two odd clients ------------------------------------------------------------------------


async def slow_upload(
    port: int, result: dict[str, Any], total: int = 98304, first: int = 65537, step: int = 200,
    every: float = 0.5, give_up: float = 30.0, headers: bytes = b"",
) -> None:  # fmt: skip
    """A slow upload (the minimum upload rate's case): ``first`` bytes at once, then ``step`` bytes
    every ``every`` s (400 B/s), until an answer comes or ``give_up`` s pass. ``result``: status,
    seconds, body."""
    started = time.monotonic()
    result.update(status=0, seconds=0.0, body="", error="")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        result["error"] = repr(exc)
        return
    head = (b"POST /c/slow_upload?size=10 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Chaos-Id: slow\r\n"
            b"Content-Length: %d\r\n%s\r\n") % (total, headers)  # fmt: skip
    writer.write(head + b"s" * first)
    sent = first

    async def trickle() -> None:
        nonlocal sent
        with_errors = (ConnectionError, RuntimeError)
        try:
            while sent < total:
                await asyncio.sleep(every)
                writer.write(b"s" * min(step, total - sent))
                sent += min(step, total - sent)
        except with_errors:
            pass

    feeder = asyncio.create_task(trickle())
    h = h11.Connection(h11.CLIENT)
    h.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", str(total))]))
    body = bytearray()
    try:
        async with asyncio.timeout(give_up):
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    h.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    result["status"] = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
    except (TimeoutError, h11.RemoteProtocolError, ConnectionError) as exc:
        result["error"] = repr(exc)
    finally:
        feeder.cancel()
        writer.close()
    result["seconds"] = time.monotonic() - started
    result["body"] = bytes(body[:300]).decode("latin-1")
    result["sent"] = sent


class NeverReader:
    """A client that asks for big answers and never reads them (a 4 KiB receive buffer)."""

    def __init__(self, port: int, size: int = 8 << 20, requests: int = 4, headers: bytes = b"") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        self.local_port = self.sock.getsockname()[1]
        self.sent_at = time.monotonic()
        one = (b"GET /c/never_read?size=%d&chunked=0 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Chaos-Id: nr\r\n%s\r\n"
               % (size, headers))  # fmt: skip
        self.sock.sendall(one * requests)

    def held_by(self, pid: int) -> bool:
        """Whether process ``pid`` (or a child) still has this connection open."""
        import psutil

        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            for conn in proc.net_connections(kind="tcp"):
                if (
                    conn.raddr
                    and conn.raddr.port == self.local_port
                    and conn.status == psutil.CONN_ESTABLISHED
                ):
                    return True
        return False

    def close(self) -> None:
        self.sock.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["zygote"]:
        zygote_main()
    else:
        backend_main()
