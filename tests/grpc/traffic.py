"""gRPC unary calls in a background thread (HTTP/1.1 framing of gRPC, so it runs before and after
the HTTP/2 listener), each with its own sticky key in the call's metadata (``x-user-id``)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import httpx

from tests.grpc.interop import SERVICE

HEADERS = {"content-type": "application/grpc", "te": "trailers"}
EMPTY_CALL = b"\0\0\0\0\0"  # one empty message: grpc.testing.Empty


class GrpcTraffic:
    """A bounded loop of EmptyCall calls with distinct user keys; ``versions`` counts who answered."""

    def __init__(self, url: str, concurrency: int = 4, max_calls: int = 20000) -> None:
        self.url = url + SERVICE + "EmptyCall"
        self.concurrency = concurrency
        self.max_calls = max_calls
        self.versions: Counter[str] = Counter()
        self.failures = 0
        self._sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> GrpcTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    async def _main(self) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            await asyncio.gather(*(self._worker(client) for _ in range(self.concurrency)))

    async def _worker(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set() and self._sent < self.max_calls:
            self._sent += 1
            headers = {**HEADERS, "x-user-id": f"caller-{self._sent}"}
            try:
                response = await client.post(self.url, content=EMPTY_CALL, headers=headers)
                self.versions[response.headers.get("x-api-version", "?")] += 1
            except httpx.HTTPError:
                self.failures += 1
