"""A real HTTP backend whose answers a test scripts exactly, per path and per kind of request.

Run: ``python -m tests.shadow.scripted --port-file F``. ``POST /__script`` with
``{"<path>": {"primary": [spec, ...], "shadow": [...], "calibration": [...], "any": [...]}}`` sets the
answers: the n-th request of a kind to a path gets the n-th spec of its list (the last one repeats;
a kind without a list uses "any"). The kind is read from our markers: ``X-Strangler-Calibration``
-> calibration, ``X-Strangler-Shadow`` -> shadow, else primary. A spec is a dict:
``status``, ``headers``, one body (``json``, ``text``, ``size`` for N bytes of JSON, or nothing),
``encode`` (``gzip:<level>``, ``deflate``, ``br``), ``bom`` (prepend a UTF-8 BOM), ``delay`` (s).
``GET /__log`` lists requests (method, path with query, headers); ``POST /__reset`` forgets all.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Any

import brotli
from aiohttp import web

SCRIPT: dict[str, dict[str, list[dict[str, Any]]]] = {}
COUNTS: dict[tuple[str, str], int] = {}
LOG: list[dict[str, Any]] = []


def kind_of(request: web.Request) -> str:
    if "X-Strangler-Calibration" in request.headers:
        return "calibration"
    if "X-Strangler-Shadow" in request.headers:
        return "shadow"
    return "primary"


def body_of(spec: dict[str, Any]) -> tuple[bytes, str | None]:
    if "json" in spec:
        return json.dumps(spec["json"]).encode(), "application/json"
    if "text" in spec:
        return str(spec["text"]).encode(), "application/json"
    if "size" in spec:
        size = int(spec["size"])
        return b'{"pad":"' + b"x" * max(0, size - 10) + b'"}', "application/json"
    return b"", None


def encode(body: bytes, how: str) -> tuple[bytes, str]:
    name, _, level = how.partition(":")
    if name == "gzip":
        return gzip.compress(body, compresslevel=int(level or 6), mtime=0), "gzip"
    if name == "deflate":
        return zlib.compress(body, int(level or 6)), "deflate"
    if name == "br":
        return brotli.compress(body), "br"
    raise ValueError(how)


async def answer(request: web.Request) -> web.StreamResponse:
    path = request.path
    kind = kind_of(request)
    if request.can_read_body:
        await request.read()
    LOG.append({"method": request.method, "path": request.path_qs, "kind": kind,
                "headers": [[k, v] for k, v in request.headers.items()]})  # fmt: skip
    script = SCRIPT.get(path, {})
    specs = script.get(kind) or script.get("any") or [{"json": {"unscripted": path}}]
    n = COUNTS.get((path, kind), 0)
    COUNTS[(path, kind)] = n + 1
    spec = specs[min(n, len(specs) - 1)]
    if spec.get("delay"):
        await asyncio.sleep(float(spec["delay"]))
    body, content_type = body_of(spec)
    headers = dict(spec.get("headers", {}))
    if content_type and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = content_type
    if spec.get("bom"):
        body = b"\xef\xbb\xbf" + body
    if spec.get("encode"):
        body, coding = encode(body, spec["encode"])
        headers["Content-Encoding"] = coding
    return web.Response(status=int(spec.get("status", 200)), body=body, headers=headers)


async def set_script(request: web.Request) -> web.Response:
    SCRIPT.update(await request.json())
    return web.json_response({"paths": len(SCRIPT)})


async def reset(request: web.Request) -> web.Response:
    SCRIPT.clear()
    COUNTS.clear()
    LOG.clear()
    return web.json_response({})


async def log(request: web.Request) -> web.Response:
    return web.json_response(LOG)


def build() -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app.router.add_post("/__script", set_script)
    app.router.add_post("/__reset", reset)
    app.router.add_get("/__log", log)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="scripted")
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args()

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
