"""Requests the proxy must refuse: the exact status, the connection closed, a metric counted, and
not one byte at any backend (so no request can be read one way by us and another by them).

Each case is raw bytes on a socket. Framing attacks (CL.TE, TE.CL, TE.TE, obfuscated lengths) are
the classic request-smuggling set; the limits follow nginx/Envoy (docs/security.md).
"""

from __future__ import annotations

import pytest

from tests.hostile.conftest import MAX_BODY
from tests.hostile.rawhttp import exchange
from tests.hostile.recorder import RecordingServer
from tests.support import ProxyProcess

H = b"Host: app.test\r\n"
TE = b"Transfer-Encoding: chunked\r\n"
HELLO_CHUNKED = b"5\r\nhello\r\n0\r\n\r\n"


def post(headers: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST /echo " + version + b"\r\n" + H + headers + b"\r\n" + body


def get(headers: bytes = b"", target: bytes = b"/echo", version: bytes = b"HTTP/1.1") -> bytes:
    return b"GET " + target + b" " + version + b"\r\n" + headers + b"\r\n"


# id -> (request bytes, status, reason counted in strangler_rejected_requests_total)
CASES: dict[str, tuple[bytes, int, str]] = {
    # --- Content-Length / Transfer-Encoding ambiguity -----------------------------------------
    "cl_and_te": (post(b"Content-Length: 6\r\n" + TE, b"0\r\n\r\nG"), 400, "malformed"),
    "two_different_cl": (post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), 400, "malformed"),
    "two_equal_cl": (post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), 400, "malformed"),
    "cl_plus": (post(b"Content-Length: +5\r\n", b"hello"), 400, "malformed"),
    "cl_hex": (post(b"Content-Length: 0x5\r\n", b"hello"), 400, "malformed"),
    "cl_negative": (post(b"Content-Length: -1\r\n", b"hello"), 400, "malformed"),
    "cl_huge": (post(b"Content-Length: 99999999999999999999999\r\n", b"hello"), 400, "malformed"),
    "cl_comma_list": (post(b"Content-Length: 5, 5\r\n", b"hello"), 400, "malformed"),
    "te_chunked_identity": (post(b"Transfer-Encoding: chunked, identity\r\n", HELLO_CHUNKED),
                            400, "malformed"),
    "te_xchunked": (post(b"Transfer-Encoding: xchunked\r\n", HELLO_CHUNKED), 400, "bad_framing"),
    "te_second_header_last_chunked": (post(b"Transfer-Encoding: identity\r\n" + TE, HELLO_CHUNKED),
                                      400, "bad_framing"),
    "te_second_header_last_identity": (post(TE + b"Transfer-Encoding: identity\r\n", HELLO_CHUNKED),
                                       400, "malformed"),
    "te_on_http10": (post(TE, HELLO_CHUNKED, version=b"HTTP/1.0"), 400, "bad_framing"),
    "te_gzip": (post(b"Transfer-Encoding: gzip\r\n", b"hello"), 400, "bad_framing"),
    # --- chunked bodies -------------------------------------------------------------------------
    "chunk_size_not_hex": (post(TE, b"zz\r\nhello\r\n0\r\n\r\n"), 400, "malformed"),
    "chunk_size_overlong": (post(TE, b"10000000000000005\r\nhello\r\n0\r\n\r\n"), 400, "malformed"),
    "chunk_size_negative": (post(TE, b"-5\r\nhello\r\n0\r\n\r\n"), 400, "malformed"),
    "chunk_missing_crlf": (post(TE, b"5\r\nhelloXX0\r\n\r\n"), 400, "malformed"),
    "chunk_bare_lf": (post(TE, b"5\nhello\n0\n\n"), 400, "malformed"),
    "chunk_extension_control_char": (post(TE, b"5;a=\x01b\r\nhello\r\n0\r\n\r\n"), 400, "malformed"),
    "trailer_with_content_length": (post(TE, b"5\r\nhello\r\n0\r\nContent-Length: 50\r\n\r\n"),
                                    400, "malformed"),
    # --- header syntax --------------------------------------------------------------------------
    "bare_lf_line_endings": (b"POST /echo HTTP/1.1\nHost: a.test\nContent-Length: 5\n\nhello",
                             400, "malformed"),
    "space_before_colon": (post(b"Content-Length : 5\r\n", b"hello"), 400, "malformed"),
    "obs_fold": (get(H + b"X-A: one\r\n two\r\n"), 400, "malformed"),
    "nul_in_value": (get(H + b"X-A: o\x00ne\r\n"), 400, "malformed"),
    "cr_in_value": (get(H + b"X-A: o\rne\r\n"), 400, "malformed"),
    "lf_in_value": (get(H + b"X-A: o\nX-B: ne\r\n"), 400, "malformed"),
    "separator_in_name": (get(H + b"X(A): 1\r\n"), 400, "malformed"),
    # --- Host -----------------------------------------------------------------------------------
    "two_hosts": (get(H + b"Host: evil.test\r\n"), 400, "bad_host"),
    "no_host_http11": (get(b"Accept: */*\r\n"), 400, "bad_host"),
    "host_with_path": (get(b"Host: evil.test/x?\r\n"), 400, "bad_host"),
    # --- methods, upgrades, versions --------------------------------------------------------------
    "connect": (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n", 400, "connect_refused"),
    "h2c_upgrade_with_body": (post(b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                   b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: 5\r\n",
                                   b"hello" + get(H, b"/smuggled")), 400, "bad_upgrade"),
    "http_1_2": (get(H, version=b"HTTP/1.2"), 400, "malformed"),
    "http_2_0_text": (get(H, version=b"HTTP/2.0"), 400, "bad_version"),
    "http_0_9": (b"GET /echo\r\n\r\n", 400, "bad_version"),
    "garbage_version": (get(H, version=b"HTTP/x.y"), 400, "malformed"),
    "garbage_protocol": (get(H, version=b"FTP/1.1"), 400, "malformed"),
    # --- limits ---------------------------------------------------------------------------------
    "request_line_over_limit": (get(H, b"/" + b"a" * 9000), 414, "request_line_too_long"),
    "one_header_over_limit": (get(H + b"X-Big: " + b"v" * 70000 + b"\r\n"), 431, "headers_too_large"),
    "headers_total_over_limit": (get(H + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))),
                                 431, "headers_too_large"),
    "too_many_headers": (get(H + b"".join(b"X-%d: v\r\n" % i for i in range(150))), 431, "too_many_headers"),
    "body_over_limit_by_content_length": (post(b"Content-Length: %d\r\n" % (MAX_BODY + 1)),
                                          413, "body_too_large"),
    "body_over_limit_sent_in_full": (post(b"Content-Length: %d\r\n" % (16 * MAX_BODY), b"x" * 16 * MAX_BODY),
                                     413, "body_too_large"),
    "body_over_limit_with_expect": (post(b"Expect: 100-continue\r\nContent-Length: %d\r\n" % (10 * MAX_BODY)),
                                    413, "body_too_large"),
    # --- proxy rules ----------------------------------------------------------------------------
    "force_header_v3": (get(H + b"X-Strangler-Version: v3\r\n"), 400, "bad_force_header"),
    "invalid_utf8_in_path": (get(H, b"/echo/\xff\xfe"), 400, "malformed"),
}  # fmt: skip

ADMIN_SPELLINGS = [
    b"//_strangler/metrics",
    b"/_strangler/metrics/",
    b"/_strangler//metrics",
    b"/echo/%2e%2e/_strangler/metrics",
    b"/echo/%2E%2E/_strangler/metrics",
    b"/echo/../_strangler/metrics",
    b"/%5Fstrangler/metrics",
    b"/%5fstrangler/metrics",
    b"/_strangler%2Fmetrics",
    b"/_strangler/./metrics",
    b"/_strangler/%2e/metrics",
    b"/./_strangler/metrics",
    b"/_strangler/status/..",
]


def rejected(proxy: ProxyProcess, reason: str) -> float:
    return proxy.metric("strangler_rejected_requests_total", reason=reason)


@pytest.mark.parametrize("case", list(CASES))
def test_refused_closed_counted_and_nothing_forwarded(
    hostile_proxy: ProxyProcess,
    v1_recorder: RecordingServer,
    recorders: dict[str, RecordingServer],
    case: str,
) -> None:
    data, status, reason = CASES[case]
    before = rejected(hostile_proxy, reason)
    reply = exchange(hostile_proxy.port, data)
    assert reply.status == status, reply.raw[:300]
    assert reply.closed, "a refused connection must be closed"
    assert reply.headers.get(b"connection") == b"close"
    assert len(reply.body) == int(reply.headers[b"content-length"]), "one answer, nothing after it"
    assert rejected(hostile_proxy, reason) == before + 1
    for name, server in recorders.items():
        assert server.raw == b"", f"{name} received bytes for a refused request: {server.raw[:200]!r}"


def test_chunked_body_over_limit_is_413_and_never_complete_upstream(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    """A chunked body has no length up front: it is cut at the limit, and the backend never sees
    a complete request (at most the start of one whose framing is left unfinished)."""
    before = rejected(hostile_proxy, "body_too_large")
    size = MAX_BODY + 4096
    data = (b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % size + b"x" * size + b"\r\n0\r\n\r\n")  # fmt: skip
    reply = exchange(hostile_proxy.port, data)
    assert reply.status == 413
    assert reply.closed
    assert rejected(hostile_proxy, "body_too_large") == before + 1
    assert v1_recorder.requests == []


@pytest.mark.parametrize("target", ADMIN_SPELLINGS, ids=[t.decode() for t in ADMIN_SPELLINGS])
def test_admin_endpoint_has_one_spelling(
    hostile_proxy: ProxyProcess,
    recorders: dict[str, RecordingServer],
    v1_recorder: RecordingServer,
    target: bytes,
) -> None:
    """Another spelling of an admin path neither reaches the admin API nor the backend (which
    might decode it to the same path and treat it as its own)."""
    reply = exchange(hostile_proxy.port, b"GET " + target + b" HTTP/1.1\r\n" + H + b"\r\n")
    assert reply.status == 400, reply.raw[:300]
    assert b"non canonical admin path" in reply.body
    assert b"http_requests_total" not in reply.body
    assert reply.closed
    for server in recorders.values():
        assert server.raw == b""


def test_the_plain_admin_spelling_still_works(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    reply = exchange(
        hostile_proxy.port, b"GET /_strangler/metrics HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"
    )
    assert reply.status == 200
    assert b"strangler_rejected_requests_total" in reply.body
    assert v1_recorder.raw == b""


def test_proxy_still_serves_after_every_refusal(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    """All of the above on one connection each; the process is alive and serving afterwards."""
    for data, _, _ in CASES.values():
        exchange(hostile_proxy.port, data, timeout=2)
    reply = exchange(hostile_proxy.port, b"GET /after HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    assert reply.status == 200
    assert hostile_proxy.process is not None and hostile_proxy.process.poll() is None
    assert [r.target for r in v1_recorder.requests] == [b"/after"]
