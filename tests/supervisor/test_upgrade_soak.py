"""The upgrade target, as a ``soak`` test (long suite only): SOAK_UPGRADES upgrades in a row
under keep-alive load with 100 WebSockets open (5 in CI, about 25 s; the release check is 20:
``SOAK_UPGRADES=20 pytest -m soak tests/supervisor/test_upgrade_soak.py -s``): no connection
reset, no 5xx, no body cut; every WebSocket closed with 1001 and reconnected each time. Prints
what it measured."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.clirun import strangler
from tests.supervisor.conftest import Supervised
from tests.supervisor.test_upgrade import UPGRADED, KeepAlive, alive, all_ready, stop_pids, wait_gone
from tests.support import metric_value, wait_until

UPGRADES = int(os.environ.get("SOAK_UPGRADES", "5"))
__all__ = ["stop_pids"]  # the fixture, shared with test_upgrade.py
SOCKETS = 100


class Sockets:
    """``count`` WebSockets on one asyncio loop in a thread: each echoes every 0.2 s; on a close it
    records the code and reconnects at once."""

    def __init__(self, url: str, count: int) -> None:
        self.url = url
        self.count = count
        self.closes: Counter[int | None] = Counter()
        self.errors: list[str] = []
        self.open = 0
        self.echoes = 0
        self.stopping = False
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> Sockets:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(20)

    async def _main(self) -> None:
        await asyncio.gather(*(self._one(i) for i in range(self.count)))

    async def _one(self, index: int) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        headers = {"X-Strangler-Version": "v2"}
        while not self.stopping:
            try:
                async with connect(
                    self.url, open_timeout=10, compression=None, additional_headers=headers
                ) as ws:
                    self.open += 1
                    try:
                        while not self.stopping:
                            await ws.send(f"{index}")
                            if await asyncio.wait_for(ws.recv(), 10) != f"{index}":
                                self.errors.append(f"{index}: wrong echo")
                            self.echoes += 1
                            await asyncio.sleep(0.2)
                    except ConnectionClosed as closed:
                        self.closes[closed.rcvd.code if closed.rcvd is not None else None] += 1
                    finally:
                        self.open -= 1
            except Exception as exc:  # noqa: BLE001 - counted, reported by the test
                self.errors.append(f"{index}: {exc!r}")
                await asyncio.sleep(0.1)


@pytest.mark.soak
def test_twenty_upgrades_under_load_with_a_hundred_websockets(
    supervised: Callable[..., Supervised], stop_pids: list[int]
) -> None:
    from tests.wsbackend import WsBackend

    ws_backend = WsBackend("v2").start()
    sockets: Sockets | None = None
    try:
        sup = supervised(
            workers=2, v2_url=ws_backend.url, drain_timeout_seconds=5,
            websocket={"drain_grace_seconds": 0.3}, limits={"drain_idle_grace_seconds": 0.3},
        )  # fmt: skip
        proxy = sup.proxy
        assert proxy.process is not None
        all_ready(sup, 2)
        load = KeepAlive(proxy.port, clients=8).start()
        sockets = Sockets(proxy.url.replace("http://", "ws://") + "/echo", SOCKETS).start()
        wait_until(lambda: sockets.open == SOCKETS, timeout=30, message="every WebSocket open")
        started, ok_before = time.monotonic(), load.outcomes["ok"]
        pid, seconds = proxy.process.pid, []
        for _ in range(UPGRADES):
            ran = strangler("upgrade", "--socket", str(sup.socket))
            said = UPGRADED.fullmatch(ran.stdout.strip())
            assert ran.returncode == 0 and said is not None, (ran.stdout, ran.stderr, proxy.output()[-3000:])
            new_pid = int(said.group(2))
            stop_pids.append(new_pid)
            seconds.append(float(ran.stdout.split(" ready in ")[1].split(" s;")[0]))
            assert wait_gone(pid, 15), f"the old parent {pid} did not exit"
            pid = new_pid
            wait_until(lambda: sockets.open == SOCKETS, timeout=15, message="every WebSocket back")
        elapsed = time.monotonic() - started
        outcomes = load.stop()
        rate = (outcomes["ok"] - ok_before) / elapsed
        print(
            f"\n{UPGRADES} upgrades in {elapsed:.1f} s; new generation ready in "
            f"{min(seconds):.1f}-{max(seconds):.1f} s; keep-alive load {rate:.0f} req/s: {dict(outcomes)}; "
            f"{SOCKETS} WebSockets: closes {dict(sockets.closes)}, errors {len(sockets.errors)}, "
            f"echoes {sockets.echoes}"
        )
        assert set(outcomes) == {"ok"}, (outcomes, load.problems)
        assert dict(sockets.closes) == {1001: UPGRADES * SOCKETS}
        assert sockets.errors == []
        assert alive(pid)
        assert metric_value(proxy.metrics(), "strangler_upgrades_total", result="ok") == UPGRADES
    finally:
        if sockets is not None:
            sockets.stop()
        ws_backend.stop()
