"""The request never chooses where it goes, and one client's bytes never reach another client.

Raw sockets against the real proxy and raw recording backends: each case asserts the exact status,
that nothing reached any host but the configured backends, and which bytes each backend received.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.hostile.rawhttp import exchange
from tests.hostile.recorder import RecordingServer
from tests.rawserver import RawServer, read_request_head
from tests.support import ProxyProcess, RedisServer, free_port, wait_until

H = b"Host: app.test\r\n"
CLOSE = b"Connection: close\r\n"


def rejected(proxy: ProxyProcess, reason: str) -> float:
    return proxy.metric("strangler_rejected_requests_total", reason=reason)


# --- the request target ----------------------------------------------------------------------------


TARGETS = {  # id -> (target, the refusal counted: llhttp itself refuses some forms as malformed)
    "asterisk_userinfo_path": (b"*@127.0.0.1:{other}/ssrf", "bad_target"),
    "asterisk_userinfo": (b"*@127.0.0.1:{other}", "bad_target"),
    "asterisk_word": (b"*x", "bad_target"),
    "authority_form": (b"127.0.0.1:{other}", "malformed"),
    "at_sign": (b"@127.0.0.1:{other}/x", "malformed"),
}


@pytest.mark.parametrize("case", list(TARGETS))
def test_a_target_that_is_not_a_path_never_reaches_any_host(
    hostile_proxy: ProxyProcess,
    recorders: dict[str, RecordingServer],
    v1_recorder: RecordingServer,
    case: str,
) -> None:
    target, reason = TARGETS[case]
    target = target.replace(b"{other}", str(recorders["other"].port).encode())
    before = rejected(hostile_proxy, reason)
    v2_errors = hostile_proxy.metric("http_errors_total", version="v2")
    reply = exchange(
        hostile_proxy.port, b"GET " + target + b" HTTP/1.1\r\n" + H + b"X-Strangler-Version: v2\r\n\r\n"
    )
    assert reply.status == 400, reply.raw[:300]
    assert reason.replace("_", " ").encode() in reply.body
    assert reply.closed
    assert rejected(hostile_proxy, reason) == before + 1
    for name, server in recorders.items():
        assert server.raw == b"", f"{name} received {server.raw[:200]!r}"
    # the client's mistake is never a version's error (the canary reads these)
    assert hostile_proxy.metric("http_errors_total", version="v2") == v2_errors


def test_asterisk_form_cannot_reach_the_admin_api_from_outside(
    hostile_proxy: ProxyProcess, redis_server: RedisServer, recorders: dict[str, RecordingServer]
) -> None:
    """The attack that used to work: the proxy calling its own admin API from loopback."""
    redis = redis_server.client()
    split_key = hostile_proxy.settings["split_key"]
    before = redis.get(split_key)
    body = b'{"percentage": 77}'
    data = (b"PUT *@127.0.0.1:%d/_strangler/split HTTP/1.1\r\n" % hostile_proxy.port + H
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
    with socket.create_connection(("127.0.0.1", hostile_proxy.port), source_address=("127.0.0.2", 0)) as sock:
        sock.settimeout(5)
        sock.sendall(data)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert redis.get(split_key) == before
    assert all(server.raw == b"" for server in recorders.values())


def test_options_asterisk_is_answered_by_the_proxy(
    hostile_proxy: ProxyProcess, recorders: dict[str, RecordingServer], v1_recorder: RecordingServer
) -> None:
    v2_errors = hostile_proxy.metric("http_errors_total", version="v2")
    for _ in range(5):
        reply = exchange(
            hostile_proxy.port,
            b"OPTIONS * HTTP/1.1\r\n" + H + b"X-Strangler-Version: v2\r\n" + CLOSE + b"\r\n",
        )
        assert reply.status == 200
        assert b"GET" in reply.headers[b"allow"] and reply.body == b""
    assert all(server.raw == b"" for server in recorders.values())
    assert hostile_proxy.metric("http_errors_total", version="v2") == v2_errors


def test_absolute_form_goes_to_the_configured_backend_with_its_path_only(
    hostile_proxy: ProxyProcess, recorders: dict[str, RecordingServer], v1_recorder: RecordingServer
) -> None:
    other = recorders["other"].port
    reply = exchange(
        hostile_proxy.port, b"GET http://127.0.0.1:%d/abs?q=1 HTTP/1.1\r\n" % other + H + CLOSE + b"\r\n"
    )
    assert reply.status == 200
    assert [r.target for r in v1_recorder.requests] == [b"/abs?q=1"]
    assert recorders["other"].raw == b""


def test_content_length_goes_upstream_as_the_canonical_number(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    padded = b"0" * 30 + b"5"
    for text in (b"005", padded):
        v1_recorder.clear()
        reply = exchange(
            hostile_proxy.port,
            b"POST /echo HTTP/1.1\r\n" + H + CLOSE + b"Content-Length: " + text + b"\r\n\r\nhello",
        )
        assert reply.status == 200
        (request,) = v1_recorder.requests
        assert request.header(b"content-length") == [b"5"] and request.body == b"hello"


def test_client_cannot_forge_the_proxys_markers(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    reply = exchange(
        hostile_proxy.port,
        b"GET /echo HTTP/1.1\r\n"
        + H
        + CLOSE
        + b"X-Strangler-Shadow: 1\r\nX-Strangler-Calibration: 1\r\n\r\n",
    )
    assert reply.status == 200
    (request,) = v1_recorder.requests
    assert not [name for name, _ in request.headers if name.lower().startswith(b"x-strangler-")]


# --- backends that misbehave on a pooled connection ----------------------------------------------


# Content-Length says 5 bytes, chunked says more; either way a complete second answer follows it on
# the same connection, waiting to be read as the next client's answer (response smuggling).
CLTE_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"
)


# a backend trying to pass its own hop-by-hop headers, an internal address and a forged version on
HOP_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive, X-Backend-Hop\r\n"
    b"X-Backend-Hop: internal-10.0.0.7\r\nKeep-Alive: timeout=5, max=100\r\nX-Api-Version: v9\r\n"
    b"Proxy-Authenticate: Basic\r\nTrailer: X-Checksum\r\nX-Kept: yes\r\nX-Kept: twice\r\n"
)
HOP_BODIES = {b"/hop": b"h" * 300, b"/hop-large": b"H" * 200_000}  # the fast path, the streamed one
# a plain "Connection: keep-alive" first (the one the edge cuts by position), then a second
# Connection header naming a header that carries a secret: it must go too
SPLIT_HOP_HEAD = (
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Type: text/plain\r\n"
    b"Connection: X-Internal-Token\r\nX-Internal-Token: secret-0123\r\nContent-Length: 5\r\n\r\nsplit"
)


# a HEAD answer whose declared length is followed by that many bytes: a whole forged answer. A HEAD
# answer has no body (RFC 9110 9.3.2), so those bytes are a second answer nobody asked for.
HEAD_SMUGGLE_BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nPOISONED"
HEAD_SMUGGLE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(HEAD_SMUGGLE_BODY)
HEAD_SMUGGLE = (b"/head-same", b"/head-late")


class ScriptedBackend(RawServer):
    """A raw keep-alive backend: answers ``T=<target>``; ``/poison`` writes a second, unrequested
    answer 0.3 s after the first; ``/switch`` answers 101 to a plain request; after ``/drop-next``
    the next request on that connection is read, then the connection closes with no answer (the
    keep-alive race: a backend closing an idle connection just as the proxy reuses it); ``/slow``
    answers after 0.3 s; ``/hop`` and ``/hop-large`` answer with ``HOP_HEAD``, ``/hop-split`` with
    ``SPLIT_HOP_HEAD``."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []  # request targets, in the order they arrived
        self.poisoned = threading.Event()  # set once the unrequested answer is written
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        buffer = b""
        drop_next = False
        with conn:
            while True:
                try:
                    got = read_request_head(conn, buffer)
                except OSError:
                    return
                if got is None:
                    return
                head, buffer = got
                method, target = head.split(b" ")[:2]
                self.seen.append(target)
                if drop_next:
                    return  # read, never answered: the connection closes
                drop_next = target == b"/drop-next"
                try:
                    if target == b"/clte":  # both framings: read by length, a second answer hides in it
                        conn.sendall(CLTE_ANSWER)
                        continue
                    if target == b"/switch":
                        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: evil\r\n\r\nRAW")
                        continue
                    if target == b"/double":  # a second, unrequested answer in the same packet
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nT=/double"
                                     b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nPOISONED")  # fmt: skip
                        continue
                    if method == b"HEAD" and target in HEAD_SMUGGLE:  # a HEAD answer with a "body"
                        conn.sendall(HEAD_SMUGGLE_HEAD)
                        if target == b"/head-late":
                            time.sleep(0.2)  # the stray bytes come after the head, on an idle connection
                        conn.sendall(HEAD_SMUGGLE_BODY)
                        continue
                    if target == b"/hop-split":
                        conn.sendall(SPLIT_HOP_HEAD)
                        continue
                    if target in HOP_BODIES:
                        hop = HOP_BODIES[target]
                        conn.sendall(HOP_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(hop), hop))
                        continue
                    if target == b"/slow":
                        time.sleep(0.3)
                    body = b"T=" + target
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                    if target == b"/poison":
                        time.sleep(0.3)
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nPOISONED")
                        self.poisoned.set()
                except OSError:
                    return


def one_backend_proxy(
    proxy_factory: Callable[..., ProxyProcess], backend_url: str, redis_url: str, prefix: str, **settings: Any
) -> ProxyProcess:
    """A proxy whose two versions are one test backend, with Redis keys of its own."""
    return proxy_factory(
        v1_url=backend_url, v2_url=backend_url, redis_url=redis_url, split_key=prefix + "split",
        key_prefix=prefix, **settings,
    )  # fmt: skip


@pytest.fixture()
def scripted(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> Iterator[tuple[ScriptedBackend, ProxyProcess]]:
    backend = ScriptedBackend()
    proxy = one_backend_proxy(proxy_factory, backend.url, redis_url, "sc:")
    yield backend, proxy
    backend.stop()


def test_an_idle_pooled_connection_that_speaks_is_dropped_never_reused(
    scripted: tuple[ScriptedBackend, ProxyProcess],
) -> None:
    backend, proxy = scripted
    with httpx.Client(timeout=5) as client:
        assert client.get(proxy.url + "/poison").text == "T=/poison"
        assert backend.poisoned.wait(5)  # an unrequested answer is now on the idle connection
        for i in range(10):
            # new clients each: none may get the stray answer or the one meant for another
            with httpx.Client(timeout=5) as other:
                assert other.get(proxy.url + f"/after-{i}").text == f"T=/after-{i}"
    assert proxy.metric("strangler_upstream_errors_total", version="v1", kind="idle_readable") >= 1


@pytest.mark.parametrize("target", list(HOP_BODIES))
def test_only_end_to_end_headers_of_an_answer_reach_the_client(
    scripted: tuple[ScriptedBackend, ProxyProcess], target: bytes
) -> None:
    """Hop-by-hop headers (RFC 9110 7.6.1), those the backend names in Connection and a forged
    X-Api-Version stop at the proxy (the edge client strips them while parsing)."""
    _, proxy = scripted
    request = b"GET " + target + b" HTTP/1.1\r\n" + H + b"\r\n"
    for _ in range(3):  # the first opens the upstream connection; the others reuse it
        reply = exchange(proxy.port, request + request, timeout=10)  # two pipelined: both framed right
        assert reply.status == 200, reply.raw[:400]
        head = reply.raw.partition(b"\r\n\r\n")[0].lower()
        for gone in (b"x-backend-hop", b"keep-alive:", b"proxy-authenticate", b"trailer:", b"v9",
                     b"internal-10.0.0.7"):  # fmt: skip
            assert gone not in head, head
        assert head.count(b"\r\nx-api-version: v1") == 1
        assert head.count(b"\r\nx-kept: ") == 2  # repeats kept, in order
        assert b"\r\ncontent-type: application/json" in head
        assert reply.body.startswith(HOP_BODIES[target])


def test_a_second_connection_header_still_drops_the_header_it_names(
    scripted: tuple[ScriptedBackend, ProxyProcess],
) -> None:
    """The edge cuts a lone plain Connection header by its position; a second Connection header
    naming another one must still send the answer through the full hop-by-hop pass."""
    _, proxy = scripted
    request = b"GET /hop-split HTTP/1.1\r\n" + H + b"\r\n"
    for _ in range(2):  # a new upstream connection, then a reused one
        reply = exchange(proxy.port, request, timeout=10)
        assert (reply.status, reply.body) == (200, b"split"), reply.raw[:400]
        head = reply.raw.partition(b"\r\n\r\n")[0].lower()
        assert b"x-internal-token" not in head and b"secret-0123" not in head, head
        assert b"\r\ncontent-type: text/plain" in head


def test_a_reused_connection_closed_without_an_answer_is_retried_once_on_a_new_one(
    scripted: tuple[ScriptedBackend, ProxyProcess],
) -> None:
    """The keep-alive race on the fast path (a request taken with no task): nothing was answered,
    so the request goes again on a fresh connection and the client never sees the race."""
    backend, proxy = scripted
    with httpx.Client(timeout=5) as client:
        assert client.get(proxy.url + "/drop-next").text == "T=/drop-next"
        assert backend.connections == 1
        reply = client.get(proxy.url + "/after-race")
    assert (reply.status_code, reply.text) == (200, "T=/after-race")
    assert backend.connections == 2
    assert proxy.metric("http_errors_total", version="v1") == 0


def test_a_second_answer_in_the_same_packet_is_dropped_with_its_connection(
    scripted: tuple[ScriptedBackend, ProxyProcess],
) -> None:
    """On the fast path (a warm connection, no task) the requested answer is delivered and the
    unrequested one behind it in the same packet drops the connection before it can be reused."""
    backend, proxy = scripted
    with httpx.Client(timeout=5) as client:
        assert client.get(proxy.url + "/warm").text == "T=/warm"
        reply = client.get(proxy.url + "/double")
        assert (reply.status_code, reply.text) == (200, "T=/double")
        for i in range(3):
            assert client.get(proxy.url + f"/after-{i}").text == f"T=/after-{i}"
    assert backend.connections == 2  # the connection that carried the stray answer was not reused


@pytest.mark.parametrize("target", HEAD_SMUGGLE)
def test_a_head_answer_followed_by_body_bytes_never_answers_the_next_request(
    scripted: tuple[ScriptedBackend, ProxyProcess], target: bytes
) -> None:
    """A backend that sends a body after a HEAD answer (here a whole forged answer, in the same
    packet or a moment later): the HEAD gets its head alone, and the stray bytes are never read as
    the answer to a later request on that upstream connection, from this client or another."""
    _, proxy = scripted
    path = target.decode()
    with httpx.Client(timeout=5) as client:
        assert client.get(proxy.url + "/warm").text == "T=/warm"  # the fast path: a warm connection
        for round_ in range(3):
            head = client.head(proxy.url + path)
            assert head.status_code == 200 and head.content == b""
            if target == b"/head-late":
                time.sleep(0.3)  # the forged answer is on the idle pooled connection by now
            assert client.get(proxy.url + f"/after-{round_}").text == f"T=/after-{round_}"
            with httpx.Client(timeout=5) as other:
                assert other.get(proxy.url + f"/other-{round_}").text == f"T=/other-{round_}"
    assert proxy.metric("http_errors_total", version="v1") == 0


def test_a_client_gone_before_its_answer_leaves_nothing_for_the_next_client(
    scripted: tuple[ScriptedBackend, ProxyProcess],
) -> None:
    """The answer to a client that left while the fast path waited for the backend is read in
    full and dropped; the connection goes back to the pool clean, so the next clients get their
    own answers on it."""
    backend, proxy = scripted
    gone_before = proxy.metric("strangler_client_disconnects_total", version="v1", stage="response")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /warm HTTP/1.1\r\n" + H + b"\r\n")
        assert b"T=/warm" in sock.recv(65536)  # a warm pooled connection: the next request is taken at once
        sock.sendall(b"GET /slow HTTP/1.1\r\n" + H + b"\r\n")
        wait_until(lambda: b"/slow" in backend.seen, timeout=5)
    # the client is gone; the backend answers 0.3 s later
    wait_until(
        lambda: (
            proxy.metric("strangler_client_disconnects_total", version="v1", stage="response")
            == gone_before + 1
        ),
        timeout=5,
    )
    with httpx.Client(timeout=5) as client:
        for i in range(5):
            assert client.get(proxy.url + f"/next-{i}").text == f"T=/next-{i}"
    assert backend.connections == 1  # the connection that carried /slow was reused, clean
    assert proxy.metric("http_errors_total", version="v1") == 0


def test_an_unsolicited_101_is_a_502_and_the_connection_is_dropped(
    scripted: tuple[ScriptedBackend, ProxyProcess],
) -> None:
    backend, proxy = scripted
    reply = exchange(proxy.port, b"GET /switch HTTP/1.1\r\n" + H + CLOSE + b"\r\n")
    assert reply.status == 502
    assert b"RAW" not in reply.raw and b"101" not in reply.raw.split(b"\r\n")[0]
    assert proxy.metric("strangler_upstream_errors_total", version="v1", kind="protocol") == 1
    # the next request is served on a fresh connection, with its own answer
    assert httpx.get(proxy.url + "/next", timeout=5).text == "T=/next"


def test_error_answers_name_no_internal_address(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> None:
    dead = free_port()
    url = f"http://127.0.0.1:{dead}"
    proxy = proxy_factory(v1_url=url, v2_url=url, redis_url=redis_url, split_key="d:split", key_prefix="d:")
    response = httpx.get(proxy.url + "/x", timeout=5)
    assert response.status_code == 502
    assert response.json() == {
        "error": "upstream unavailable",
        "version": "v1",
        "detail": "cannot connect: connection refused",
    }
    assert str(dead) not in response.text and "127.0.0.1" not in response.text
    assert str(dead) not in proxy.metrics()


# --- the pool under slow clients -------------------------------------------------------------------


def test_slow_uploads_hold_no_backend_connection(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    """300 clients each send 1 byte of a declared 1000-byte body and stall. Their bodies are
    buffered by the proxy (they are under body_buffer_bytes), so not one backend connection is
    taken for them, and an ordinary GET is served at once."""
    connections_before = len(v1_recorder.connections)
    slow: list[socket.socket] = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", hostile_proxy.port))
            sock.sendall(b"POST /slow HTTP/1.1\r\n" + H + b"Content-Length: 1000\r\n\r\nx")
            slow.append(sock)
        reply = exchange(hostile_proxy.port, b"GET /fast HTTP/1.1\r\n" + H + CLOSE + b"\r\n", timeout=5)
        assert reply.status == 200
        assert [r.target for r in v1_recorder.requests] == [b"/fast"]
        assert len(v1_recorder.connections) - connections_before <= 1
    finally:
        for sock in slow:
            sock.close()


def test_a_full_pool_is_a_bounded_503_not_a_versions_error(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str, backend_factory: Callable[[str], object]
) -> None:
    from tests.support import Backend

    slow = backend_factory("v1")
    assert isinstance(slow, Backend)
    proxy = proxy_factory(v1_url=slow.url, v2_url=slow.url, redis_url=redis_url, upstream_pool_size=2,
                          pool_timeout_seconds=0.3, split_key="pool:split", key_prefix="pool:")  # fmt: skip
    results: list[int] = []

    def hold() -> None:
        results.append(httpx.get(proxy.url + "/slow?ms=2000", timeout=10).status_code)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for thread in holders:
        thread.start()
    # both holders are waiting on the backend (2 s), holding the pool's 2 connections
    wait_until(lambda: len(slow.log()) == 2, timeout=5, message="both holders reached the backend")
    busy = httpx.get(proxy.url + "/x", timeout=5)
    assert busy.status_code == 503
    assert busy.json()["error"] == "upstream busy"
    for thread in holders:
        thread.join()
    assert results == [200, 200]
    assert proxy.metric("strangler_upstream_errors_total", version="v1", kind="pool_timeout") == 1
    # the proxy's own limit: never counted as v1's error (the canary compares versions by these)
    assert proxy.metric("http_errors_total", version="v1") == 0
    assert proxy.metric("http_errors_total", version="proxy") == 1


def test_a_streamed_upload_below_the_minimum_rate_gets_408(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> None:
    backend = RecordingServer().start()
    try:
        limits = {
            "body_buffer_bytes": 1024,
            "min_body_rate_bytes_per_second": 1000,
            "body_rate_grace_seconds": 0.5,
        }
        proxy = one_backend_proxy(proxy_factory, backend.url, redis_url, "r:", limits=limits)
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.settimeout(5)
            sock.sendall(b"POST /up HTTP/1.1\r\n" + H + b"Content-Length: 100000\r\n\r\n" + b"x" * 2000)
            answer = b""
            for _ in range(60):  # a trickle of 250 B/s: the average falls below 1,000 B/s after ~2.7 s
                time.sleep(0.1)
                try:
                    sock.sendall(b"x" * 25)
                except OSError:
                    break
            try:
                answer = sock.recv(65536)
            except OSError:
                pass
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert proxy.metric("strangler_rejected_requests_total", reason="body_too_slow") == 1
        assert backend.requests == []  # the upload never completed upstream
    finally:
        backend.stop()


# --- connection limits -------------------------------------------------------------------------------


def test_an_idle_connection_flood_does_not_lock_out_a_normal_client(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> None:
    backend = RecordingServer().start()
    flood: list[socket.socket] = []
    try:
        proxy = one_backend_proxy(proxy_factory, backend.url, redis_url, "c:", limits={"max_connections": 50})
        for _ in range(200):
            flood.append(socket.create_connection(("127.0.0.1", proxy.port)))
        reply = exchange(proxy.port, b"GET /normal HTTP/1.1\r\n" + H + CLOSE + b"\r\n", timeout=5)
        assert reply.status == 200
        assert [r.target for r in backend.requests] == [b"/normal"]
        assert proxy.metric("strangler_rejected_requests_total", reason="idle_closed") >= 150
    finally:
        for sock in flood:
            sock.close()
        backend.stop()


def _until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return data
        if not chunk:
            return data
        data += chunk


def test_requests_pipelined_past_the_cap_are_answered_up_to_it_then_the_connection_closes(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> None:
    """llhttp parses all it is fed, so a client could queue thousands of requests in one packet;
    past ``max_pipelined_requests`` the proxy stops: those received are answered in order, then
    the connection closes (a pipelining client sends the rest again, RFC 9112 9.3.2)."""
    backend = RecordingServer().start()
    try:
        proxy = one_backend_proxy(
            proxy_factory, backend.url, redis_url, "q:", limits={"max_pipelined_requests": 8}
        )
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.settimeout(5)
            sock.sendall(b"".join(b"GET /p%d HTTP/1.1\r\n" % i + H + b"\r\n" for i in range(50)))
            raw = _until_closed(sock)
        assert raw.count(b"HTTP/1.1 200 ") == 9, raw[:300]  # the one in progress and 8 queued
        assert [r.target for r in backend.requests] == [b"/p%d" % i for i in range(9)]
        assert proxy.metric("strangler_rejected_requests_total", reason="too_many_pipelined") == 1
    finally:
        backend.stop()


def test_a_client_that_never_reads_its_answers_cannot_grow_the_proxy(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> None:
    """Requests sent one after another (never more than the pipelining cap ahead), answers never
    read: once our write buffer to the client is full the proxy serves it nothing more and reads
    nothing more; after ``keepalive_timeout_seconds`` of that the connection is dropped (a close
    would wait for ever to flush answers nobody reads). Other clients are served throughout."""
    backend = RecordingServer(answer=lambda request: b"x" * 8192).start()
    try:
        limits = {"keepalive_timeout_seconds": 1.0}
        # a process: its RSS is measured
        proxy = one_backend_proxy(proxy_factory, backend.url, redis_url, "u:", process=True, limits=limits)
        before = proxy.rss()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", proxy.port))
        sock.setblocking(False)
        requests = b"GET /unread HTTP/1.1\r\n" + H + b"\r\n"
        sent, dropped, started = 0, False, time.monotonic()
        try:
            while time.monotonic() - started < 15:
                try:
                    sent += sock.send(requests * 4)
                except BlockingIOError:
                    pass
                except (ConnectionResetError, BrokenPipeError):
                    dropped = True
                    break
                time.sleep(0.005)
            grown = proxy.rss() - before
        finally:
            sock.close()
        assert dropped, f"the proxy kept the connection for 15 s ({sent} bytes of requests taken)"
        assert grown < 20 * 1024 * 1024, f"RSS grew by {grown / 1e6:.1f} MB"
        assert proxy.metric("strangler_rejected_requests_total", reason="answers_unread") == 1
        assert httpx.get(proxy.url + "/after", timeout=5).status_code == 200
    finally:
        backend.stop()


def test_a_backend_answer_with_two_framings_is_a_502_and_smuggles_nothing(
    scripted: tuple[ScriptedBackend, ProxyProcess],
) -> None:
    """An answer carrying both Content-Length and Transfer-Encoding can be cut two ways; llhttp
    refuses it, the connection is dropped, and no later client reads what followed it."""
    backend, proxy = scripted
    reply = exchange(proxy.port, b"GET /clte HTTP/1.1\r\n" + H + CLOSE + b"\r\n")
    assert reply.status == 502, reply.raw[:300]
    assert b"SMUGGLED" not in reply.raw and b"hello" not in reply.body
    expected = {"error": "upstream unavailable", "version": "v1", "detail": "invalid HTTP answer"}
    assert json.loads(reply.body) == expected
    assert proxy.metric("strangler_upstream_errors_total", version="v1", kind="protocol") == 1
    for i in range(5):  # new clients, new answers: the smuggled one never surfaces
        assert httpx.get(proxy.url + f"/next-{i}", timeout=5).text == f"T=/next-{i}"
