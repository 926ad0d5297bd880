"""TLS both ways: https backends verified against a configured CA (with an optional client
certificate), and TLS termination on the listener, reloaded on SIGHUP."""

from __future__ import annotations

import asyncio
import signal
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support import Backend, ProxyProcess, free_port, wait_until

trustme = pytest.importorskip("trustme")


class TlsBackend:
    """A tiny https backend in a thread: answers ``tls-ok`` and says whether the client showed a
    certificate."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.port = free_port()
        self._context = context
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(5)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while await reader.readuntil(b"\r\n\r\n"):
                    peer = writer.get_extra_info("ssl_object").getpeercert()
                    body = b"tls-ok client-cert=%d" % (1 if peer else 0)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        async def main() -> None:
            self._stop = asyncio.Event()
            server = await asyncio.start_server(handle, "127.0.0.1", self.port, ssl=self._context)
            self._ready.set()
            async with server:
                await self._stop.wait()

        self._loop.run_until_complete(main())
        pending = asyncio.all_tasks(self._loop)  # connections still open: end them before closing
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)


@pytest.fixture()
def ca() -> object:
    return trustme.CA()


def _server_context(ca: object, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)  # type: ignore[attr-defined]
    if require_client_cert:
        ca.configure_trust(context)  # type: ignore[attr-defined]
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.fixture()
def tls_files(ca: object, tmp_path: Path) -> dict[str, Path]:
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "client.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))  # type: ignore[attr-defined]
    ca.issue_cert("strangler-client").private_key_and_cert_chain_pem.write_to_path(str(files["cert"]))  # type: ignore[attr-defined]
    return files


def test_https_backends_are_verified_against_the_configured_ca(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str, ca: object, tls_files: dict[str, Path]
) -> None:
    backend = TlsBackend(_server_context(ca))
    try:
        common = {"v1_url": backend.url, "v2_url": backend.url, "redis_url": redis_url,
                  "fallback_to_v1": False}  # fmt: skip
        trusted = proxy_factory(upstream_ca_file=str(tls_files["ca"]), **common)
        assert httpx.get(trusted.url + "/x", timeout=5).text == "tls-ok client-cert=0"
        untrusted = proxy_factory(**common)  # the system store does not know our test CA
        failed = httpx.get(untrusted.url + "/x", timeout=5)
        assert failed.status_code == 502
        assert failed.json()["detail"] == "TLS handshake failed"
    finally:
        backend.stop()


def test_a_client_certificate_is_presented_when_configured(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str, ca: object, tls_files: dict[str, Path]
) -> None:
    backend = TlsBackend(_server_context(ca, require_client_cert=True))
    try:
        common = {"v1_url": backend.url, "v2_url": backend.url, "redis_url": redis_url,
                  "upstream_ca_file": str(tls_files["ca"]), "fallback_to_v1": False}  # fmt: skip
        without = proxy_factory(**common)
        assert httpx.get(without.url + "/x", timeout=5).status_code == 502
        with_cert = proxy_factory(upstream_client_cert_file=str(tls_files["cert"]), **common)
        assert httpx.get(with_cert.url + "/x", timeout=5).text == "tls-ok client-cert=1"
    finally:
        backend.stop()


def _write_server_cert(ca: object, cert: Path, key: Path) -> None:
    issued = ca.issue_cert("127.0.0.1")  # type: ignore[attr-defined]
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))


def test_tls_termination_and_a_certificate_reload_on_sighup(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str, tmp_path: Path
) -> None:
    first, second = trustme.CA(), trustme.CA()
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    _write_server_cert(first, cert, key)
    v1, v2 = v1v2
    proxy = proxy_factory(wait=False, process=True, v1_url=v1.url, v2_url=v2.url, redis_url=redis_url,
                          tls_cert_file=str(cert), tls_key_file=str(key))  # fmt: skip
    url = f"https://127.0.0.1:{proxy.port}"

    def client(ca: object) -> httpx.Client:
        context = ssl.create_default_context()
        ca.configure_trust(context)  # type: ignore[attr-defined]
        return httpx.Client(verify=context, timeout=5)

    with client(first) as trusting_first:
        wait_until(lambda: trusting_first.get(url + "/_strangler/health").status_code == 200, timeout=20)
        echoed = trusting_first.get(url + "/echo").json()
        assert ["x-forwarded-proto", "https"] in echoed["headers"]
        with pytest.raises(httpx.TransportError):  # plain HTTP on the TLS port is not served
            httpx.get(f"http://127.0.0.1:{proxy.port}/echo", timeout=2).raise_for_status()
        _write_server_cert(second, cert, key)
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGHUP)
        with client(second) as trusting_second:
            wait_until(lambda: trusting_second.get(url + "/echo").status_code == 200, timeout=10)
        with pytest.raises(httpx.ConnectError):
            with client(first) as stale:
                stale.get(url + "/echo")
