"""Supervised workers (issue 26, item 3): a worker that dies is restarted on the same socket, with
backoff; a crash loop is an error line and a gauge, never hidden.

Real ``strangler serve`` processes; workers are killed with SIGKILL as the kernel's OOM killer would.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable

import httpx

from tests.supervisor.conftest import Load, Supervised
from tests.support import metric_value, wait_until


def test_a_killed_worker_is_back_within_a_second_on_the_same_port(
    supervised: Callable[..., Supervised], load: Callable[..., Load]
) -> None:
    sup = supervised(workers=2)
    proxy = sup.proxy
    before = wait_until(lambda: len(sup.workers()) == 2 and sup.workers(), timeout=10)
    traffic = load(proxy.url, {"v1"})
    wait_until(lambda: len(traffic.answers) > 50, timeout=10)
    os.kill(before[0], signal.SIGKILL)
    # back: a new worker on slot 0, ready (listening, its app started)
    after = wait_until(lambda: sup.workers().get(0, before[0]) != before[0] and sup.workers(), timeout=1.0)
    assert after[1] == before[1]  # its sibling was never touched
    served = len(traffic.answers)
    wait_until(lambda: len(traffic.answers) > served + 50, timeout=10)
    traffic.__exit__()
    assert traffic.wrong == []  # the requests the dead worker held failed cleanly, if any
    for i in range(20):  # every new connection is answered (the kernel hashes each anew)
        reply = httpx.get(proxy.url + f"/echo/{i}", headers={"Connection": "close"}, timeout=3)
        assert reply.status_code == 200
    metrics = proxy.metrics()
    assert metric_value(metrics, "strangler_worker_restarts_total", worker="0") == 1
    assert metric_value(metrics, "strangler_worker_restarts_total", worker="1") == 0
    warning = f"WARNING strangler: worker 0 (pid {before[0]}) killed by signal 9 (SIGKILL); restarting it"
    assert warning in proxy.output()


def test_a_crash_loop_is_an_error_line_and_a_gauge(supervised: Callable[..., Supervised]) -> None:
    sup = supervised(workers=2)
    proxy = sup.proxy
    wait_until(lambda: len(sup.workers()) == 2, timeout=10)
    killed = []
    for _ in range(5):  # five deaths within the minute: waits of 0, 0.1, 0.2 and 0.4 s between
        pid = wait_until(lambda: sup.workers().get(0), timeout=10)
        assert pid not in killed
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        wait_until(lambda dead=pid: dead not in {w["pid"] for w in sup.status()["workers"]}, timeout=5)
    lines = wait_until(
        lambda: re.findall(r"ERROR strangler: (worker 0 is in a crash loop.*)", proxy.output())
    )
    assert lines == [
        f"worker 0 is in a crash loop: killed by signal 9 (SIGKILL) (pid {killed[-1]}), 5 deaths within "
        "60 s, restarted 4 times; next attempt in 0.8 s"
    ]
    assert sup.status()["crash_loop"] == [0]
    assert metric_value(proxy.metrics(), "strangler_worker_crash_loop", worker="0") == 1
    # meanwhile slot 0's socket is closed: every new connection goes to the live worker
    started = time.monotonic()
    while time.monotonic() - started < 0.5:
        reply = httpx.get(proxy.url + "/echo/x", headers={"Connection": "close"}, timeout=3)
        assert reply.status_code == 200
    # and it comes back after its wait, on a socket of its own again
    wait_until(lambda: 0 in sup.workers(), timeout=5)
    assert metric_value(proxy.metrics(), "strangler_worker_restarts_total", worker="0") == 5
