"""A backend that misbehaves over HTTP/2: every case ends in a clear answer (a gRPC status, or a
cut connection once the answer had started), a metric, and a proxy that goes on serving."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.grpc.rawh2 import RawH2Server
from tests.support import ProxyProcess

HEADERS = {"content-type": "application/grpc", "te": "trailers"}
BODY = b"\0\0\0\0\x02hi"


@pytest.fixture()
def raw() -> Iterator[RawH2Server]:
    server = RawH2Server()
    yield server
    server.stop()


@pytest.fixture()
def raw_proxy(
    proxy_factory: Callable[..., ProxyProcess], raw: RawH2Server, redis_url: str
) -> Callable[..., ProxyProcess]:
    def start(**settings: object) -> ProxyProcess:
        base = {"v1_url": raw.url, "v2_url": raw.url, "v1_protocol": "h2", "v2_protocol": "h2"}
        return proxy_factory(**{**base, "redis_url": redis_url, **settings})

    return start


def post(proxy: ProxyProcess, path: str = "/pkg.Svc/Call") -> httpx.Response:
    with httpx.Client(timeout=10) as client:
        return client.post(proxy.url + path, content=BODY, headers=HEADERS)


def still_serves(proxy: ProxyProcess, raw: RawH2Server) -> None:
    raw.mode = "ok"
    response = post(proxy)
    assert response.status_code == 200 and response.content == b"\0\0\0\0\x05hello"


def test_oversized_answer_headers_are_a_protocol_error(
    raw_proxy: Callable[..., ProxyProcess], raw: RawH2Server
) -> None:
    raw.mode = "big_headers"
    proxy = raw_proxy()
    response = post(proxy)
    assert response.headers["grpc-status"] == "14"
    assert "x-big" not in response.headers
    assert proxy.metric("strangler_upstream_errors_total", version="v1", kind="protocol") == 1
    still_serves(proxy, raw)


def test_garbage_frames_are_a_protocol_error(
    raw_proxy: Callable[..., ProxyProcess], raw: RawH2Server
) -> None:
    raw.mode = "garbage"
    proxy = raw_proxy()
    response = post(proxy)
    assert response.headers["grpc-status"] == "14"
    assert proxy.metric("strangler_upstream_errors_total", version="v1", kind="protocol") == 1
    still_serves(proxy, raw)


def test_a_stream_reset_mid_answer_cuts_the_client_connection(
    raw_proxy: Callable[..., ProxyProcess], raw: RawH2Server
) -> None:
    raw.mode = "reset"
    proxy = raw_proxy()
    with pytest.raises(httpx.RemoteProtocolError):
        post(proxy)  # never a truncated body passed off as complete
    assert proxy.metric("strangler_upstream_errors_total", version="v1", kind="reset") == 1
    assert proxy.metric("http_requests_total", version="v1", code="502") == 1
    still_serves(proxy, raw)


def test_a_refused_stream_is_sent_again_once(
    raw_proxy: Callable[..., ProxyProcess], raw: RawH2Server
) -> None:
    raw.mode = "refuse_first"
    proxy = raw_proxy()
    response = post(proxy)
    assert response.status_code == 200 and response.content == b"\0\0\0\0\x05hello"
    assert raw.requests == 2


def test_goaway_before_processing_is_retried_on_a_new_connection(
    raw_proxy: Callable[..., ProxyProcess], raw: RawH2Server
) -> None:
    raw.mode = "goaway_first"
    proxy = raw_proxy()
    response = post(proxy)
    assert response.status_code == 200 and response.content == b"\0\0\0\0\x05hello"
    assert raw.connections == 2


def test_a_silent_backend_times_out_by_the_grpc_deadline(
    raw_proxy: Callable[..., ProxyProcess], raw: RawH2Server
) -> None:
    raw.mode = "silent"
    proxy = raw_proxy()
    with httpx.Client(timeout=10) as client:
        response = client.post(
            proxy.url + "/pkg.Svc/Call", content=BODY, headers={**HEADERS, "grpc-timeout": "200m"}
        )
    assert response.headers["grpc-status"] == "4"  # DEADLINE_EXCEEDED
    assert proxy.metric("strangler_upstream_errors_total", version="v1", kind="timeout") == 1
    assert proxy.metric("strangler_grpc_requests_total", grpc_code="DEADLINE_EXCEEDED") == 1
    still_serves(proxy, raw)


def test_streams_beyond_the_backends_limit_open_a_second_connection(
    raw_proxy: Callable[..., ProxyProcess], raw: RawH2Server
) -> None:
    raw.mode = "slow"
    raw.delay = 0.5
    raw.max_streams = 1
    proxy = raw_proxy()
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: post(proxy), range(3)))
    assert [(a.status_code, a.content, a.headers.get("grpc-message")) for a in answers] == [
        (200, b"\0\0\0\0\x05hello", None)
    ] * 3
    assert raw.connections >= 2
    assert raw.peak_streams == 1


def test_plain_http_over_h2_keeps_its_status_and_body(
    raw_proxy: Callable[..., ProxyProcess], raw: RawH2Server
) -> None:
    proxy = raw_proxy()
    with httpx.Client(timeout=10) as client:
        response = client.get(proxy.url + "/plain")
    assert response.status_code == 200 and response.content == b"\0\0\0\0\x05hello"
    assert proxy.metric("strangler_grpc_requests_total") == 0  # not a gRPC call: HTTP metrics only
    assert proxy.metric("http_requests_total", version="v1", code="200") == 1
