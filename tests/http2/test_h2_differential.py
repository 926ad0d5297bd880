"""The referee for the HTTP/2 edge: generated batches of concurrent requests on one connection,
each compared with what the backend received (method, target, headers, body) and each answer
matched to its own request (no splicing between streams)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import ProxyProcess

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
REQUEST = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
        "segments": st.lists(TOKEN, min_size=0, max_size=3),
        "query": st.one_of(st.none(), st.dictionaries(TOKEN, TOKEN, max_size=3)),
        "headers": st.dictionaries(TOKEN.map(lambda t: "x-gen-" + t), TOKEN, max_size=4),
        "body": st.one_of(
            st.just(b""), st.binary(max_size=3000), st.integers(0, 300_000).map(lambda n: b"b" * n)
        ),
        "sized": st.booleans(),
    }
)


async def _send(client: httpx.AsyncClient, i: int, spec: dict[str, Any]) -> tuple[int, httpx.Response]:
    path = "/echo/" + "/".join([f"r{i}", *spec["segments"]])
    body: bytes = spec["body"] if spec["method"] != "GET" else b""
    headers = {**spec["headers"], "x-request-id": f"gen-{i}"}
    content: Any = body
    if body and not spec["sized"]:

        async def parts() -> Any:  # no content-length: streamed DATA frames
            for at in range(0, len(body), 7000):
                yield body[at : at + 7000]

        content = parts()
    response = await client.request(
        spec["method"], path, params=spec["query"], headers=headers, content=content
    )
    return i, response


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(REQUEST, min_size=1, max_size=12))
def test_generated_concurrent_requests_reach_the_backend_intact(
    h2_proxy: ProxyProcess, batch: list[Any]
) -> None:
    async def main() -> list[tuple[int, httpx.Response]]:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(
            base_url=h2_proxy.url, http1=False, http2=True, limits=limits, timeout=30
        ) as client:
            return await asyncio.gather(*(_send(client, i, spec) for i, spec in enumerate(batch)))

    for i, response in asyncio.run(main()):
        spec = batch[i]
        assert response.http_version == "HTTP/2"
        assert response.status_code == 200, response.text
        seen = response.json()
        body = spec["body"] if spec["method"] != "GET" else b""
        assert seen["method"] == spec["method"]
        assert seen["raw_path"].startswith(f"/echo/r{i}")  # its own answer, not another stream's
        assert seen["body_length"] == len(body)
        assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
        received = [(k.lower(), v) for k, v in seen["headers"]]
        for name, value in spec["headers"].items():
            assert (name, value) in received
        assert ("x-request-id", f"gen-{i}") in received
        assert not [k for k, _ in received if k in ("te", "connection", "upgrade", "keep-alive")]
