"""Flow control both ways, SETTINGS, PING, GOAWAY on drain, RST_STREAM and the header limits,
over raw HTTP/2 frames (tests/http2/rawh2.py) through the real proxy."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable

import h2.errors
import h2.events
import h2.settings
import httpx

from tests.http2.rawh2 import RawH2
from tests.support import Backend, ProxyProcess, wait_until

CODES = h2.settings.SettingCodes
REJECTED = "strangler_rejected_requests_total"


def still_serves(proxy: ProxyProcess) -> None:
    with httpx.Client(base_url=proxy.url, http1=False, http2=True, timeout=10) as client:
        response = client.get("/echo")
    assert response.status_code == 200
    assert response.http_version == "HTTP/2"


def test_server_settings_and_ping(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(http2={"max_concurrent_streams": 7, "max_header_list_size": 9000})
    client = RawH2(proxy.port)
    changed = client.wait(lambda c: c.of(h2.events.RemoteSettingsChanged))
    values = {code: setting.new_value for code, setting in changed[0].changed_settings.items()}
    assert values[CODES.MAX_CONCURRENT_STREAMS] == 7
    assert values[CODES.MAX_HEADER_LIST_SIZE] == 9000
    assert values[CODES.INITIAL_WINDOW_SIZE] == 65535 * 16
    assert values[CODES.ENABLE_PUSH] == 0
    client.conn.ping(b"12345678")
    client.flush()
    acks = client.wait(lambda c: c.of(h2.events.PingAckReceived))
    assert acks[0].ping_data == b"12345678"
    assert client.wait(lambda c: c.of(h2.events.SettingsAcknowledged))
    client.close()


def test_a_client_with_a_small_window_gets_the_whole_answer(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy()
    total = 3 * 1024 * 1024
    client = RawH2(proxy.port, settings={CODES.INITIAL_WINDOW_SIZE: 1000, CODES.MAX_FRAME_SIZE: 16384})
    sid = client.request(f"/stream?bytes={total}&sized=1")
    client.wait(lambda c: c.ended(sid), timeout=60)
    assert client.status(sid) == 200
    assert len(client.data[sid]) == total
    assert hashlib.sha256(client.data[sid]).digest() == hashlib.sha256(b"x" * total).digest()
    client.close()


def test_a_slow_upstream_back_pressures_the_upload(
    proxy_factory: Callable[..., ProxyProcess], backend_factory: Callable[[str], Backend], redis_url: str
) -> None:
    backend = backend_factory("v1")
    proxy = proxy_factory(v1_url=backend.url, v2_url=backend.url, redis_url=redis_url,
                          limits={"min_body_rate_bytes_per_second": 0})  # fmt: skip
    total = 64 * 1024 * 1024
    block = b"u" * 16384
    client = RawH2(proxy.port)
    sid = client.request("/upload", method="POST", end=False)
    backend.freeze()
    sent = 0
    try:
        stalled_since = None
        while sent < total:
            window = min(client.conn.local_flow_control_window(sid), 16384, total - sent)
            if window > 0:
                client.conn.send_data(sid, block[:window])
                client.flush()
                sent += window
                stalled_since = None
                continue
            client.read_once(0.1)
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 1.5:
                break  # the proxy stopped opening our window: the backend is not reading
        assert sent < total  # back-pressure reached the client: its window stayed shut
    finally:
        backend.thaw()
    while sent < total:
        window = min(client.conn.local_flow_control_window(sid), 16384, total - sent)
        if window > 0:
            client.conn.send_data(sid, block[:window])
            client.flush()
            sent += window
        else:
            client.read_once(0.2)
    client.conn.end_stream(sid)
    client.flush()
    client.wait(lambda c: c.ended(sid), timeout=60)
    assert client.status(sid) == 200
    digest = hashlib.sha256()
    for _ in range(total // len(block)):
        digest.update(block)
    assert json.loads(bytes(client.data[sid]))["sha256"] == digest.hexdigest()
    client.close()


def test_goaway_on_drain_lets_the_stream_in_flight_finish(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(drain_timeout_seconds=10)
    client = RawH2(proxy.port)
    first = client.request("/slow?ms=1500")
    time.sleep(0.3)  # the request is with the backend
    stopper = threading.Thread(target=proxy.stop)
    stopper.start()
    try:
        goaway = client.wait(lambda c: c.goaway())
        assert goaway is not None
        assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
        assert goaway.last_stream_id == first
        client.wait(lambda c: c.ended(first), timeout=10)
        assert client.status(first) == 200
        assert b'"slow"' in client.data[first]
        client.wait(lambda c: c.closed, timeout=10)
        assert client.closed  # closed once its last stream ended
    finally:
        stopper.join(20)


def test_new_streams_after_goaway_are_refused(
    start_proxy: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend]
) -> None:
    proxy = start_proxy(drain_timeout_seconds=10)
    client = RawH2(proxy.port)
    first = client.request("/slow?ms=1500")
    time.sleep(0.3)
    stopper = threading.Thread(target=proxy.stop)
    stopper.start()
    try:
        goaway = client.wait(lambda c: c.goaway())
        assert goaway is not None and goaway.last_stream_id == first
        late = client.request("/echo/after-goaway")  # the client ignores the GOAWAY
        client.wait(lambda c: c.ended(late) and c.ended(first), timeout=10)
        reset = client.of(h2.events.StreamReset, late)
        assert reset and reset[0].error_code == h2.errors.ErrorCodes.REFUSED_STREAM
        assert client.status(first) == 200
    finally:
        stopper.join(20)
    assert not [r for r in v1v2[0].log() if r["raw_path"] == "/echo/after-goaway"]


def test_rst_stream_cancels_the_upstream_answer(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy()
    before = proxy.metric("strangler_client_disconnects_total", stage="response")
    client = RawH2(proxy.port, settings={CODES.INITIAL_WINDOW_SIZE: 65535})
    client.auto_ack = False  # the answer stalls on our window: it is mid-stream when we reset
    sid = client.request("/stream?bytes=50000000")
    client.wait(lambda c: len(c.data.get(sid, b"")) >= 65535 - 16384)
    client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    client.flush()
    wait_until(lambda: proxy.metric("strangler_client_disconnects_total", stage="response") > before)
    # the connection lives on: a new stream on it is served
    client.auto_ack = True
    again = client.request("/echo")
    client.wait(lambda c: c.ended(again))
    assert client.status(again) == 200
    client.close()
    still_serves(proxy)


def test_header_limits(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy()  # max_header_list_size 16384, limits.max_headers 100
    # too many fields: 431 on that stream, the connection lives on
    client = RawH2(proxy.port)
    sid = client.request("/echo", headers=[(f"x-h{i}", "v") for i in range(150)])
    client.wait(lambda c: c.ended(sid))
    assert client.status(sid) == 431
    wait_until(lambda: proxy.metric(REJECTED, reason="h2_too_many_headers") >= 1)
    client.close()
    # a header list over max_header_list_size: GOAWAY, counted
    client = RawH2(proxy.port)
    client.request("/echo", headers=[("x-big", "a" * 17000)])
    goaway = client.wait(lambda c: c.goaway())
    assert goaway is not None
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    wait_until(lambda: proxy.metric(REJECTED, reason="h2_headers_too_large") >= 1)
    client.close()
    still_serves(proxy)


def test_a_stalled_request_body_is_408(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(limits={"body_timeout_seconds": 0.5})
    client = RawH2(proxy.port)
    sid = client.request("/upload", method="POST", end=False)
    client.conn.send_data(sid, b"a few bytes, then nothing")
    client.flush()
    client.wait(lambda c: c.ended(sid), timeout=10)
    assert client.status(sid) == 408
    wait_until(lambda: proxy.metric(REJECTED, reason="h2_body_timeout") >= 1)
    client.close()
    still_serves(proxy)


def test_a_body_over_max_body_bytes_is_413(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(limits={"max_body_bytes": 1000})
    client = RawH2(proxy.port)
    sized = client.request("/upload", method="POST", headers=[("content-length", "5000")], end=False)
    client.wait(lambda c: c.ended(sized))
    assert client.status(sized) == 413
    streamed = client.request("/upload", method="POST", end=False)
    client.conn.send_data(streamed, b"x" * 5000)
    client.flush()
    client.wait(lambda c: c.ended(streamed))
    assert client.status(streamed) in (413, None)  # 413 unless the answer had begun: then RST_STREAM
    wait_until(lambda: proxy.metric(REJECTED, reason="h2_body_too_large") >= 2)
    client.close()
    still_serves(proxy)


def test_many_streams_wait_on_a_client_that_reads_slowly(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(limits={"send_timeout_seconds": 30})
    client = RawH2(proxy.port, settings={CODES.INITIAL_WINDOW_SIZE: 2**31 - 1})
    client.conn.increment_flow_control_window(2**31 - 1 - 65535)
    client.flush()
    size = 2 * 1024 * 1024
    streams = [client.request(f"/stream?bytes={size}&sized=1") for _ in range(16)]
    time.sleep(1.0)  # not reading: the proxy's write buffer fills and every stream waits on it
    client.wait(lambda c: all(c.ended(sid) for sid in streams), timeout=60)
    for sid in streams:
        assert client.status(sid) == 200
        assert len(client.data.get(sid, b"")) == size
    client.close()


def test_an_idle_connection_gets_goaway(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(http2={"idle_timeout_seconds": 0.5})
    client = RawH2(proxy.port)
    sid = client.request("/echo")
    client.wait(lambda c: c.ended(sid))
    goaway = client.wait(lambda c: c.goaway(), timeout=10)
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert goaway.last_stream_id == sid
    client.wait(lambda c: c.closed)
    assert client.closed


def test_an_upstream_reset_mid_answer_resets_the_stream(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy()
    client = RawH2(proxy.port)
    sid = client.request("/reset")  # the backend promises 100000 bytes, sends 1000, drops
    client.wait(lambda c: c.ended(sid), timeout=20)
    reset = client.of(h2.events.StreamReset, sid)
    assert reset and reset[0].error_code == h2.errors.ErrorCodes.INTERNAL_ERROR
    assert not client.of(h2.events.StreamEnded, sid)  # never passed off as complete
    assert len(client.data.get(sid, b"")) < 100000
    again = client.request("/echo")  # the connection's other streams are not affected
    client.wait(lambda c: c.ended(again))
    assert client.status(again) == 200
    client.close()


def test_a_declared_empty_body_is_not_reset(start_proxy: Callable[..., ProxyProcess]) -> None:
    """Found by the generated batches: PATCH with content-length 0 was answered, then its stream
    reset (NO_ERROR) before httpx could send END_STREAM, which httpx reports as a local error."""
    proxy = start_proxy()
    client = RawH2(proxy.port)
    sid = client.request("/echo", method="PATCH", headers=[("content-length", "0")], end=False)
    client.wait(lambda c: c.ended(sid))
    assert client.status(sid) == 200
    assert not client.of(h2.events.StreamReset, sid)
    client.conn.end_stream(sid)
    client.flush()
    again = client.request("/echo")
    client.wait(lambda c: c.ended(again))
    assert client.status(again) == 200
    client.close()
