#!/usr/bin/env python3
"""What the ``h2`` library costs per unary gRPC request, in memory, against httptools parsing the
same request as HTTP/1.1: the figure that decides whether the proxy needs its own HTTP/2 framing
and HPACK (compiled with mypyc, as the HTTP/1.1 edge is) or can keep ``h2`` on the request path.

No sockets and no event loop: two ``H2Connection`` objects hand each other their bytes. Only the
side under test is timed:

- server: receive HEADERS + DATA (events, HPACK decoding, flow-control credit given back), send
  HEADERS + DATA + trailers (HPACK encoding, framing) and take the bytes (``data_to_send``); also the
  WINDOW_UPDATE and SETTINGS frames the client sends back. What our listener pays per call.
- client: the same call from the other end (send HEADERS + DATA, receive HEADERS + DATA +
  trailers): what the upstream pool pays per call to an h2 backend.
- httptools: parse the request as HTTP/1.1 (the callbacks our server sets: url, each header,
  headers complete, body, message complete), and the answer as the upstream client does; then
  the same plus writing the answer's bytes.
- hpack alone: decode the request's header block, encode the answer's headers and trailers (the
  share of the h2 figures a faster HPACK could save).

``--batch`` requests arrive in one read (1: one call in flight per connection; 16: many streams
multiplexed, as h2load -m sends them). Best of ``--repeat`` short runs (on a shared machine the
best of many short runs finds its quiet moments); microseconds per request and the rate one core
could sustain at that cost alone.

    scripts/h2_cost.py                 # batch 1 and 16, 5,000 calls per run, best of 9
    scripts/h2_cost.py --requests 5000 --repeat 3 --batch 1
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402
import h2.settings  # noqa: E402
import hpack  # noqa: E402
import httptools  # noqa: E402

from proxy.bench_grpc import GRPC_PATH, GRPC_REQUEST, grpc_answer  # noqa: E402

# What grpcio's Python client sends for a unary call (its own user-agent and encodings).
REQUEST_HEADERS: list[tuple[bytes, bytes]] = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", GRPC_PATH.encode()),
    (b":authority", b"127.0.0.1:8080"),
    (b"te", b"trailers"),
    (b"content-type", b"application/grpc"),
    (b"user-agent", b"grpc-python/1.76.0 grpc-c/51.0.0 (linux; chttp2)"),
    (b"grpc-accept-encoding", b"identity, deflate, gzip"),
    (b"grpc-timeout", b"4999m"),
]
ANSWER = grpc_answer("v1")
ANSWER_HEADERS: list[tuple[bytes, bytes]] = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", b"identity, deflate, gzip"),
]
TRAILERS: list[tuple[bytes, bytes]] = [(b"grpc-status", b"0")]

# The same call as HTTP/1.1 (the headers a proxy would forward, content-length for the body).
H1_REQUEST = (
    b"POST " + GRPC_PATH.encode() + b" HTTP/1.1\r\nhost: 127.0.0.1:8080\r\nte: trailers\r\n"
    b"content-type: application/grpc\r\nuser-agent: grpc-python/1.76.0 grpc-c/51.0.0 (linux; chttp2)\r\n"
    b"grpc-accept-encoding: identity, deflate, gzip\r\ngrpc-timeout: 4999m\r\n"
    b"content-length: " + str(len(GRPC_REQUEST)).encode() + b"\r\n\r\n" + GRPC_REQUEST
)
H1_ANSWER_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-accept-encoding: identity, deflate, gzip\r\n"
    b"content-length: " + str(len(ANSWER)).encode() + b"\r\n\r\n"
)

SETTINGS = {  # what the listener advertises by default (design: http2 settings)
    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535 * 16,
    h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16384,
}


def pair(lean: bool = False) -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    """A connected client and server, prefaces and SETTINGS exchanged and acknowledged. ``lean``:
    the headers we send are not validated nor normalised again (inbound validation stays on)."""
    options: dict[str, Any] = {"header_encoding": None}
    if lean:
        options |= {"validate_outbound_headers": False, "normalize_outbound_headers": False}
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, **options))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, **options))
    client.initiate_connection()
    server.initiate_connection()
    server.update_settings(SETTINGS)
    for _ in range(3):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    return client, server


def h2_run(requests: int, batch: int, timed: str) -> float:
    """Seconds spent on the ``timed`` side ("server", "client"; "lean server": outbound header
    checks off) for ``requests`` calls."""
    client, server = pair(lean=timed.startswith("lean"))
    timed = timed.removeprefix("lean ")
    clock = time.perf_counter
    spent = 0.0
    stream_id = 1
    done = 0
    while done < requests:
        # the client sends ``batch`` calls
        start = clock()
        ids = []
        for _ in range(batch):
            client.send_headers(stream_id, REQUEST_HEADERS)
            client.send_data(stream_id, GRPC_REQUEST, end_stream=True)
            ids.append(stream_id)
            stream_id += 2
        wire = client.data_to_send()
        if timed == "client":
            spent += clock() - start
        # the server reads them and answers each
        start = clock()
        for event in server.receive_data(wire):
            if isinstance(event, h2.events.DataReceived):
                server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                sid = event.stream_id
                server.send_headers(sid, ANSWER_HEADERS)
                server.send_data(sid, ANSWER)
                server.send_headers(sid, TRAILERS, end_stream=True)
        wire = server.data_to_send()
        if timed == "server":
            spent += clock() - start
        # the client reads the answers (and credits the window back)
        start = clock()
        ended = 0
        for event in client.receive_data(wire):
            if isinstance(event, h2.events.DataReceived):
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                ended += 1
        wire = client.data_to_send()
        if timed == "client":
            spent += clock() - start
        assert ended == batch, f"{ended} of {batch} answers ended"
        if wire:  # WINDOW_UPDATEs: the server's cost too
            start = clock()
            server.receive_data(wire)
            if timed == "server":
                spent += clock() - start
        done += batch
    return spent


class Callbacks:
    """What our HTTP/1.1 server and upstream client keep from a message (proxy/edge)."""

    __slots__ = ("url", "headers", "body", "complete")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.complete = 0

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        pass

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete += 1


def h1_run(requests: int, batch: int, timed: str) -> float:
    """httptools: "parse" the request only; "parse+answer" also writes the answer's bytes and
    parses them as the upstream client would (the HTTP/1.1 counterpart of server + client)."""
    request_cb, answer_cb = Callbacks(), Callbacks()
    request_parser = httptools.HttpRequestParser(request_cb)
    answer_parser = httptools.HttpResponseParser(answer_cb)
    wire = H1_REQUEST * batch
    clock = time.perf_counter
    start = clock()
    done = 0
    while done < requests:
        request_cb.headers.clear()
        request_parser.feed_data(wire)
        if timed != "parse":
            answers = b"".join(H1_ANSWER_HEAD + ANSWER for _ in range(batch))
            answer_cb.headers.clear()
            answer_parser.feed_data(answers)
        done += batch
    spent = clock() - start
    assert request_cb.complete == done
    return spent


def hpack_run(requests: int, batch: int, timed: str) -> float:
    """HPACK alone: the request's block decoded (server), the answer's headers and trailers encoded."""
    encoder, decoder = hpack.Encoder(), hpack.Decoder()
    blocks = [encoder.encode(REQUEST_HEADERS) for _ in range(2)]  # the first one fills the table
    decoder.decode(blocks[0], raw=True)
    block = blocks[1]
    answer_encoder = hpack.Encoder()
    clock = time.perf_counter
    start = clock()
    for _ in range(requests):
        decoder.decode(block, raw=True)
        answer_encoder.encode(ANSWER_HEADERS)
        answer_encoder.encode(TRAILERS)
    return clock() - start


CASES: list[tuple[str, Callable[[int, int, str], float], str]] = [
    ("h2 server (receive HEADERS+DATA, send HEADERS+DATA+trailers)", h2_run, "server"),
    ("h2 server, outbound header validation off", h2_run, "lean server"),
    ("h2 client (the same call from the upstream side)", h2_run, "client"),
    ("hpack alone (decode request, encode answer + trailers)", hpack_run, "server"),
    ("httptools: parse the HTTP/1.1 request", h1_run, "parse"),
    ("httptools: parse request + write and parse the answer", h1_run, "parse+answer"),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=5000, help="calls per run")
    parser.add_argument("--repeat", type=int, default=9, help="runs per case; the best counts")
    parser.add_argument("--batch", type=int, action="append", help="calls per read (default: 1 and 16)")
    args = parser.parse_args()
    versions = f"h2 {h2.__version__}, hpack {hpack.__version__}, httptools {httptools.__version__}"
    print(
        f"{versions}, Python {sys.version.split()[0]}; {args.requests} calls per run, best of {args.repeat}"
    )
    results: dict[tuple[str, int], float] = {}
    for batch in args.batch or [1, 16]:
        print(f"\n{batch} call(s) per read")
        print(f"{'what':<62} {'us/call':>9} {'calls/s':>10}")
        for name, run, timed in CASES:
            best = float("inf")
            for _ in range(args.repeat):
                gc.collect()
                best = min(best, run(args.requests, batch, timed))
            per = best / args.requests * 1e6
            results[(name, batch)] = per
            print(f"{name:<62} {per:>9.2f} {1e6 / per:>10.0f}")
        server = results[(CASES[0][0], batch)]
        parse = results[(CASES[4][0], batch)]
        both_h2 = server + results[(CASES[2][0], batch)]
        both_h1 = results[(CASES[5][0], batch)]
        hpack_share = results[(CASES[3][0], batch)] / server
        summary: dict[str, Any] = {
            "h2 server / httptools parse": f"{server / parse:.0f}x",
            "h2 server + client / httptools both ways": f"{both_h2 / both_h1:.0f}x",
            "hpack's share of the h2 server": f"{hpack_share:.0%}",
        }
        for key, value in summary.items():
            print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
