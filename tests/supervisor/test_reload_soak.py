"""The reload target, as a ``soak`` test (long suite only): SOAK_RELOADS reloads in a row (5 in CI,
about 15 s; the release check is 20: ``SOAK_RELOADS=20 pytest -m soak
tests/supervisor/test_reload_soak.py -s``) with 2 workers, under keep-alive load with 100 WebSockets
open. Each reload moves ``v1_url`` between two real backends that answer differently and adds or
removes a deprecation rule (``/old/**`` answered with a ``Deprecation`` header); after each, the
change must be in force on every worker within 1 s of the command's return. No request fails,
resets or is cut; no 5xx. WebSockets: a reload drains the old generation, so every WebSocket gets
1001 after its drain grace and reconnects to the new one, each time (none ends without a close
code). Prints what it measured."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable

import pytest

from tests.clirun import strangler
from tests.supervisor.conftest import Supervised
from tests.supervisor.test_upgrade import KeepAlive, all_ready
from tests.supervisor.test_upgrade_soak import Sockets
from tests.support import Backend, metric_value, wait_until

RELOADS = int(os.environ.get("SOAK_RELOADS", "5"))
SOCKETS = 100
PROBES = 20  # 2 * PROBES new connections in a row: both workers hit unless 2 * 2**-40 of bad luck
IN_FORCE_SECONDS = 1.0
RELOADED = re.compile(r"reloaded: generation (\d+), 2 workers ready in (\d+\.\d\d) s")
RULE = {"name": "soak-old", "pattern": "/old/**", "deprecated_at": "2024-01-01", "phase": "warn"}


def probe(port: int, i: int) -> tuple[str, bool]:
    """On a new connection (one worker, chosen by the kernel): which backend answers ``/old/i`` and
    whether the answer carries the deprecation rule's ``Deprecation`` header."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(f"GET /old/{i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), data[:300]
    return str(json.loads(body)["version"]), b"\r\ndeprecation: @" in head.lower()


def time_to_in_force(port: int, expected: tuple[str, bool], returned: float) -> tuple[float, int]:
    """Probe new connections one after another until ``2 * PROBES`` in a row see ``expected``: the
    seconds from ``returned`` to the first moment every later probe saw it (the end of the last
    probe that did not, or of the first probe when none did), and how many did not."""
    first = 0.0
    last_old: float | None = None
    streak = i = olds = 0
    while streak < 2 * PROBES:
        seen = probe(port, i)
        now = time.monotonic()
        first = now if i == 0 else first
        i += 1
        if seen == expected:
            streak += 1
        else:
            streak, last_old, olds = 0, now, olds + 1
        assert now - returned < 5, f"{seen} instead of {expected} {now - returned:.1f} s after the reload"
    return (first if last_old is None else last_old) - returned, olds


@pytest.mark.soak
def test_twenty_reloads_under_load_with_a_hundred_websockets(
    supervised: Callable[..., Supervised], backend_factory: Callable[[str], Backend]
) -> None:
    from tests.wsbackend import WsBackend

    ws_backend = WsBackend("v2").start()
    other = backend_factory("v3")
    sockets: Sockets | None = None
    try:
        prefix = f"reloadsoak{os.getpid()}:"  # no deprecation override or window from other tests
        sup = supervised(
            workers=2, v2_url=ws_backend.url, drain_timeout_seconds=5, key_prefix=prefix,
            websocket={"drain_grace_seconds": 0.3}, limits={"drain_idle_grace_seconds": 0.3},
        )  # fmt: skip
        proxy = sup.proxy
        first = str(proxy.settings["v1_url"])
        all_ready(sup, 2)
        assert time_to_in_force(proxy.port, ("v1", False), time.monotonic())[1] == 0
        load = KeepAlive(proxy.port, clients=8).start()
        sockets = Sockets(proxy.url.replace("http://", "ws://") + "/echo", SOCKETS).start()
        wait_until(lambda: sockets.open == SOCKETS, timeout=30, message="every WebSocket open")
        started, ok_before = time.monotonic(), load.outcomes["ok"]
        ready: list[float] = []
        in_force: list[float] = []  # the command's return -> every new connection sees the change
        late = 0  # new connections answered with the old settings after the command returned
        drained: list[float] = []  # the command's return -> every old worker gone
        for n in range(1, RELOADS + 1):
            moved = n % 2 == 1  # odd reloads: v1_url on backend v3 and a rule on /old/**; even: back
            sup.rewrite(v1_url=other.url if moved else first, deprecations=[RULE] if moved else [])
            expected = ("v3", True) if moved else ("v1", False)
            ran = strangler("reload", "--socket", str(sup.socket))
            returned = time.monotonic()
            said = RELOADED.fullmatch(ran.stdout.strip())
            assert ran.returncode == 0 and said is not None, (ran.stdout, ran.stderr, proxy.output()[-3000:])
            assert int(said.group(1)) == n + 1
            ready.append(float(said.group(2)))
            seconds, olds = time_to_in_force(proxy.port, expected, returned)
            in_force.append(seconds)
            late += olds
            wait_until(
                lambda: all(w["generation"] == n + 1 for w in sup.status()["workers"]),  # noqa: B023
                timeout=15, message=f"generation {n} drained and gone",
            )  # fmt: skip
            drained.append(time.monotonic() - returned)
            wait_until(lambda: sockets.open == SOCKETS, timeout=15, message="every WebSocket back")
        elapsed = time.monotonic() - started
        outcomes = load.stop()
        rate = (outcomes["ok"] - ok_before) / elapsed
        print(
            f"\n{RELOADS} reloads in {elapsed:.1f} s; new generation ready in "
            f"{min(ready):.2f}-{max(ready):.2f} s; change in force on every worker at most "
            f"{max(in_force):.2f} s after the command returned (old settings on {late} of the new "
            f"connections after it); old generation gone {min(drained):.1f}-{max(drained):.1f} s after it; "
            f"keep-alive load {rate:.0f} req/s: "
            f"{dict(outcomes)}; {SOCKETS} WebSockets: closes {dict(sockets.closes)}, "
            f"errors {len(sockets.errors)}, echoes {sockets.echoes}"
        )
        assert set(outcomes) == {"ok"}, (outcomes, load.problems)
        assert max(in_force) < IN_FORCE_SECONDS, in_force
        # each old generation ended because nothing was left, not at its drain timeout (5 s)
        assert max(drained) < 5, drained
        # every reload drained the old generation: each WebSocket told 1001, none lost without a code
        assert dict(sockets.closes) == {1001: RELOADS * SOCKETS}
        assert sockets.errors == []
        metrics = proxy.metrics()
        assert metric_value(metrics, "strangler_config_reloads_total", result="ok") == RELOADS
        assert metric_value(metrics, "strangler_generation") == RELOADS + 1
    finally:
        if sockets is not None:
            sockets.stop()
        ws_backend.stop()
