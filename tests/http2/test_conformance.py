"""HTTP/2 conformance of the listener, case by case after h2spec's (h2spec cannot be built here:
no Go). Each parameter id is the h2spec case number ("6.5.2/3"); the sections are h2spec's.

Expectations follow h2spec's: a *connection error* is a GOAWAY with one of the codes; a *stream
error* is a RST_STREAM on that stream with one of the codes, or a GOAWAY with one (h2spec accepts
both, and ``h2`` treats some stream errors as connection errors). Frames are written raw
(hyperframe, or bytes for frames hyperframe refuses to build) on the shared proxy process."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

import h2.errors
import h2.events
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.http2.rawh2 import RawH2
from tests.support import ProxyProcess

E = h2.errors.ErrorCodes
PROTOCOL, FRAME_SIZE, STREAM_CLOSED = E.PROTOCOL_ERROR, E.FRAME_SIZE_ERROR, E.STREAM_CLOSED
FLOW, COMPRESSION = E.FLOW_CONTROL_ERROR, E.COMPRESSION_ERROR
REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/echo"), (b":authority", b"x")]
POST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/echo"), (b":authority", b"x")]
SLOW = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/slow?ms=800"), (b":authority", b"x")]
ANSWERED = "answered"


def raw(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    """A frame as bytes, whatever its validity (hyperframe refuses to build some)."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", sid) + payload


def block(c: RawH2, fields: list[tuple[bytes, bytes]]) -> bytes:
    return c.conn.encoder.encode(fields)


def headers(c: RawH2, sid: int, fields: list[tuple[bytes, bytes]], *flags: str) -> bytes:
    return HeadersFrame(sid, data=block(c, fields), flags=flags).serialize()


def ping() -> bytes:
    return PingFrame(0, opaque_data=b"h2spec!!").serialize()


def connect(proxy: ProxyProcess, port: int | None = None) -> RawH2:
    client = RawH2(port or proxy.port)
    assert client.wait(lambda c: c.frames_of(SettingsFrame)), "no SETTINGS from the server"
    return client


def connection_error(client: RawH2, codes: tuple[int, ...]) -> None:
    client.wait(lambda c: c.frames_of(GoAwayFrame) or c.closed)
    goaway = client.frames_of(GoAwayFrame)
    assert goaway, "no GOAWAY"
    assert goaway[-1].error_code in codes, f"GOAWAY {goaway[-1].error_code!r}, wanted {codes}"


def stream_error(client: RawH2, sid: int, codes: tuple[int, ...]) -> None:
    client.wait(lambda c: c.frames_of(RstStreamFrame, sid) or c.frames_of(GoAwayFrame) or c.closed)
    reset = client.frames_of(RstStreamFrame, sid)
    if reset:
        assert reset[0].error_code in codes, f"RST_STREAM {reset[0].error_code!r}, wanted {codes}"
        return
    connection_error(client, codes)


def answered(client: RawH2, sid: int) -> None:
    assert client.wait(lambda c: c.ended(sid) or c.closed)
    assert client.status(sid) == 200


def ping_answered(client: RawH2) -> None:
    acks = client.wait(lambda c: [f for f in c.frames_of(PingFrame) if "ACK" in f.flags] or c.closed)
    assert acks and acks[0].opaque_data == b"h2spec!!"
    assert not client.frames_of(GoAwayFrame)


# (case id, what to send after the preface and SETTINGS, expectation)
# expectation: ("conn", codes) | ("stream", sid, codes) | ("ping",) | ("answered", sid)
Case = tuple[str, Callable[[RawH2], bytes], tuple[Any, ...]]

CASES: list[Case] = [
    # 4.1 Frame Format
    ("4.1/1", lambda c: raw(0x16, 0, 0, b"unknown") + ping(), ("ping",)),
    ("4.1/2", lambda c: raw(0x6, 0x16, 0, b"h2spec!!"), ("ping",)),  # undefined flags on PING
    ("4.1/3", lambda c: raw(0x6, 0, 0x80000000, b"h2spec!!"), ("ping",)),  # reserved bit set
    # 4.2 Frame Size
    (
        "4.2/1",
        lambda c: (
            headers(c, 1, POST, "END_HEADERS") + DataFrame(1, b"x" * 16384, flags=["END_STREAM"]).serialize()
        ),
        ("answered", 1),
    ),  # fmt: skip
    (
        "4.2/2",
        lambda c: headers(c, 1, POST, "END_HEADERS") + raw(0x0, 0x1, 1, b"x" * 16385),
        ("conn", (FRAME_SIZE,)),
    ),
    ("4.2/3", lambda c: raw(0x1, 0x5, 1, block(c, REQUEST) + b"\x00" * 16385), ("conn", (FRAME_SIZE,))),
    # 4.3 Header Compression and Decompression
    ("4.3/1", lambda c: raw(0x1, 0x5, 1, b"\xbe"), ("conn", (COMPRESSION,))),  # index 62: not in the table
    (
        "4.3/2",
        lambda c: (
            HeadersFrame(1, data=block(c, REQUEST)).serialize() + PriorityFrame(1, depends_on=0).serialize()
        ),
        ("conn", (PROTOCOL,)),
    ),  # fmt: skip
    (
        "4.3/3",
        lambda c: HeadersFrame(1, data=block(c, REQUEST)).serialize() + headers(c, 3, REQUEST, "END_HEADERS"),
        ("conn", (PROTOCOL,)),
    ),  # fmt: skip
    # 5.1 Stream States
    ("5.1/1", lambda c: DataFrame(1, b"x", flags=["END_STREAM"]).serialize(), ("conn", (PROTOCOL,))),
    ("5.1/2", lambda c: RstStreamFrame(1, error_code=E.CANCEL).serialize(), ("conn", (PROTOCOL,))),
    ("5.1/3", lambda c: WindowUpdateFrame(1, window_increment=100).serialize(), ("conn", (PROTOCOL,))),
    (
        "5.1/4",
        lambda c: ContinuationFrame(1, data=block(c, REQUEST), flags=["END_HEADERS"]).serialize(),
        ("conn", (PROTOCOL,)),
    ),  # fmt: skip
    (
        "5.1/5",
        lambda c: headers(c, 1, SLOW, "END_HEADERS", "END_STREAM") + DataFrame(1, b"x").serialize(),
        ("stream", 1, (STREAM_CLOSED,)),
    ),  # half closed (remote)  # fmt: skip
    (
        "5.1/6",
        lambda c: headers(c, 1, SLOW, "END_HEADERS", "END_STREAM") + headers(c, 1, REQUEST, "END_HEADERS"),
        ("stream", 1, (STREAM_CLOSED,)),
    ),  # fmt: skip
    (
        "5.1/8",
        lambda c: (
            headers(c, 1, SLOW, "END_HEADERS")
            + RstStreamFrame(1, error_code=E.CANCEL).serialize()
            + DataFrame(1, b"x").serialize()
        ),
        ("stream", 1, (STREAM_CLOSED,)),
    ),  # closed by RST_STREAM  # fmt: skip
    (
        "5.1/9",
        lambda c: (
            headers(c, 1, SLOW, "END_HEADERS")
            + RstStreamFrame(1, error_code=E.CANCEL).serialize()
            + headers(c, 1, REQUEST, "END_HEADERS")
        ),
        ("stream", 1, (STREAM_CLOSED,)),
    ),  # fmt: skip
    # 5.1.1 Stream Identifiers
    ("5.1.1/1", lambda c: headers(c, 2, REQUEST, "END_HEADERS", "END_STREAM"), ("conn", (PROTOCOL,))),
    (
        "5.1.1/2",
        lambda c: (
            headers(c, 5, REQUEST, "END_HEADERS", "END_STREAM")
            + headers(c, 3, REQUEST, "END_HEADERS", "END_STREAM")
        ),
        ("conn", (PROTOCOL,)),
    ),  # fmt: skip
    # 5.3 Stream Priority (5.3.1 Stream Dependencies)
    (
        "5.3.1/1",
        lambda c: HeadersFrame(
            1,
            data=block(c, REQUEST),
            depends_on=1,
            stream_weight=16,
            flags=["END_HEADERS", "END_STREAM", "PRIORITY"],
        ).serialize(),
        ("stream", 1, (PROTOCOL,)),
    ),  # fmt: skip
    (
        "5.3.1/2",
        lambda c: PriorityFrame(1, depends_on=1, stream_weight=16).serialize(),
        ("stream", 1, (PROTOCOL,)),
    ),
    # 5.4 Error Handling (5.4.1 Connection Error Handling)
    ("5.4.1/1", lambda c: raw(0x6, 0, 0, b"short"), ("conn", (FRAME_SIZE,))),
    # 5.5 Extending HTTP/2
    ("5.5/1", lambda c: raw(0xFF, 0, 0, b"extension") + ping(), ("ping",)),
    (
        "5.5/2",
        lambda c: HeadersFrame(1, data=block(c, REQUEST)).serialize() + raw(0xFF, 0, 1, b"ext"),
        ("conn", (PROTOCOL,)),
    ),  # fmt: skip
    # 6.1 DATA
    (
        "6.1/1",
        lambda c: (
            headers(c, 1, POST, "END_HEADERS") + DataFrame(0, b"x").serialize()
            if False
            else headers(c, 1, POST, "END_HEADERS") + raw(0x0, 0x1, 0, b"x")
        ),
        ("conn", (PROTOCOL,)),
    ),  # fmt: skip
    (
        "6.1/2",
        lambda c: headers(c, 1, SLOW, "END_HEADERS", "END_STREAM") + DataFrame(1, b"x").serialize(),
        ("stream", 1, (STREAM_CLOSED,)),
    ),  # fmt: skip
    (
        "6.1/3",
        lambda c: headers(c, 1, POST, "END_HEADERS") + raw(0x0, 0x9, 1, b"\x06abc"),
        ("conn", (PROTOCOL,)),
    ),
    # 6.2 HEADERS
    (
        "6.2/1",
        lambda c: HeadersFrame(1, data=block(c, REQUEST)).serialize() + PriorityFrame(1).serialize(),
        ("conn", (PROTOCOL,)),
    ),  # fmt: skip
    (
        "6.2/2",
        lambda c: HeadersFrame(1, data=block(c, REQUEST)).serialize() + headers(c, 3, REQUEST, "END_HEADERS"),
        ("conn", (PROTOCOL,)),
    ),  # fmt: skip
    ("6.2/3", lambda c: raw(0x1, 0x5, 0, block(c, REQUEST)), ("conn", (PROTOCOL,))),
    ("6.2/4", lambda c: raw(0x1, 0xD, 1, b"\xff" + block(c, REQUEST)), ("conn", (PROTOCOL,))),
    # 6.3 PRIORITY
    ("6.3/1", lambda c: raw(0x2, 0, 0, b"\x00\x00\x00\x00\x10"), ("conn", (PROTOCOL,))),
    ("6.3/2", lambda c: raw(0x2, 0, 1, b"\x00\x00\x00\x00"), ("stream", 1, (FRAME_SIZE,))),
    # 6.4 RST_STREAM
    ("6.4/1", lambda c: raw(0x3, 0, 0, b"\x00\x00\x00\x08"), ("conn", (PROTOCOL,))),
    ("6.4/2", lambda c: RstStreamFrame(1, error_code=E.CANCEL).serialize(), ("conn", (PROTOCOL,))),
    (
        "6.4/3",
        lambda c: headers(c, 1, SLOW, "END_HEADERS", "END_STREAM") + raw(0x3, 0, 1, b"\x00\x00\x08"),
        ("conn", (FRAME_SIZE,)),
    ),  # fmt: skip
    # 6.5 SETTINGS
    # RFC 9113 says FRAME_SIZE_ERROR; h2 reports PROTOCOL_ERROR (a connection error either way)
    ("6.5/1", lambda c: raw(0x4, 0x1, 0, b"\x00\x03\x00\x00\x00\x64"), ("conn", (FRAME_SIZE, PROTOCOL))),
    ("6.5/2", lambda c: raw(0x4, 0, 1, b"\x00\x03\x00\x00\x00\x64"), ("conn", (PROTOCOL,))),
    ("6.5/3", lambda c: raw(0x4, 0, 0, b"\x00\x03\x00"), ("conn", (FRAME_SIZE,))),
    # 6.5.2 Defined SETTINGS Parameters
    ("6.5.2/1", lambda c: raw(0x4, 0, 0, b"\x00\x02\x00\x00\x00\x02"), ("conn", (PROTOCOL,))),
    ("6.5.2/2", lambda c: raw(0x4, 0, 0, b"\x00\x04\x80\x00\x00\x00"), ("conn", (FLOW,))),
    ("6.5.2/3", lambda c: raw(0x4, 0, 0, b"\x00\x05\x00\x00\x3f\xff"), ("conn", (PROTOCOL,))),
    ("6.5.2/4", lambda c: raw(0x4, 0, 0, b"\x00\x05\x01\x00\x00\x00"), ("conn", (PROTOCOL,))),
    ("6.5.2/5", lambda c: raw(0x4, 0, 0, b"\x00\xff\x00\x00\x00\x01") + ping(), ("ping",)),
    # 6.7 PING
    ("6.7/1", lambda c: ping(), ("ping",)),
    ("6.7/3", lambda c: raw(0x6, 0, 1, b"h2spec!!"), ("conn", (PROTOCOL,))),
    ("6.7/4", lambda c: raw(0x6, 0, 0, b"h2spec"), ("conn", (FRAME_SIZE,))),
    # 6.8 GOAWAY
    ("6.8/1", lambda c: raw(0x7, 0, 1, b"\x00\x00\x00\x00\x00\x00\x00\x00"), ("conn", (PROTOCOL,))),
    # 6.9 WINDOW_UPDATE
    ("6.9/1", lambda c: raw(0x8, 0, 0, b"\x00\x00\x00\x00"), ("conn", (PROTOCOL,))),
    (
        "6.9/2",
        lambda c: headers(c, 1, SLOW, "END_HEADERS") + raw(0x8, 0, 1, b"\x00\x00\x00\x00"),
        ("stream", 1, (PROTOCOL,)),
    ),  # fmt: skip
    ("6.9/3", lambda c: raw(0x8, 0, 0, b"\x00\x00\x01"), ("conn", (FRAME_SIZE,))),
    # 6.9.1 The Flow-Control Window
    ("6.9.1/2", lambda c: WindowUpdateFrame(0, window_increment=2**31 - 1).serialize(), ("conn", (FLOW,))),
    (
        "6.9.1/3",
        lambda c: (
            headers(c, 1, SLOW, "END_HEADERS", "END_STREAM")
            + WindowUpdateFrame(1, window_increment=2**31 - 1).serialize()
        ),
        ("stream", 1, (FLOW,)),
    ),  # fmt: skip
    # 6.10 CONTINUATION
    (
        "6.10/1",
        lambda c: (
            lambda b: (
                HeadersFrame(1, data=b[:3], flags=["END_STREAM"]).serialize()
                + ContinuationFrame(1, data=b[3:6]).serialize()
                + ContinuationFrame(1, data=b[6:], flags=["END_HEADERS"]).serialize()
            )
        )(block(c, REQUEST)),
        ("answered", 1),
    ),  # fmt: skip
    ("6.10/2", lambda c: HeadersFrame(1, data=block(c, REQUEST)).serialize() + ping(), ("conn", (PROTOCOL,))),
    (
        "6.10/3",
        lambda c: HeadersFrame(1, data=block(c, REQUEST)).serialize() + raw(0x9, 0x4, 0, b""),
        ("conn", (PROTOCOL,)),
    ),  # fmt: skip
    (
        "6.10/4",
        lambda c: headers(c, 1, SLOW, "END_HEADERS", "END_STREAM") + raw(0x9, 0x4, 1, block(c, REQUEST)),
        ("conn", (PROTOCOL,)),
    ),  # fmt: skip
    (
        "6.10/5",
        lambda c: (
            lambda b: (
                HeadersFrame(1, data=b[:3]).serialize()
                + ContinuationFrame(1, data=b[3:], flags=["END_HEADERS"]).serialize()
                + raw(0x9, 0x4, 1, block(c, REQUEST))
            )
        )(block(c, SLOW)),
        ("conn", (PROTOCOL,)),
    ),  # fmt: skip
    (
        "6.10/6",
        lambda c: (
            headers(c, 1, POST, "END_HEADERS")
            + DataFrame(1, b"x").serialize()
            + raw(0x9, 0x4, 1, block(c, REQUEST))
        ),
        ("conn", (PROTOCOL,)),
    ),  # fmt: skip
    # 8.1 HTTP Request/Response Exchange
    (
        "8.1/1",
        lambda c: headers(c, 1, POST, "END_HEADERS") + headers(c, 1, [(b"x-trailer", b"1")], "END_HEADERS"),
        ("stream", 1, (PROTOCOL,)),
    ),  # trailers without END_STREAM  # fmt: skip
    # 8.1.2 HTTP Header Fields
    (
        "8.1.2/1",
        lambda c: headers(c, 1, [*REQUEST, (b"X-Upper", b"1")], "END_HEADERS", "END_STREAM"),
        ("stream", 1, (PROTOCOL,)),
    ),  # fmt: skip
    (
        "8.1.2.1/1",
        lambda c: headers(c, 1, [*REQUEST, (b":foo", b"x")], "END_HEADERS", "END_STREAM"),
        ("stream", 1, (PROTOCOL,)),
    ),  # fmt: skip
    (
        "8.1.2.1/2",
        lambda c: headers(c, 1, [*REQUEST, (b":status", b"200")], "END_HEADERS", "END_STREAM"),
        ("stream", 1, (PROTOCOL,)),
    ),  # fmt: skip
    (
        "8.1.2.1/3",
        lambda c: (
            headers(c, 1, POST, "END_HEADERS")
            + headers(c, 1, [(b":method", b"GET")], "END_HEADERS", "END_STREAM")
        ),
        ("stream", 1, (PROTOCOL,)),
    ),  # pseudo-header in trailers  # fmt: skip
    (
        "8.1.2.1/4",
        lambda c: headers(
            c, 1, [(b":method", b"GET"), (b"x-a", b"1"), *REQUEST[1:]], "END_HEADERS", "END_STREAM"
        ),
        ("stream", 1, (PROTOCOL,)),
    ),  # fmt: skip
    (
        "8.1.2.2/1",
        lambda c: headers(c, 1, [*REQUEST, (b"connection", b"keep-alive")], "END_HEADERS", "END_STREAM"),
        ("stream", 1, (PROTOCOL,)),
    ),  # fmt: skip
    (
        "8.1.2.2/2",
        lambda c: headers(c, 1, [*REQUEST, (b"te", b"trailers, deflate")], "END_HEADERS", "END_STREAM"),
        ("stream", 1, (PROTOCOL,)),
    ),  # fmt: skip
    (
        "8.1.2.3/1",
        lambda c: headers(c, 1, [*REQUEST[:2], (b":path", b""), REQUEST[3]], "END_HEADERS", "END_STREAM"),
        ("stream", 1, (PROTOCOL,)),
    ),  # fmt: skip
    (
        "8.1.2.3/2",
        lambda c: headers(c, 1, REQUEST[1:], "END_HEADERS", "END_STREAM"),
        ("stream", 1, (PROTOCOL,)),
    ),
    (
        "8.1.2.3/3",
        lambda c: headers(c, 1, [REQUEST[0], *REQUEST[2:]], "END_HEADERS", "END_STREAM"),
        ("stream", 1, (PROTOCOL,)),
    ),  # fmt: skip
    (
        "8.1.2.3/4",
        lambda c: headers(c, 1, [*REQUEST[:2], REQUEST[3]], "END_HEADERS", "END_STREAM"),
        ("stream", 1, (PROTOCOL,)),
    ),  # fmt: skip
    (
        "8.1.2.3/5",
        lambda c: headers(c, 1, [*REQUEST, (b":method", b"GET")], "END_HEADERS", "END_STREAM"),
        ("stream", 1, (PROTOCOL,)),
    ),  # fmt: skip
    (
        "8.1.2.3/6",
        lambda c: headers(c, 1, [*REQUEST, (b":scheme", b"http")], "END_HEADERS", "END_STREAM"),
        ("stream", 1, (PROTOCOL,)),
    ),  # fmt: skip
    (
        "8.1.2.3/7",
        lambda c: headers(c, 1, [*REQUEST, (b":path", b"/")], "END_HEADERS", "END_STREAM"),
        ("stream", 1, (PROTOCOL,)),
    ),  # fmt: skip
    (
        "8.1.2.6/1",
        lambda c: (
            headers(c, 1, [*POST, (b"content-length", b"1")], "END_HEADERS")
            + DataFrame(1, b"four", flags=["END_STREAM"]).serialize()
        ),
        ("stream", 1, (PROTOCOL,)),
    ),  # fmt: skip
    (
        "8.1.2.6/2",
        lambda c: (
            headers(c, 1, [*POST, (b"content-length", b"1")], "END_HEADERS")
            + DataFrame(1, b"a").serialize()
            + DataFrame(1, b"b", flags=["END_STREAM"]).serialize()
        ),
        ("stream", 1, (PROTOCOL,)),
    ),  # fmt: skip
    # 8.2 Server Push
    ("8.2/1", lambda c: raw(0x5, 0x4, 1, b"\x00\x00\x00\x02" + block(c, REQUEST)), ("conn", (PROTOCOL,))),
]


@pytest.mark.parametrize(("send", "expect"), [pytest.param(s, e, id=i) for i, s, e in CASES])
def test_h2spec_case(h2_proxy: ProxyProcess, send: Callable[[RawH2], bytes], expect: tuple[Any, ...]) -> None:
    client = connect(h2_proxy)
    try:
        client.send_raw(send(client))
    except OSError:
        pass  # refused before we finished sending
    kind = expect[0]
    if kind == "conn":
        connection_error(client, expect[1])
    elif kind == "stream":
        stream_error(client, expect[1], expect[2])
    elif kind == "ping":
        ping_answered(client)
    else:
        answered(client, expect[1])
    client.close()


# --- the cases that need more than one exchange ----------------------------------------------------


def test_3_5_1_the_preface_is_answered_with_settings(h2_proxy: ProxyProcess) -> None:
    client = connect(h2_proxy)
    first = client.frames[0]
    assert isinstance(first, SettingsFrame) and "ACK" not in first.flags
    client.close()


def test_3_5_2_an_invalid_preface_is_goaway(h2_proxy: ProxyProcess) -> None:
    port = h2_proxy.settings["http2"]["port"]
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
        while chunk := sock.recv(65536):
            data += chunk
    client = RawH2.__new__(RawH2)
    client.frames, client._inbound = [], bytearray()
    client._parse(data)
    goaway = client.frames_of(GoAwayFrame)
    assert goaway and goaway[-1].error_code == PROTOCOL


def test_5_1_11_data_on_a_closed_stream(h2_proxy: ProxyProcess) -> None:
    client = connect(h2_proxy)
    sid = client.request("/echo")
    answered(client, sid)
    client.send_raw(DataFrame(sid, b"x").serialize())
    stream_error(client, sid, (STREAM_CLOSED,))
    client.close()


def test_5_1_12_headers_on_a_closed_stream(h2_proxy: ProxyProcess) -> None:
    client = connect(h2_proxy)
    sid = client.request("/echo")
    answered(client, sid)
    client.send_raw(headers(client, sid, REQUEST, "END_HEADERS", "END_STREAM"))
    stream_error(client, sid, (STREAM_CLOSED,))
    client.close()


def test_5_1_2_1_streams_over_the_concurrency_limit_are_refused(h2_proxy: ProxyProcess) -> None:
    client = connect(h2_proxy)
    frames = b"".join(headers(client, 2 * i + 1, POST, "END_HEADERS") for i in range(101))  # 100 allowed
    client.send_raw(frames)
    client.wait(lambda c: c.frames_of(RstStreamFrame, 201) or c.frames_of(GoAwayFrame))
    reset = client.frames_of(RstStreamFrame, 201)
    codes = (PROTOCOL, E.REFUSED_STREAM)
    if reset:
        assert reset[0].error_code in codes
    else:
        connection_error(client, codes)
    client.close()


def test_5_4_1_2_goaway_names_the_last_stream_processed(h2_proxy: ProxyProcess) -> None:
    client = connect(h2_proxy)
    sid = client.request("/echo")
    answered(client, sid)
    client.send_raw(raw(0x6, 0, 0, b"short"))
    connection_error(client, (FRAME_SIZE,))
    assert client.frames_of(GoAwayFrame)[-1].last_stream_id == sid
    client.close()


def test_6_5_3_2_settings_are_acknowledged(h2_proxy: ProxyProcess) -> None:
    client = connect(h2_proxy)
    acks_before = len([f for f in client.frames_of(SettingsFrame) if "ACK" in f.flags])
    client.send_raw(SettingsFrame(0, settings={0x3: 50}).serialize())
    assert client.wait(
        lambda c: len([f for f in c.frames_of(SettingsFrame) if "ACK" in f.flags]) > acks_before
    )
    client.close()


def test_6_7_2_a_ping_ack_is_not_answered(h2_proxy: ProxyProcess) -> None:
    client = connect(h2_proxy)
    client.send_raw(PingFrame(0, opaque_data=b"unasked!", flags=["ACK"]).serialize() + ping())
    ping_answered(client)
    assert all(f.opaque_data != b"unasked!" for f in client.frames_of(PingFrame))
    client.close()


def test_6_9_1_1_an_initial_window_of_one_byte_gets_one_byte_of_data(h2_proxy: ProxyProcess) -> None:
    client = RawH2(h2_proxy.port, settings={0x4: 1})
    client.auto_ack = False
    sid = client.request("/echo")
    client.wait(lambda c: c.frames_of(DataFrame, sid))
    data = client.frames_of(DataFrame, sid)
    assert len(data[0].data) == 1
    client.close()


def test_6_9_2_2_an_initial_window_of_zero_gets_headers_only(h2_proxy: ProxyProcess) -> None:
    client = RawH2(h2_proxy.port, settings={0x4: 0})
    client.auto_ack = False
    sid = client.request("/echo")
    assert client.wait(lambda c: c.status(sid)) == 200
    client.read_once(0.3)
    assert not [f for f in client.frames_of(DataFrame, sid) if f.data]
    client.close()


def test_6_9_2_3_a_settings_window_overflow_is_a_flow_control_error(h2_proxy: ProxyProcess) -> None:
    client = RawH2(h2_proxy.port, settings={0x4: 0})
    client.auto_ack = False  # the connection window (65535) caps what the server can send meanwhile
    sid = client.request("/stream?bytes=10000000")
    client.wait(lambda c: c.status(sid))
    client.send_raw(WindowUpdateFrame(sid, window_increment=2**31 - 1).serialize())
    client.send_raw(SettingsFrame(0, settings={0x4: 70000}).serialize())  # over 2^31-1 whatever was sent
    stream_error(client, sid, (FLOW,))
    client.close()
