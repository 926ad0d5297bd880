"""h2 over TLS to the backend: ALPN must choose ``h2``, the certificate is verified against the
configured CA, and a backend that does not speak HTTP/2 is an upstream protocol error (counted,
nothing sent, so v2 falls back to v1)."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.grpc.interop import SERVICE, InteropServer, Protos, frame, unframe
from tests.support import Backend, ProxyProcess

trustme = pytest.importorskip("trustme")
HEADERS = {"content-type": "application/grpc", "te": "trailers"}


@pytest.fixture(scope="module")
def ca() -> object:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_backend(pb: Protos, ca: object) -> Iterator[InteropServer]:
    cert = ca.issue_cert("localhost")  # type: ignore[attr-defined]
    server = InteropServer("v1", pb, tls=(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes()))
    yield server
    server.stop()


@pytest.fixture()
def ca_file(ca: object, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))  # type: ignore[attr-defined]
    return path


class Http11TlsServer:
    """A TLS server whose ALPN offers only http/1.1 (a backend that is not HTTP/2)."""

    def __init__(self, ca: object) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost").configure_cert(context)  # type: ignore[attr-defined]
        context.set_alpn_protocols(["http/1.1"])
        self._context = context
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://localhost:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self._sock.accept()
            except OSError:
                return
            try:
                conn = self._context.wrap_socket(raw, server_side=True)
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nno")
                conn.close()
            except OSError:
                raw.close()

    def stop(self) -> None:
        self._sock.close()


def test_grpc_over_tls_to_the_backend(
    proxy_factory: Callable[..., ProxyProcess], tls_backend: InteropServer, ca_file: Path, redis_url: str,
    pb: Protos,
) -> None:  # fmt: skip
    proxy = proxy_factory(
        v1_url=tls_backend.url, v2_url=tls_backend.url, v1_protocol="h2", v2_protocol="h2",
        upstream_ca_file=str(ca_file), redis_url=redis_url,
    )  # fmt: skip
    with httpx.Client(timeout=10) as client:
        response = client.post(
            proxy.url + SERVICE + "UnaryCall", content=frame(pb.messages.SimpleRequest(response_size=10)),
            headers=HEADERS,
        )  # fmt: skip
    assert response.status_code == 200 and response.headers["x-backend"] == "v1"
    (message,) = unframe(response.content)
    assert len(pb.messages.SimpleResponse.FromString(message).payload.body) == 10
    assert proxy.metric("strangler_grpc_requests_total", grpc_code="OK") == 1


def test_an_untrusted_backend_certificate_is_refused(
    proxy_factory: Callable[..., ProxyProcess], tls_backend: InteropServer, redis_url: str, pb: Protos
) -> None:
    before = tls_backend.servicer.calls
    proxy = proxy_factory(
        v1_url=tls_backend.url,
        v2_url=tls_backend.url,
        v1_protocol="h2",
        v2_protocol="h2",
        redis_url=redis_url,
    )
    with httpx.Client(timeout=10) as client:
        response = client.post(proxy.url + SERVICE + "UnaryCall", content=frame(pb.messages.SimpleRequest()),
                               headers=HEADERS)  # fmt: skip
    assert response.headers["grpc-status"] == "14"
    assert proxy.metric("strangler_upstream_errors_total", version="v1", kind="connect") == 1
    assert tls_backend.servicer.calls == before  # nothing reached it


def test_a_tls_backend_without_h2_is_a_protocol_error_and_v2_falls_back(
    proxy_factory: Callable[..., ProxyProcess], tls_backend: InteropServer, ca: object, ca_file: Path,
    redis_url: str, pb: Protos,
) -> None:  # fmt: skip
    plain = Http11TlsServer(ca)
    try:
        proxy = proxy_factory(
            v1_url=tls_backend.url, v2_url=plain.url, v1_protocol="h2", v2_protocol="h2",
            upstream_ca_file=str(ca_file), redis_url=redis_url,
        )  # fmt: skip
        with httpx.Client(timeout=10) as client:
            body = frame(pb.messages.SimpleRequest())
            headers = {**HEADERS, "x-strangler-version": "v2"}
            response = client.post(proxy.url + SERVICE + "UnaryCall", content=body, headers=headers)
        assert response.status_code == 200 and response.headers["x-backend"] == "v1"
        assert proxy.metric("strangler_upstream_errors_total", version="v2", kind="protocol") == 1
        assert proxy.metric("strangler_fallbacks_total") == 1
    finally:
        plain.stop()


def test_an_http1_backend_configured_as_h2c_is_a_protocol_error(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str, pb: Protos
) -> None:
    v1, _ = v1v2
    proxy = proxy_factory(
        v1_url=v1.url, v2_url=v1.url, v1_protocol="h2", v2_protocol="h2", redis_url=redis_url
    )
    with httpx.Client(timeout=10) as client:
        response = client.post(proxy.url + SERVICE + "UnaryCall", content=frame(pb.messages.SimpleRequest()),
                               headers=HEADERS)  # fmt: skip
    assert response.headers["grpc-status"] == "14"
    assert proxy.metric("strangler_upstream_errors_total", version="v1", kind="protocol") == 1
    with httpx.Client(timeout=10) as client:  # and the proxy goes on answering
        assert client.get(proxy.url + "/_strangler/health").status_code == 200
