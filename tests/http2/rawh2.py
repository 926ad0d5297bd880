"""A raw HTTP/2 client for the tests: the ``h2`` library as the client state machine over a plain
socket, so a test controls every frame (windows, resets, pings, hostile sequences)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
from hyperframe.frame import Frame, HeadersFrame

Event = h2.events.Event


class RawH2:
    """One client connection. ``events`` keeps everything received; ``wait`` reads until a
    predicate over them holds (or the connection closes)."""

    def __init__(self, port: int, settings: dict[int, int] | None = None, validate: bool = True,
                 preface: bool = True) -> None:  # fmt: skip
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )  # fmt: skip
        self.conn = h2.connection.H2Connection(config)
        # h2 as a client closes its state machine on a GOAWAY, so the answers to streams the
        # GOAWAY lets finish would be refused here: this test client keeps reading them
        machine = self.conn.state_machine
        opened = h2.connection.ConnectionState.CLIENT_OPEN
        machine._transitions = {  # type: ignore[misc]
            **machine._transitions,
            (opened, h2.connection.ConnectionInputs.RECV_GOAWAY): (None, opened),
        }
        self.events: list[Event] = []
        # every frame the server sent, parsed apart from the client state machine (which drops
        # some, e.g. a RST_STREAM on a stream it closed)
        self.frames: list[Frame] = []
        self._inbound = bytearray()
        self._decoder = hpack.Decoder()  # the server's header blocks, decoded apart too
        self.heads: dict[int, list[list[tuple[bytes, bytes]]]] = {}
        self.closed = False
        self.data: dict[int, bytearray] = {}
        self.auto_ack = True  # credit DATA back as it arrives
        if preface:
            if settings:
                self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
            self.conn.initiate_connection()
            self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, path: str, method: str = "GET", headers: Iterable[tuple[str, str]] = (),
                end: bool = True, authority: str = "127.0.0.1") -> int:  # fmt: skip
        sid = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":path", path), (":scheme", "http"), (":authority", authority),
                  *headers]  # fmt: skip
        self.conn.send_headers(sid, [(n.encode(), v.encode()) for n, v in fields], end_stream=end)
        self.flush()
        return sid

    def read_once(self, timeout: float = 5.0) -> bool:
        """Read what arrives within ``timeout``; False when the connection is closed."""
        if self.closed:
            return False
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(1 << 20)
        except TimeoutError:
            return True
        except OSError:
            chunk = b""
        if not chunk:
            self.closed = True
            return False
        self._parse(chunk)
        try:
            events = self.conn.receive_data(chunk)
        except h2.exceptions.ProtocolError:
            events = []
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self.data.setdefault(event.stream_id, bytearray()).extend(event.data or b"")
                if self.auto_ack and event.flow_controlled_length:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.events.extend(events)
        try:
            self.flush()
        except OSError:
            self.closed = True
        return True

    def _parse(self, chunk: bytes) -> None:
        buffer = self._inbound
        buffer += chunk
        while len(buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(bytes(buffer[:9])))
            if len(buffer) < 9 + length:
                break
            frame.parse_body(memoryview(bytes(buffer[9 : 9 + length])))
            self.frames.append(frame)
            if isinstance(frame, HeadersFrame):  # our server sends no CONTINUATION
                try:
                    decoded = self._decoder.decode(frame.data, raw=True)
                except hpack.HPACKError:
                    decoded = []
                self.heads.setdefault(frame.stream_id, []).append([(bytes(n), bytes(v)) for n, v in decoded])
            del buffer[: 9 + length]

    def frames_of(self, kind: type[Any], sid: int | None = None) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind) and (sid is None or f.stream_id == sid)]

    def wait(self, predicate: Callable[[RawH2], Any], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = predicate(self)
            if found:
                return found
            if not self.read_once(min(0.2, max(0.01, deadline - time.monotonic()))):
                return predicate(self)
        return predicate(self)

    def of(self, kind: type[Any], sid: int | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind) and (sid is None or getattr(e, "stream_id", None) == sid)
        ]

    def ended(self, sid: int) -> bool:
        if self.of(h2.events.StreamEnded, sid) or self.of(h2.events.StreamReset, sid):
            return True
        return any(
            "END_STREAM" in f.flags for f in self.frames if f.stream_id == sid and f.type in (0, 1)
        ) or any(f.type == 3 for f in self.frames if f.stream_id == sid)

    def status(self, sid: int) -> int | None:
        for event in self.of(h2.events.ResponseReceived, sid):
            return int(dict(event.headers)[b":status"])
        for head in self.heads.get(sid, []):  # streams the client state machine does not know
            status = dict(head).get(b":status")
            if status is not None:
                return int(status)
        return None

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        found = self.of(h2.events.ConnectionTerminated)
        return found[0] if found else None

    def close(self) -> None:
        self.sock.close()
