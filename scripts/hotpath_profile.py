#!/usr/bin/env python3
"""The proxy's own CPU per request, without sockets: our server protocol and the upstream pool
driven in one process through stand-in transports, with the real app wiring (split, metrics,
routing, deprecation, mirror plan).

What it measures is what the kernel-free part of a request costs: llhttp parsing both ways, the
routing, header rewriting, recording and the fast path's bookkeeping. Syscalls and the event loop
are left out, so the figure moves only when our code does (a wrk run moves with the machine).

    scripts/hotpath_profile.py                 # microseconds per request (best of 5 runs)
    scripts/hotpath_profile.py --profile 20    # plus the top 20 functions by own time (cProfile)
    scripts/hotpath_profile.py -e STRANGLER_SHADOW__ENABLED=true
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import gc
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PASS = 16  # requests per event-loop pass
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"  # what wrk sends
# what nginx answers in the bench layout (`strangler bench --backend nginx`): 5 headers, ~300 bytes
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 15:32:36 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 297\r\nConnection: keep-alive\r\n\r\n"
    + b'{"id":42,"version":"v1","name":"Widget","price":{"amount":1999,"currency":"EUR"},'
    b'"tags":["blue","round","small"],"stock":{"warehouse":"north","count":17},'
    b'"updated":"2026-11-27T10:00:00Z","links":{"self":"/items/42","owner":"/users/7"},'
    b'"description":"A small round blue widget, sold by the piece."}'
)


class StandIn:
    """The few transport calls the protocols make; writes are kept (last one) and counted, and the
    written transport noted in ``written`` (when given)."""

    def __init__(self, peer: tuple[str, int], written: list[StandIn] | None = None) -> None:
        self.peer = peer
        self.last = b""
        self.writes = 0
        self.written = written

    def write(self, data: bytes) -> None:
        self.last = data
        self.writes += 1
        if self.written is not None:
            self.written.append(self)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        raise AssertionError("closed: the stand-in request or answer was refused")

    abort = close


async def run(requests: int, rounds: int, profile: int) -> None:
    from proxy.app import Strangler
    from proxy.edge.client import _Connection
    from proxy.edge.server import ServerProtocol
    from proxy.edge.writebatch import WriteBatch
    from proxy.server import limits_for
    from proxy.settings import Settings

    settings = Settings(redis_url="redis://127.0.0.1:1/0")  # never connected: no background loops run
    app = Strangler(settings)
    app.store.current = type(app.store.current)(global_percentage=10.0)
    loop = asyncio.get_running_loop()
    # PASS clients each send a request in one loop pass (as under load: the event loop hands the
    # proxy many ready connections at once), so each version needs as many warm connections
    sent: list[StandIn] = []
    backend: dict[StandIn, _Connection] = {}
    for up in app.upstreams.values():
        # v2 (10%) leaves some of its connections idle for seconds: not swept in this run
        up.pool.limits = dataclasses.replace(up.pool.limits, idle_timeout=3600.0)
        for _ in range(PASS):
            conn = _Connection(up.pool)
            wire = StandIn(("127.0.0.1", 9000), sent)
            conn.connection_made(wire)  # type: ignore[arg-type]
            conn.idle_since = loop.time()
            up.pool._idle.append(conn)
            backend[wire] = conn
        up.pool._open = PASS
    limits = limits_for(settings, app.metrics.rejected_request)
    clients: list[StandIn] = []
    requests_of: list[Any] = []
    answers = WriteBatch()  # one for the server's connections, as HttpServer makes
    for i in range(PASS):
        client = StandIn(("127.0.0.1", 40000 + i))
        server = ServerProtocol(app.proxy.handle, limits, fast=app.proxy.start, writes=answers)
        server.connection_made(client)  # type: ignore[arg-type]
        clients.append(client)
        requests_of.append(server.data_received)
    # the ends of the passes (proxy/edge/writebatch.py): the batches flush as the loop would
    ends = [up.pool.writes.flush for up in app.upstreams.values()]

    def one_pass() -> None:
        for request in requests_of:
            request(REQUEST)
        for end in ends:
            end()
        if len(sent) != PASS:
            raise AssertionError("not every request reached a backend: the fast path was not taken")
        for wire in sent:
            backend[wire].data_received(RESPONSE)
        sent.clear()
        answers.flush()

    async def many(count: int) -> None:
        for _ in range(count // PASS):
            one_pass()
            await asyncio.sleep(0)  # the loop runs the batches' own (now empty) flushes

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)  # as the app's startup does
    await many(2000)  # warm up (and check the answer)
    assert all(client.last.startswith(b"HTTP/1.1 200") for client in clients), clients[0].last[:200]
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        await many(requests)
        best = min(best, (time.process_time() - started) / requests)
    print(f"{best * 1e6:.2f} us per request (CPU, best of {rounds} x {requests}, no sockets)")
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        await many(requests)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(profile)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", "--requests", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, help="print this many functions from cProfile")
    parser.add_argument("-e", "--env", action="append", default=[], help="KEY=VALUE settings")
    args = parser.parse_args()
    for item in args.env:
        key, value = item.split("=", 1)
        os.environ[key] = value
    import uvloop

    uvloop.run(run(args.requests, args.rounds, args.profile))


if __name__ == "__main__":
    main()
