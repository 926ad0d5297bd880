"""A small, real HTTP backend the tests start as a separate process (v1 or v2).

Run: ``python -m tests.backends --port 0 --name v1 --port-file F``. Behaviour can be changed at
run time with ``POST /__control`` (JSON), so a test can make v2 slow or failing without a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

STATE: dict[str, Any] = {
    "delay_ms": 0.0,  # added to every answer
    "error_rate": 0.0,  # share of answers that are 500
    "extra": {},  # fields merged into every JSON answer
    "noise": False,  # add a random uuid and the current time to JSON answers
    "rename": {},  # {old: new} field names in JSON answers
}
LOG: list[dict[str, Any]] = []
NAME = "v?"


async def _behave() -> web.Response | None:
    if STATE["delay_ms"]:
        await asyncio.sleep(STATE["delay_ms"] / 1000)
    if STATE["error_rate"] and random.random() < STATE["error_rate"]:
        return web.json_response({"error": "injected", "version": NAME}, status=500)
    return None


def _json(payload: dict[str, Any], status: int = 200) -> web.Response:
    payload = {**payload, **STATE["extra"]}
    for old, new in STATE["rename"].items():
        if old in payload:
            payload[new] = payload.pop(old)
    if STATE["noise"]:
        payload["request_uuid"] = str(uuid.uuid4())
        payload["generated_at"] = time.time()
    return web.json_response(payload, status=status)


async def echo(request: web.Request) -> web.StreamResponse:
    failed = await _behave()
    if failed is not None:
        return failed
    body = await request.read()
    record = {
        "version": NAME,
        "method": request.method,
        "raw_path": request.raw_path,
        "path": request.path,
        "query_string": request.query_string,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body_length": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "body": body.decode("utf-8", "replace") if len(body) <= 4096 else None,
    }
    LOG.append(record)
    del LOG[:-500]
    return _json(record)


async def default(request: web.Request) -> web.StreamResponse:
    failed = await _behave()
    if failed is not None:
        return failed
    if request.can_read_body:
        await request.read()
    LOG.append(
        {
            "version": NAME,
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        }
    )
    del LOG[:-500]
    return _json({"version": NAME, "path": request.path, "method": request.method})


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if code in (204, 304):
        return web.Response(status=code)
    return web.json_response({"version": NAME, "status": code}, status=code)


async def slow(request: web.Request) -> web.Response:
    # logged on arrival, so a test can tell the request is being held here
    LOG.append({"version": NAME, "method": request.method, "raw_path": request.raw_path, "headers": []})
    del LOG[:-500]
    await asyncio.sleep(float(request.query.get("ms", "1000")) / 1000)
    return web.json_response({"version": NAME, "slow": True})


async def stream(request: web.Request) -> web.StreamResponse:
    """Chunked (or sized) download of N bytes, generated on the fly."""
    total = int(request.query.get("bytes", "1048576"))
    chunk = int(request.query.get("chunk", "65536"))
    sized = request.query.get("sized") == "1"
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "X-Version": NAME})
    if sized:
        response.content_length = total
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    block = b"x" * chunk
    sent = 0
    while sent < total:
        part = block[: min(chunk, total - sent)]
        await response.write(part)
        sent += len(part)
    await response.write_eof()
    return response


async def upload(request: web.Request) -> web.Response:
    """Consume a body of any size without holding it; answer its length and hash."""
    digest = hashlib.sha256()
    size = 0
    async for part in request.content.iter_chunked(65536):
        digest.update(part)
        size += len(part)
    return web.json_response(
        {
            "version": NAME,
            "length": size,
            "sha256": digest.hexdigest(),
            "chunked": request.headers.get("Transfer-Encoding", "") == "chunked",
            "content_length": request.headers.get("Content-Length"),
        }
    )


async def reset(request: web.Request) -> web.StreamResponse:
    """Promise 100000 bytes, send 1000, then drop the connection."""
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = 100000
    await response.prepare(request)
    await response.write(b"y" * 1000)
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.close()
    return response


async def gzip_body(request: web.Request) -> web.Response:
    import gzip

    payload = gzip.compress(json.dumps({"version": NAME, "zipped": True}).encode())
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    return web.Response(body=payload, headers=headers)


async def redirect(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "/echo?redirected=1"})


async def cookies(request: web.Request) -> web.Response:
    response = web.json_response({"version": NAME})
    response.headers.add("Set-Cookie", "a=1; Path=/")
    response.headers.add("Set-Cookie", "b=2; Path=/")
    response.headers.add("X-Multi", "one")
    response.headers.add("X-Multi", "two")
    return response


async def control(request: web.Request) -> web.Response:
    STATE.update(await request.json())
    return web.json_response(STATE)


async def log(request: web.Request) -> web.Response:
    if request.method == "DELETE":
        LOG.clear()
    return web.json_response(LOG)


def build() -> web.Application:
    app = web.Application(client_max_size=1024**4)
    app.router.add_route("*", "/__control", control)
    app.router.add_route("*", "/__log", log)
    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/slow", slow)
    app.router.add_get("/stream", stream)
    app.router.add_route("*", "/upload", upload)
    app.router.add_get("/reset", reset)
    app.router.add_get("/gzip", gzip_body)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/cookies", cookies)
    app.router.add_route("*", "/{tail:.*}", default)
    return app


def main() -> None:
    global NAME
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="v1")
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args()
    NAME = args.name

    async def serve() -> None:
        runner = web.AppRunner(build(), access_log=None, handle_signals=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port, reuse_address=True)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.port_file)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
