"""A hand-driven HTTP/2 backend (the ``h2`` library, server side, over plain sockets in threads)
that misbehaves on request: what a grpcio server never does, the proxy's upstream client must
still survive (a clear 502/504, a metric, no crash, no other client touched)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, DataReceived, RequestReceived, StreamEnded
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes

ANSWER = [(b":status", b"200"), (b"content-type", b"application/grpc")]
TRAILERS = [(b"grpc-status", b"0")]


class RawH2Server:
    """``mode`` says what each request gets: ok, big_headers, reset, refuse_first, goaway_first,
    goaway_then_answer, trailers_only, garbage, silent, slow (answers after ``delay``). ``max_streams`` is
    advertised in SETTINGS."""

    def __init__(self, mode: str = "ok", max_streams: int | None = None, delay: float = 0.0) -> None:
        self.mode = mode
        self.max_streams = max_streams
        self.delay = delay
        self.connections = 0
        self.requests = 0
        self.peak_streams = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._open: list[socket.socket] = []
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self._stopped = True
        self._sock.close()
        for conn in list(self._open):
            try:
                conn.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        h2.initiate_connection()
        if self.max_streams is not None:
            h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        lock = threading.Lock()
        sock.sendall(h2.data_to_send())
        open_streams: set[int] = set()
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                with lock:
                    events = h2.receive_data(data)
                    for event in events:
                        if isinstance(event, RequestReceived):
                            with self._lock:
                                self.requests += 1
                            open_streams.add(event.stream_id)
                            self.peak_streams = max(self.peak_streams, len(open_streams))
                        if isinstance(event, DataReceived):
                            h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        if isinstance(event, StreamEnded):  # the whole request is in: answer it
                            try:
                                self._answer(sock, h2, lock, event.stream_id, number, open_streams)
                            except ProtocolError:  # the proxy reset the stream (or closed) in the same read
                                open_streams.discard(event.stream_id)
                        if isinstance(event, ConnectionTerminated):
                            return
                    out = h2.data_to_send()
                if out:
                    sock.sendall(out)
        except OSError:
            return
        finally:
            sock.close()

    def _answer(self, sock: socket.socket, h2: H2Connection, lock: Any, stream_id: int, number: int,
                open_streams: set[int]) -> None:  # fmt: skip
        mode = self.mode
        if mode == "ok":
            self._ok(h2, stream_id)
        elif mode == "trailers_only":
            h2.send_headers(stream_id, [*ANSWER, *TRAILERS], end_stream=True)
        elif mode == "big_headers":
            h2.send_headers(stream_id, [*ANSWER, (b"x-big", b"a" * 100_000)])
        elif mode == "reset":
            h2.send_headers(stream_id, ANSWER)
            h2.send_data(stream_id, b"\0\0\0\0\x05hello")
            h2.reset_stream(stream_id, ErrorCodes.INTERNAL_ERROR)
        elif mode == "refuse_first" and stream_id == 1:
            h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
        elif mode == "goaway_first" and number == 1:
            h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=0)
        elif mode == "goaway_then_answer":
            # a graceful shutdown: GOAWAY naming this stream as processed, then its answer
            h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=stream_id)
            h2.state_machine.state = ConnectionState.SERVER_OPEN  # h2 would refuse to send after GOAWAY
            self._ok(h2, stream_id)
        elif mode == "garbage":
            sock.sendall(b"\x00\x00\x04\x09\x00\x00\x00\x00\x01junk")  # CONTINUATION out of place
        elif mode == "silent":
            pass
        elif mode == "slow":

            def later() -> None:
                time.sleep(self.delay)
                with lock:
                    with contextlib.suppress(ProtocolError):  # reset (or closed) while we slept
                        self._ok(h2, stream_id)
                    open_streams.discard(stream_id)
                    out = h2.data_to_send()
                try:
                    sock.sendall(out)
                except OSError:
                    pass

            threading.Thread(target=later, daemon=True).start()
            return
        else:
            self._ok(h2, stream_id)
        open_streams.discard(stream_id)

    @staticmethod
    def _ok(h2: H2Connection, stream_id: int) -> None:
        h2.send_headers(stream_id, ANSWER)
        h2.send_data(stream_id, b"\0\0\0\0\x05hello")
        h2.send_headers(stream_id, TRAILERS, end_stream=True)
