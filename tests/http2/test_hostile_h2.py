"""The known HTTP/2 attacks, frame by frame, against the real proxy process: each is refused
cheaply (GOAWAY or RST_STREAM), counted in ``strangler_rejected_requests_total{reason}``, costs
bounded memory (the process's RSS) and work (counts: requests that reached a backend, answers
sent), and the proxy serves a normal request afterwards (docs/security.md "HTTP/2")."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import h2.errors
import h2.events
import h2.settings
import httpx
import psutil
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from tests.http2.conftest import STALL_SECONDS
from tests.http2.rawh2 import RawH2
from tests.support import Backend, ProxyProcess, wait_until

CODES = h2.settings.SettingCodes
CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR
REJECTED = "strangler_rejected_requests_total"
RSS_BUDGET = 16 * 1024 * 1024  # growth allowed over a whole attack (measured: about 0.1 MB)
# the worker's CPU seconds allowed per attack series (measured: 0.01 s for 5,000 reset streams or
# 100,000 control frames, 0.03 for 20,000 CONTINUATION frames, 0.04 for 10 HPACK bombs; parsing
# each frame through h2 instead of refusing at the limit would cost well over these)
CPU_BUDGET = {"rapid_reset": 0.5, "continuation": 0.5, "control": 0.5, "hpack_bomb": 0.5}


def rejected(proxy: ProxyProcess, reason: str) -> float:
    return proxy.metric(REJECTED, reason=reason)


def still_serves(proxy: ProxyProcess) -> None:
    with httpx.Client(base_url=proxy.url, http1=False, http2=True, timeout=10) as client:
        response = client.get("/echo")
    assert response.status_code == 200
    assert response.http_version == "HTTP/2"


def send_quietly(client: RawH2, data: bytes) -> None:
    """The proxy may close while we are still sending the attack: that is the point."""
    try:
        client.send_raw(data)
    except OSError:
        pass


def refused_with(client: RawH2, code: int) -> None:
    goaway = client.wait(lambda c: c.goaway() or c.closed)
    found = client.goaway()
    assert found is not None, f"closed without GOAWAY ({goaway!r})"
    assert found.error_code == code
    client.wait(lambda c: c.closed)
    assert client.closed


def headers_block(
    client: RawH2, path: str = "/echo", extra: list[tuple[bytes, bytes]] | None = None
) -> bytes:
    fields = [(b":method", b"GET"), (b":path", path.encode()), (b":scheme", b"http"), (b":authority", b"x")]
    return client.conn.encoder.encode(fields + (extra or []))


@pytest.fixture()
def rss(h2_proxy: ProxyProcess) -> int:
    still_serves(h2_proxy)  # warm: the first h2 connection's imports and pools are not the attack's
    return h2_proxy.rss()


def cpu_seconds(proxy: ProxyProcess) -> float:
    """The serving worker's CPU time (user + system), as the kernel counts it: a budget on it bounds
    the work an attack costs, whatever else the machine is doing (it is not a wall-clock timing)."""
    times = psutil.Process(proxy.worker_pid()).cpu_times()
    return float(times.user + times.system)


@pytest.fixture()
def cpu(h2_proxy: ProxyProcess, rss: int) -> Callable[[], float]:
    """CPU seconds the worker has spent since the attack began (after the ``rss`` warm-up)."""
    start = cpu_seconds(h2_proxy)
    return lambda: cpu_seconds(h2_proxy) - start


def test_rapid_reset_is_refused_and_bounded(
    h2_proxy: ProxyProcess, backends: tuple[Backend, Backend], rss: int, cpu: Callable[[], float]
) -> None:
    before = rejected(h2_proxy, "h2_rapid_reset")
    tag = uuid.uuid4().hex[:8]
    for _ in range(5):
        client = RawH2(h2_proxy.port)
        client.wait(lambda c: c.of(h2.events.RemoteSettingsChanged))
        for i in range(1000):  # open and reset at once, as fast as the socket takes it
            sid = client.conn.get_next_available_stream_id()
            path = f"/echo/rr-{tag}-{i}".encode()
            fields = [(b":method", b"GET"), (b":path", path), (b":scheme", b"http"), (b":authority", b"x")]
            client.conn.send_headers(sid, fields, end_stream=True)
            client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        send_quietly(client, client.conn.data_to_send())
        refused_with(client, CALM)
        client.close()
    wait_until(lambda: rejected(h2_proxy, "h2_rapid_reset") >= before + 5)
    # the backends saw a bounded number of those requests (none, when each reset came with its
    # HEADERS in the same read: a stream reset before its turn is never routed)
    v1, v2 = backends
    reached = [r for b in (v1, v2) for r in b.log() if f"/echo/rr-{tag}-" in r["raw_path"]]
    assert len(reached) <= 5 * 200
    assert h2_proxy.rss() - rss < RSS_BUDGET
    assert cpu() < CPU_BUDGET["rapid_reset"], f"{cpu():.3f} s of CPU for 5,000 reset streams"
    still_serves(h2_proxy)


def test_continuation_flood_is_refused(h2_proxy: ProxyProcess, rss: int, cpu: Callable[[], float]) -> None:
    before = rejected(h2_proxy, "h2_continuation_flood")
    for _ in range(10):
        client = RawH2(h2_proxy.port)
        block = headers_block(client)
        head = HeadersFrame(1, data=block[:5])  # no END_HEADERS: CONTINUATION frames must follow
        flood = b"".join(ContinuationFrame(1, data=b"\x00" * 1000).serialize() for _ in range(2000))
        send_quietly(client, head.serialize() + flood)
        refused_with(client, CALM)
        client.close()
    wait_until(lambda: rejected(h2_proxy, "h2_continuation_flood") >= before + 10)
    assert h2_proxy.rss() - rss < RSS_BUDGET
    assert cpu() < CPU_BUDGET["continuation"], f"{cpu():.3f} s of CPU for 10 x 2,000 CONTINUATION frames"
    still_serves(h2_proxy)


def test_a_header_block_over_the_limit_in_few_continuations_is_refused(h2_proxy: ProxyProcess) -> None:
    before = rejected(h2_proxy, "h2_headers_too_large")
    client = RawH2(h2_proxy.port)
    head = HeadersFrame(1, data=headers_block(client))
    big = b"".join(ContinuationFrame(1, data=b"\x00" * 16384).serialize() for _ in range(8))  # 128 KB
    send_quietly(client, head.serialize() + big)
    refused_with(client, CALM)
    wait_until(lambda: rejected(h2_proxy, "h2_headers_too_large") > before)
    still_serves(h2_proxy)


@pytest.mark.parametrize("kind", ["settings", "ping", "empty_data"])
def test_control_frame_floods_are_refused(
    h2_proxy: ProxyProcess, rss: int, cpu: Callable[[], float], kind: str
) -> None:
    before = rejected(h2_proxy, "h2_control_flood")
    for _ in range(5):
        client = RawH2(h2_proxy.port)
        if kind == "settings":
            frame = SettingsFrame(0, settings={CODES.MAX_CONCURRENT_STREAMS: 10}).serialize()
        elif kind == "ping":
            frame = PingFrame(0, opaque_data=b"8 bytes!").serialize()
        else:
            sid = client.request("/upload", method="POST", end=False)
            frame = DataFrame(sid, data=b"").serialize()
        client.auto_ack = False
        send_quietly(client, frame * 20000)
        refused_with(client, CALM)
        # what was answered before the refusal is bounded by the per-second limit (200)
        assert len(client.of(h2.events.PingAckReceived)) <= 400
        assert len(client.of(h2.events.SettingsAcknowledged)) <= 400
        client.close()
    wait_until(lambda: rejected(h2_proxy, "h2_control_flood") >= before + 5)
    assert h2_proxy.rss() - rss < RSS_BUDGET
    assert cpu() < CPU_BUDGET["control"], f"{cpu():.3f} s of CPU for 5 x 20,000 {kind} frames"
    still_serves(h2_proxy)


def test_hpack_bomb_is_refused(h2_proxy: ProxyProcess, rss: int, cpu: Callable[[], float]) -> None:
    before = rejected(h2_proxy, "h2_headers_too_large")
    for _ in range(10):
        client = RawH2(h2_proxy.port)
        # one 4 KB header, indexed once, then referenced by index: ~4 KB on the wire, 400 KB decoded
        bomb = [(b"x-bomb", b"a" * 4000)] * 100
        frame = HeadersFrame(1, data=headers_block(client, extra=bomb), flags=["END_HEADERS", "END_STREAM"])
        assert len(frame.data) < 5000
        send_quietly(client, frame.serialize())
        refused_with(client, CALM)
        client.close()
    wait_until(lambda: rejected(h2_proxy, "h2_headers_too_large") >= before + 10)
    assert h2_proxy.rss() - rss < RSS_BUDGET
    assert cpu() < CPU_BUDGET["hpack_bomb"], f"{cpu():.3f} s of CPU for 10 HPACK bombs"
    still_serves(h2_proxy)


def _upstream_connections(proxy: ProxyProcess, port: int) -> int:
    worker = psutil.Process(proxy.worker_pid())
    return sum(
        1
        for c in worker.net_connections("tcp")
        if c.raddr and c.raddr[1] == port and c.status == "ESTABLISHED"
    )


def test_zero_window_stall_resets_the_stream_and_frees_the_upstream(
    h2_proxy: ProxyProcess, backends: tuple[Backend, Backend]
) -> None:
    v2 = backends[1]
    before = rejected(h2_proxy, "h2_stall")
    gone = h2_proxy.metric("strangler_client_disconnects_total", stage="response")
    client = RawH2(h2_proxy.port, settings={CODES.INITIAL_WINDOW_SIZE: 0})
    client.auto_ack = False
    sid = client.request("/stream?bytes=5000000", headers=[("x-strangler-version", "v2")])
    assert client.wait(lambda c: c.status(sid)) == 200  # the head went out; the body waits on our window
    reset = client.wait(lambda c: c.of(h2.events.StreamReset, sid), timeout=STALL_SECONDS + 10)
    assert reset and reset[0].error_code == h2.errors.ErrorCodes.CANCEL
    assert not client.data.get(sid)
    wait_until(lambda: rejected(h2_proxy, "h2_stall") > before)
    wait_until(lambda: h2_proxy.metric("strangler_client_disconnects_total", stage="response") > gone)
    # the upstream connection that carried the answer is not kept (half-read answers never are)
    wait_until(lambda: _upstream_connections(h2_proxy, v2.port) == 0)
    # the connection itself lives on
    client.auto_ack = True
    client.conn.increment_flow_control_window(1 << 20)
    client.flush()
    again = client.request("/echo")
    client.conn.increment_flow_control_window(1 << 20, again)
    client.flush()
    client.wait(lambda c: c.ended(again))
    assert client.status(again) == 200
    client.close()
    still_serves(h2_proxy)


def test_invalid_preface_on_the_main_port_is_http1_refused(h2_proxy: ProxyProcess) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", h2_proxy.port), timeout=5) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400")
    still_serves(h2_proxy)


def test_frames_on_a_closed_stream(h2_proxy: ProxyProcess) -> None:
    client = RawH2(h2_proxy.port)
    sid = client.request("/echo")
    client.wait(lambda c: c.ended(sid))
    send_quietly(client, DataFrame(sid, data=b"late", flags=["END_STREAM"]).serialize())
    # RFC 9113 5.1 "closed": a stream error (or a connection error) of type STREAM_CLOSED
    found = client.wait(lambda c: c.frames_of(RstStreamFrame, sid) or c.frames_of(GoAwayFrame))
    assert found and found[0].error_code == h2.errors.ErrorCodes.STREAM_CLOSED
    # the late DATA does not reach anything: the connection serves the next stream
    again = client.request("/echo")
    client.wait(lambda c: c.ended(again) or c.closed)
    assert client.closed or client.status(again) == 200
    still_serves(h2_proxy)


GET: list[tuple[bytes, bytes]] = [(b":method", b"GET"), (b":path", b"/echo"), (b":scheme", b"http")]


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param([(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x")], id="missing_path"),
        pytest.param([(b":path", b"/echo"), (b":scheme", b"http")], id="missing_method"),
        pytest.param([*GET, (b"X-Upper", b"1")], id="uppercase_name"),
        pytest.param([*GET, (b"connection", b"keep-alive")], id="connection_header"),
        pytest.param([*GET, (b"te", b"gzip")], id="te_not_trailers"),
        pytest.param([*GET, (b"transfer-encoding", b"chunked")], id="transfer_encoding"),
        pytest.param([(b":method", b"GET"), (b"x-a", b"1"), *GET[1:]], id="pseudo_after_regular"),
        pytest.param([*GET, (b":path", b"/other")], id="duplicate_pseudo"),
        pytest.param([*GET, (b":foo", b"x")], id="unknown_pseudo"),
        pytest.param([(b":method", b"GET"), (b":path", b""), (b":scheme", b"http")], id="empty_path"),
        pytest.param([*GET, (b":status", b"200")], id="response_pseudo_in_request"),
    ],
)
def test_malformed_request_headers_are_protocol_errors(
    h2_proxy: ProxyProcess, backends: tuple[Backend, Backend], fields: list[tuple[bytes, bytes]]
) -> None:
    before = rejected(h2_proxy, "h2_protocol_error")
    client = RawH2(h2_proxy.port, validate=False)
    frame = HeadersFrame(1, data=client.conn.encoder.encode(fields), flags=["END_HEADERS", "END_STREAM"])
    send_quietly(client, frame.serialize())
    ended = client.wait(lambda c: c.goaway() or c.of(h2.events.StreamReset, 1) or c.status(1))
    assert ended
    goaway = client.goaway()
    if goaway is not None:
        assert goaway.error_code == PROTOCOL_ERROR
    else:
        assert client.status(1) == 400 or client.of(h2.events.StreamReset, 1)
    wait_until(lambda: rejected(h2_proxy, "h2_protocol_error") > before)
    client.close()
    still_serves(h2_proxy)


@pytest.mark.parametrize("authority", [b"evil.test/x?", b"[::1", b"a b", b"app.test:8o"])
def test_an_invalid_authority_is_400(
    h2_proxy: ProxyProcess, backends: tuple[Backend, Backend], authority: bytes
) -> None:
    before = rejected(h2_proxy, "h2_bad_host")
    client = RawH2(h2_proxy.port, validate=False)
    fields = [
        (b":method", b"GET"),
        (b":path", b"/echo/bad-host"),
        (b":scheme", b"http"),
        (b":authority", authority),
    ]
    frame = HeadersFrame(1, data=client.conn.encoder.encode(fields), flags=["END_HEADERS", "END_STREAM"])
    send_quietly(client, frame.serialize())
    client.wait(lambda c: c.ended(1) or c.goaway() or c.closed)
    if client.goaway() is None:  # h2 itself may refuse some (a space): a protocol error then
        assert client.status(1) == 400
        wait_until(lambda: rejected(h2_proxy, "h2_bad_host") > before)
    assert not [r for b in backends for r in b.log() if r["raw_path"] == "/echo/bad-host"]
    client.close()
    still_serves(h2_proxy)


@pytest.mark.parametrize(("declared", "sent"), [(10, 5), (5, 10)], ids=["body_short", "body_long"])
def test_a_body_that_breaks_its_content_length_never_reaches_the_backend(
    h2_proxy: ProxyProcess, backends: tuple[Backend, Backend], declared: int, sent: int
) -> None:
    """H2.CL desync: an HTTP/1.1 backend reads exactly Content-Length bytes. A client that declares
    one length and sends another must get its stream refused, and none of its bytes may reach a
    backend: a short body would take the next request's bytes as its rest, a long one would leave
    bytes read as a request of their own, on a pooled connection other clients share."""
    v1, v2 = backends
    for backend in backends:
        backend.log(clear=True)
    client = RawH2(h2_proxy.port, validate=False)
    fields = [(b":method", b"POST"), (b":path", b"/echo"), (b":scheme", b"http"), (b":authority", b"x"),
              (b"content-length", str(declared).encode())]  # fmt: skip
    head = HeadersFrame(1, data=client.conn.encoder.encode(fields), flags=["END_HEADERS"])
    send_quietly(client, head.serialize() + DataFrame(1, data=b"G" * sent, flags=["END_STREAM"]).serialize())
    client.wait(lambda c: c.goaway() or c.of(h2.events.StreamReset, 1) or c.status(1) or c.closed)
    goaway = client.goaway()
    assert (goaway is not None and goaway.error_code == PROTOCOL_ERROR) or client.of(
        h2.events.StreamReset, 1
    ) or client.status(1) == 400, "the stream was answered as if its body were whole"  # fmt: skip
    client.close()
    # other clients next, over both protocols, on the proxy's pooled backend connections
    with httpx.Client(base_url=h2_proxy.url, http1=False, http2=True, timeout=10) as h2c:
        for i in range(3):
            answer = h2c.post("/echo", content=b"next-h2-%d" % i)
            assert answer.status_code == 200 and answer.json()["body"] == f"next-h2-{i}"
    with httpx.Client(base_url=h2_proxy.url, timeout=10) as h1c:
        for i in range(3):
            answer = h1c.post("/echo", content=b"next-h1-%d" % i)
            assert answer.status_code == 200 and answer.json()["body"] == f"next-h1-{i}"
    seen = [record for backend in backends for record in backend.log()]
    assert not [r for r in seen if "G" in (r.get("body") or "")], seen
    assert sorted(r["body"] for r in seen if r["method"] == "POST") == sorted(
        [f"next-h2-{i}" for i in range(3)] + [f"next-h1-{i}" for i in range(3)]
    )
