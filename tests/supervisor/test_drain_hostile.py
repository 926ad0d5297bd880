"""A client that dribbles a request head across a reload (a slow-loris on the old generation) does
not hold that generation alive: it is cut at the drain's end at the latest, while the new generation
serves."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import httpx

from tests.clirun import strangler
from tests.supervisor.conftest import Supervised
from tests.support import wait_until


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_slow_head_across_a_reload_does_not_keep_the_old_generation_alive(
    supervised: Callable[..., Supervised],
) -> None:
    sup = supervised(drain_timeout_seconds=2.0, limits={"header_timeout_seconds": 30.0})
    (old_pid,) = sup.workers().values()
    with socket.create_connection(("127.0.0.1", sup.proxy.port), timeout=10) as slow:
        slow.sendall(b"GET /echo HTTP/1.1\r\nHost: app.test\r\n")
        done = strangler("reload", "--socket", str(sup.socket))
        assert done.returncode == 0, done.stderr
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 8 and not closed:  # one header line every 0.2 s
            try:
                slow.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.2)
            except OSError:
                closed = True
        # the new generation answers meanwhile; the old one ends at its drain timeout (2 s), not
        # when the slow client pleases
        assert httpx.get(sup.proxy.url + "/echo", timeout=5).status_code == 200
        assert closed, "the slow client was still connected 8 s after the reload (drain timeout 2 s)"
        wait_until(lambda: gone(old_pid), timeout=5, message="the old generation exits")
    assert sup.status()["generation"] == 2
