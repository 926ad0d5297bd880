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
import gc
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
    """The few transport calls the protocols make; writes are kept (last one) and counted."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.last = b""
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.last = data
        self.writes += 1

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
    from proxy.server import limits_for
    from proxy.settings import Settings

    settings = Settings(redis_url="redis://127.0.0.1:1/0")  # never connected: no background loops run
    app = Strangler(settings)
    app.store.current = type(app.store.current)(global_percentage=10.0)
    loop = asyncio.get_running_loop()
    upstream: dict[str, tuple[_Connection, StandIn]] = {}
    for version, up in app.upstreams.items():
        conn = _Connection(up.pool)
        wire = StandIn(("127.0.0.1", 9000))
        conn.connection_made(wire)  # type: ignore[arg-type]
        up.pool._open = 1
        conn.idle_since = loop.time()
        up.pool._idle.append(conn)
        upstream[version] = (conn, wire)
    (conn1, wire1), (conn2, wire2) = upstream["v1"], upstream["v2"]
    limits = limits_for(settings, app.metrics.rejected_request)
    client = StandIn(("127.0.0.1", 40000))
    server = ServerProtocol(app.proxy.handle, limits, fast=app.proxy.start)
    server.connection_made(client)  # type: ignore[arg-type]
    request = server.data_received

    def one() -> None:
        sent1, sent2 = wire1.writes, wire2.writes
        request(REQUEST)
        if wire1.writes != sent1:
            conn1.data_received(RESPONSE)
        elif wire2.writes != sent2:
            conn2.data_received(RESPONSE)
        else:
            raise AssertionError("no request reached a backend: the fast path was not taken")

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)  # as the app's startup does
    for _ in range(2000):  # warm up (and check the answer)
        one()
    assert client.last.startswith(b"HTTP/1.1 200"), client.last[:200]
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(requests):
            one()
        best = min(best, (time.process_time() - started) / requests)
    print(f"{best * 1e6:.2f} us per request (CPU, best of {rounds} x {requests}, no sockets)")
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(requests):
            one()
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
