"""The scripted backend of the differential test: two listeners (the proxy's v1 and v2), a thread
per connection, every request parsed with h11 (strict, independent of the proxy's llhttp) and
recorded, every answer played from a script the test registered under the request's ``x-diff-id``.

Anything the proxy sends that h11 refuses is a finding (``problems``). Answers are written as raw
bytes (h11 would choose the framing itself): Content-Length, chunked or close-delimited, optional
1xx interim answers first, optionally before the request body has been read (then the body is
drained), optionally with a pause mid-body.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from dataclasses import dataclass, field

import h11

from tests.differential.spec import Answer, answer_body, answer_headers

READ_SIZE = 262144
REASONS = {100: b"Continue", 103: b"Early Hints", 200: b"OK", 201: b"Created", 204: b"No Content",
           304: b"Not Modified", 404: b"Not Found", 500: b"Internal Server Error"}  # fmt: skip


@dataclass
class Delivery:
    """One request as the backend received it."""

    seq: int  # arrival order over both listeners
    version: str  # the listener it came on: v1 or v2
    conn: int  # the backend connection it came on
    nth: int  # its position on that connection (0: the first request)
    method: str
    target: str
    headers: list[tuple[str, str]]  # names lower-case (h11), in order
    diff_id: str | None
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False  # the whole body arrived (h11 EndOfMessage)
    answered: bool = False  # our whole answer was written


class ScriptedBackend:
    def __init__(self) -> None:
        self.scripts: dict[str, Answer] = {}
        self.problems: list[str] = []
        self._log: list[Delivery] = []
        self._taken = 0
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._conn_ids = itertools.count()
        # connections between the first byte of a request and the end of its exchange: the id of
        # the request they serve (None until its head is read)
        self._busy: dict[int, str | None] = {}
        self._stopping = False
        self._open: set[socket.socket] = set()
        self.listeners: dict[str, socket.socket] = {}
        for version in ("v1", "v2"):
            sock = socket.create_server(("127.0.0.1", 0), backlog=256)
            self.listeners[version] = sock
            threading.Thread(target=self._accept, args=(version, sock), daemon=True).start()

    def url(self, version: str) -> str:
        return f"http://127.0.0.1:{self.listeners[version].getsockname()[1]}"

    def host(self, version: str) -> str:
        return f"127.0.0.1:{self.listeners[version].getsockname()[1]}"

    # --- what arrived ----------------------------------------------------------------------------

    def take(self) -> list[Delivery]:
        """Deliveries that arrived since the last call, in arrival order."""
        with self._lock:
            new = self._log[self._taken :]
            self._taken = len(self._log)
            return new

    def take_problems(self) -> list[str]:
        with self._lock:
            problems, self.problems = self.problems, []
            return problems

    def wait_quiet(self, ids: set[str], timeout: float) -> bool:
        """True once no connection is inside the exchange of one of ``ids`` or inside a request head
        (the proxy finished or dropped them all). A connection an earlier session left stuck does
        not count against this one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not any(current is None or current in ids for current in self._busy.values()):
                    return True
            time.sleep(0.005)
        return False

    def stop(self) -> None:
        self._stopping = True
        for sock in self.listeners.values():
            sock.close()
        with self._lock:
            for conn in list(self._open):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # --- serving ---------------------------------------------------------------------------------

    def _accept(self, version: str, listener: socket.socket) -> None:
        while not self._stopping:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._open.add(conn)
            number = next(self._conn_ids)
            threading.Thread(target=self._serve, args=(version, number, conn), daemon=True).start()

    def _problem(self, text: str) -> None:
        with self._lock:
            self.problems.append(text)

    def _serve(self, version: str, number: int, sock: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER)
        busy = False
        nth = 0
        eof = False

        def event() -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
            nonlocal busy, eof
            while True:
                ev = conn.next_event()
                if ev is not h11.NEED_DATA:
                    return ev
                if eof:
                    return h11.ConnectionClosed()
                try:
                    data = sock.recv(READ_SIZE)
                except OSError:
                    data = b""
                if not data:
                    eof = True
                elif not busy:
                    busy = True
                    with self._lock:
                        self._busy[number] = None
                conn.receive_data(data)

        try:
            while True:
                try:
                    ev = event()
                except h11.RemoteProtocolError as exc:
                    if conn.their_state is h11.SEND_BODY and eof:
                        return  # the proxy aborted an upload: recorded as incomplete
                    self._problem(f"{version} connection {number}: h11 refused what the proxy sent: {exc}")
                    return
                if isinstance(ev, h11.ConnectionClosed) or ev is h11.PAUSED:
                    return
                if not isinstance(ev, h11.Request):
                    self._problem(f"{version} connection {number}: unexpected {ev!r}")
                    return
                busy = True
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in ev.headers]
                diff_id = next((v for k, v in headers if k == "x-diff-id"), None)
                with self._lock:
                    delivery = Delivery(next(self._seq), version, number, nth, ev.method.decode(),
                                        ev.target.decode("latin-1"), headers, diff_id)  # fmt: skip
                    self._log.append(delivery)
                    self._busy[number] = diff_id or ""
                nth += 1
                script = self.scripts.get(diff_id or "")
                if script is None:
                    self._problem(f"{version} connection {number}: a request nobody sent: {ev.method!r} "
                                  f"{ev.target!r} x-diff-id={diff_id!r}")  # fmt: skip
                    return
                if script.early and not script.drop:
                    if not self._answer(sock, conn, script, delivery):
                        return
                # the request body (drained after an early answer)
                while True:
                    try:
                        ev = event()
                    except h11.RemoteProtocolError as exc:
                        if eof:
                            return  # cut mid-body by the proxy: delivery.complete stays False
                        self._problem(f"{version} connection {number}: h11 refused the request body: {exc}")
                        return
                    if isinstance(ev, h11.Data):
                        delivery.body += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        delivery.complete = True
                        break
                    else:
                        return  # closed
                if script.drop:
                    return
                if not script.early:
                    if not self._answer(sock, conn, script, delivery):
                        return
                if conn.our_state is h11.MUST_CLOSE or script.framing == "close" or script.close:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError as exc:
                    self._problem(f"{version} connection {number}: cannot reuse: {exc}")
                    return
                busy = bool(conn.trailing_data[0])  # the next request may have begun already
                with self._lock:
                    if busy:
                        self._busy[number] = None
                    else:
                        self._busy.pop(number, None)
        finally:
            with self._lock:
                self._busy.pop(number, None)
                self._open.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def _answer(self, sock: socket.socket, conn: h11.Connection, script: Answer, delivery: Delivery) -> bool:
        """Write the scripted answer (raw bytes); tell h11 the same in events it accepts (its own
        output is dropped: we choose the framing). False if the proxy went away meanwhile."""
        head_only = delivery.method == "HEAD"
        status = script.status
        diff_id = delivery.diff_id or ""
        parts = []
        for interim in script.interim:
            parts.append(
                b"HTTP/1.1 %d %s\r\nx-diff-interim: %d\r\n\r\n" % (interim, REASONS[interim], interim)
            )
        head = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status])]
        for name, value in answer_headers(script, diff_id, head_only):
            head.append(b"%s: %s\r\n" % (name.encode(), value.encode()))
        head.append(b"\r\n")
        parts.append(b"".join(head))
        body = b"" if head_only or status in (204, 304) else answer_body(diff_id, script.size)
        if body:
            if script.framing == "chunked":
                step = max(1, script.chunk)
                parts += (b"%x\r\n%s\r\n" % (len(body[i : i + step]), body[i : i + step])
                          for i in range(0, len(body), step))  # fmt: skip
                parts.append(b"0\r\n\r\n")
            else:
                parts.append(body)
        elif script.framing == "chunked" and not head_only and status not in (204, 304):
            parts.append(b"0\r\n\r\n")
        data = b"".join(parts)
        try:
            if script.pause_ms and script.pause_at is not None:
                cut = min(len(data), len(data) - len(body) + script.pause_at)
                sock.sendall(data[:cut])
                time.sleep(script.pause_ms / 1000)
                sock.sendall(data[cut:])
            else:
                sock.sendall(data)
        except OSError:
            return False
        delivery.answered = True
        closing = script.framing == "close" or script.close
        conn.send(h11.Response(status_code=status, headers=[("connection", "close")] if closing else []))
        conn.send(h11.EndOfMessage())
        return True
