"""HTTP/2 clients through the real proxy to the HTTP/1.1 test backends: h2c by prior knowledge on
the main listener, h2 by ALPN over TLS, the admin API, the split; HTTP/1.1 unchanged beside it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support import Backend, ProxyProcess, free_port, wait_refreshed, wait_until

trustme = pytest.importorskip("trustme")

KEY = "feature:v2_traffic_percentage"


def h2c(proxy: ProxyProcess, **kwargs: Any) -> httpx.Client:
    """An HTTP/2 client with prior knowledge (no upgrade, no ALPN: the preface on a plain socket)."""
    return httpx.Client(base_url=proxy.url, http1=False, http2=True, timeout=20, **kwargs)


def headers_of(seen: dict[str, Any]) -> dict[str, str]:
    return {name.lower(): value for name, value in seen["headers"]}


def test_get_over_h2c_prior_knowledge(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy()
    with h2c(proxy) as client:
        response = client.get("/echo/a%20b?b=1", headers={"X-Test": "yes", "Cookie": "a=1"})
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200
    assert response.headers["x-api-version"] == "v1"
    seen = response.json()
    assert seen["method"] == "GET"
    assert seen["raw_path"] == "/echo/a%20b?b=1"
    headers = headers_of(seen)
    assert headers["x-test"] == "yes"
    assert headers["host"] == f"127.0.0.1:{proxy.port}"  # from :authority
    assert headers["x-forwarded-proto"] == "http"
    assert "transfer-encoding" not in headers
    assert seen["body_length"] == 0


def test_post_with_and_without_content_length(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy()
    body = os.urandom(200_000)
    with h2c(proxy) as client:
        sized = client.post("/upload", content=body)
        assert sized.http_version == "HTTP/2"
        assert sized.json()["sha256"] == hashlib.sha256(body).hexdigest()
        assert sized.json()["content_length"] == str(len(body))

        def parts() -> Any:  # no content-length: the body is streamed in DATA frames
            for at in range(0, len(body), 30_000):
                yield body[at : at + 30_000]

        streamed = client.post("/upload", content=parts())
        assert streamed.json()["length"] == len(body)
        assert streamed.json()["sha256"] == hashlib.sha256(body).hexdigest()
        small = client.post("/echo", content=b"hello")
        assert small.json()["body"] == "hello"


def test_large_download_arrives_whole(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy()
    total = 6 * 1024 * 1024
    with h2c(proxy) as client:
        for sized in ("1", "0"):
            response = client.get(f"/stream?bytes={total}&sized={sized}")
            assert response.status_code == 200
            assert len(response.content) == total
            assert hashlib.sha256(response.content).hexdigest() == hashlib.sha256(b"x" * total).hexdigest()


def test_concurrent_streams_each_get_their_own_answer(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy()

    async def main() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=proxy.url, http1=False, http2=True, limits=limits,
                                     timeout=20) as client:  # fmt: skip
            return await asyncio.gather(
                *(
                    client.post(
                        f"/echo/{i}", content=f"body-{i}".encode(), headers={"X-Request-ID": f"id-{i}"}
                    )
                    for i in range(60)
                )  # fmt: skip
            )

    answers = asyncio.run(main())
    for i, response in enumerate(answers):
        assert response.http_version == "HTTP/2"
        seen = response.json()
        assert seen["raw_path"] == f"/echo/{i}"
        assert seen["body"] == f"body-{i}"
        assert headers_of(seen)["x-request-id"] == f"id-{i}"


def test_admin_api_over_h2(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy()
    with h2c(proxy) as client:
        health = client.get("/_strangler/health")
        assert health.http_version == "HTTP/2"
        assert health.status_code == 200
        status = client.get("/_strangler/status", headers=proxy.auth)
        assert status.status_code == 200
        assert "proxy" in status.json()
        refused = client.put("/_strangler/split", json={"percentage": 5})
        assert refused.status_code in (401, 403)


def test_split_and_stickiness_apply_to_h2(start_proxy: Callable[..., ProxyProcess], redis_url: str) -> None:
    proxy = start_proxy()
    redis.Redis.from_url(redis_url).set(KEY, "50")
    wait_refreshed(proxy)
    users = [f"user-{i}" for i in range(40)]
    with h2c(proxy) as h2_client, httpx.Client(base_url=proxy.url, timeout=10) as h1_client:
        over_h2 = {u: h2_client.get("/", headers={"X-User-ID": u}).headers["x-api-version"] for u in users}
        over_h1 = {u: h1_client.get("/", headers={"X-User-ID": u}).headers["x-api-version"] for u in users}
        forced = h2_client.get("/", headers={"X-Strangler-Version": "v2"})
    assert over_h2 == over_h1
    assert set(over_h2.values()) == {"v1", "v2"}
    assert forced.headers["x-api-version"] == "v2"
    assert forced.json()["version"] == "v2"


def test_http1_clients_unchanged_on_the_same_port(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy()
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        response = client.get("/echo")
        assert response.http_version == "HTTP/1.1"
        assert response.json()["method"] == "GET"
        # a prefix of the preface that turns out not to be it is plain HTTP/1.1 (here: a bad method)
        with h2c(proxy) as h2_client:
            assert h2_client.get("/echo").http_version == "HTTP/2"
        assert client.post("/echo", content=b"x").json()["body"] == "x"


def test_http2_disabled_refuses_the_preface(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(http2={"enabled": False})
    with h2c(proxy) as client, pytest.raises(httpx.HTTPError):
        client.get("/echo")
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.get("/echo").status_code == 200


def test_h2c_only_port(start_proxy: Callable[..., ProxyProcess]) -> None:
    port = free_port()
    proxy = start_proxy(http2={"port": port})
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", http1=False, http2=True, timeout=10) as client:
        response = client.get("/echo")
        assert response.http_version == "HTTP/2"
        assert response.json()["method"] == "GET"
    with pytest.raises(httpx.HTTPError):  # HTTP/1.1 on the h2c-only port: GOAWAY, closed
        httpx.get(f"http://127.0.0.1:{port}/echo", timeout=5)
    wait_until(lambda: proxy.metric("strangler_rejected_requests_total", reason="h2_bad_preface") >= 1)


def _write_server_cert(ca: Any, cert: Path, key: Path) -> None:
    issued = ca.issue_cert("127.0.0.1")
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))


def test_alpn_h2_over_tls_and_http1_beside_it(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    _write_server_cert(ca, cert, key)
    v1, v2 = v1v2
    proxy = proxy_factory(wait=False, v1_url=v1.url, v2_url=v2.url, redis_url=redis_url,
                          tls_cert_file=str(cert), tls_key_file=str(key))  # fmt: skip
    url = f"https://127.0.0.1:{proxy.port}"
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with httpx.Client(verify=context, http2=True, timeout=10) as client:
        wait_until(lambda: client.get(url + "/_strangler/health").status_code == 200, timeout=20)
        response = client.get(url + "/echo")
        assert response.http_version == "HTTP/2"  # chosen by ALPN
        assert headers_of(response.json())["x-forwarded-proto"] == "https"
        body = os.urandom(100_000)
        assert client.post(url + "/upload", content=body).json()["sha256"] == hashlib.sha256(body).hexdigest()
    with httpx.Client(verify=context, timeout=10) as client:  # offers http/1.1 only
        response = client.get(url + "/echo")
        assert response.http_version == "HTTP/1.1"
        assert response.status_code == 200


def test_admin_api_over_h2_on_its_own_port(start_proxy: Callable[..., ProxyProcess]) -> None:
    port = free_port()
    start_proxy(wait=False, admin_port=port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", http1=False, http2=True, timeout=10) as client:
        wait_until(lambda: client.get("/_strangler/health").status_code == 200, timeout=20)
        health = client.get("/_strangler/health")
    assert health.http_version == "HTTP/2"
    assert health.status_code == 200
