"""HTTP/1.1 clients through the proxy to grpcio backends spoken to over h2c: the upstream HTTP/2
client, the duplex path, the gRPC metrics (the status from the trailers), the fallback to v1.

An HTTP/1.1 client gets the answer's body but not its trailers (HTTP/1.1 answers carry none from
the proxy): the metrics show what the trailers said."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from tests.grpc.interop import SERVICE, InteropServer, Protos, frame, unframe
from tests.support import ProxyProcess, free_port

GRPC_HEADERS = {"content-type": "application/grpc", "te": "trailers"}


def call(proxy: ProxyProcess, method: str, body: bytes, **headers: str) -> httpx.Response:
    with httpx.Client(timeout=10) as client:
        return client.post(proxy.url + SERVICE + method, content=body, headers={**GRPC_HEADERS, **headers})


def grpc_count(proxy: ProxyProcess, **labels: str) -> float:
    return proxy.metric("strangler_grpc_requests_total", **labels)


def test_unary_call_reaches_the_h2_backend_and_is_counted_with_its_status(
    grpc_proxy: Callable[..., ProxyProcess], pb: Protos, grpc_v1v2: tuple[InteropServer, InteropServer]
) -> None:
    proxy = grpc_proxy()
    request = pb.messages.SimpleRequest(response_size=1000, payload=pb.messages.Payload(body=b"x" * 500))
    response = call(proxy, "UnaryCall", frame(request))
    assert response.status_code == 200
    assert response.headers["x-api-version"] == "v1"
    assert response.headers["x-backend"] == "v1"  # the backend's initial metadata, relayed
    assert response.headers["content-type"] == "application/grpc"
    (message,) = unframe(response.content)
    answer: Any = pb.messages.SimpleResponse.FromString(message)
    assert answer.server_id == "v1" and len(answer.payload.body) == 1000
    labels = {"version": "v1", "grpc_method": "grpc.testing.TestService/UnaryCall", "group": "default"}
    assert grpc_count(proxy, grpc_code="OK", **labels) == 1
    assert proxy.metric("http_requests_total", version="v1", code="200") == 1
    # what reached the backend: the forwarding headers as for HTTP, the client's TE kept (gRPC needs it)
    seen = grpc_v1v2[0].servicer.metadata[-1]
    assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-request-id"]


def test_an_error_status_in_the_trailers_counts_against_the_version(
    grpc_proxy: Callable[..., ProxyProcess], pb: Protos
) -> None:
    proxy = grpc_proxy()
    request = pb.messages.SimpleRequest(response_status=pb.messages.EchoStatus(code=14, message="down"))
    response = call(proxy, "UnaryCall", frame(request))
    assert response.status_code == 200  # the HTTP answer is fine; the call failed
    labels = {"version": "v1", "grpc_method": "grpc.testing.TestService/UnaryCall"}
    assert grpc_count(proxy, grpc_code="UNAVAILABLE", **labels) == 1
    # recorded as the version's error (503 for UNAVAILABLE): what the canary judges
    assert proxy.metric("http_requests_total", version="v1", code="503") == 1
    assert proxy.metric("http_errors_total", version="v1") == 1
    # a code outside grpc.error_codes is not the version's error
    request = pb.messages.SimpleRequest(response_status=pb.messages.EchoStatus(code=5, message="no such"))
    call(proxy, "UnaryCall", frame(request))
    assert grpc_count(proxy, grpc_code="NOT_FOUND", **labels) == 1
    assert proxy.metric("http_requests_total", version="v1", code="200") == 1
    assert proxy.metric("http_errors_total", version="v1") == 1


def test_a_trailers_only_answer_keeps_its_status_in_the_headers(
    grpc_proxy: Callable[..., ProxyProcess], pb: Protos
) -> None:
    proxy = grpc_proxy()
    with httpx.Client(timeout=10) as client:
        response = client.post(
            proxy.url + "/grpc.testing.UnimplementedService/UnimplementedCall",
            content=frame(pb.empty.Empty()), headers=GRPC_HEADERS,
        )  # fmt: skip
    assert response.status_code == 200
    assert response.headers["grpc-status"] == "12"
    assert response.content == b""
    assert (
        grpc_count(
            proxy,
            grpc_code="UNIMPLEMENTED",
            grpc_method="grpc.testing.UnimplementedService/UnimplementedCall",
        )
        == 1
    )


def test_server_streaming_answer_is_relayed_message_by_message(
    grpc_proxy: Callable[..., ProxyProcess], pb: Protos
) -> None:
    proxy = grpc_proxy()
    sizes = [31415, 9, 2653, 58979]
    request = pb.messages.StreamingOutputCallRequest(
        response_parameters=[pb.messages.ResponseParameters(size=size) for size in sizes]
    )
    response = call(proxy, "StreamingOutputCall", frame(request))
    assert response.status_code == 200
    bodies = [
        pb.messages.StreamingOutputCallResponse.FromString(m).payload.body for m in unframe(response.content)
    ]
    assert [len(body) for body in bodies] == sizes


def test_client_streaming_body_is_streamed_up(grpc_proxy: Callable[..., ProxyProcess], pb: Protos) -> None:
    proxy = grpc_proxy()
    sizes = [27182, 8, 1828, 45904]
    messages = [
        pb.messages.StreamingInputCallRequest(payload=pb.messages.Payload(body=b"\0" * n)) for n in sizes
    ]

    def parts() -> Any:
        for message in messages:
            yield frame(message)

    with httpx.Client(timeout=10) as client:
        response = client.post(
            proxy.url + SERVICE + "StreamingInputCall", content=parts(), headers=GRPC_HEADERS
        )
    assert response.status_code == 200
    (message,) = unframe(response.content)
    assert pb.messages.StreamingInputCallResponse.FromString(message).aggregated_payload_size == sum(sizes)


def test_v2_unreachable_falls_back_to_v1(
    proxy_factory: Callable[..., ProxyProcess],
    grpc_v1v2: tuple[InteropServer, InteropServer],
    redis_url: str,
    pb: Protos,
) -> None:
    v1, _ = grpc_v1v2
    proxy = proxy_factory(
        v1_url=v1.url, v2_url=f"http://127.0.0.1:{free_port()}", v1_protocol="h2", v2_protocol="h2",
        redis_url=redis_url,
    )  # fmt: skip
    response = call(proxy, "UnaryCall", frame(pb.messages.SimpleRequest()), **{"x-strangler-version": "v2"})
    assert response.status_code == 200
    assert response.headers["x-api-version"] == "v1" and response.headers["x-backend"] == "v1"
    assert proxy.metric("strangler_fallbacks_total") == 1
    assert proxy.metric("strangler_upstream_errors_total", version="v2", kind="connect") == 1
    assert grpc_count(proxy, version="v1", grpc_code="OK") == 1


def test_unreachable_without_fallback_is_a_grpc_unavailable(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str, pb: Protos
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = proxy_factory(v1_url=dead, v2_url=dead, v1_protocol="h2", v2_protocol="h2", redis_url=redis_url)
    response = call(proxy, "UnaryCall", frame(pb.messages.SimpleRequest()))
    assert response.status_code == 200
    assert response.headers["grpc-status"] == "14" and response.headers["x-api-version"] == "v1"
    assert "127.0.0.1" not in response.headers["grpc-message"]  # no internal address in answers
    assert grpc_count(proxy, version="v1", grpc_code="UNAVAILABLE") == 1
    assert proxy.metric("http_requests_total", version="v1", code="502") == 1


def test_a_malformed_grpc_timeout_is_refused_and_counted(
    grpc_proxy: Callable[..., ProxyProcess], pb: Protos
) -> None:
    proxy = grpc_proxy()
    for bad in ("", "1", "123456789S", "10x", "-1S", "1.5S", "S"):
        response = call(proxy, "UnaryCall", frame(pb.messages.SimpleRequest()), **{"grpc-timeout": bad})
        assert response.status_code == 200
        assert response.headers["grpc-status"] == "13", bad
    assert proxy.metric("strangler_rejected_requests_total", reason="bad_grpc_timeout") == 7
    assert proxy.metric("http_errors_total", version="v1") == 0  # the client's fault, never the version's
    good = call(proxy, "UnaryCall", frame(pb.messages.SimpleRequest()), **{"grpc-timeout": "5S"})
    assert "grpc-status" not in good.headers and good.headers["x-backend"] == "v1"


def test_grpc_timeout_is_passed_on_as_the_time_left(
    grpc_proxy: Callable[..., ProxyProcess], pb: Protos, grpc_v1v2: tuple[InteropServer, InteropServer]
) -> None:
    proxy = grpc_proxy()
    call(proxy, "UnaryCall", frame(pb.messages.SimpleRequest()), **{"grpc-timeout": "20S"})
    left = grpc_v1v2[0].servicer.time_left[-1]
    assert left is not None and 10 < left <= 20


def test_method_labels_are_bounded(grpc_proxy: Callable[..., ProxyProcess], pb: Protos) -> None:
    proxy = grpc_proxy(grpc={"max_method_labels": 2})
    for method in ("EmptyCall", "UnaryCall", "UnimplementedCall", "NoSuchMethod"):
        call(proxy, method, frame(pb.empty.Empty()))
    text = proxy.metrics()
    assert 'grpc_method="grpc.testing.TestService/EmptyCall"' in text
    assert 'grpc_method="grpc.testing.TestService/UnaryCall"' in text
    assert "UnimplementedCall" not in text and "NoSuchMethod" not in text
    assert grpc_count(proxy, grpc_method="other") == 2
