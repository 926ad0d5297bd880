"""Several workers: one listening socket each on the same port (SO_REUSEPORT).

Real ``strangler serve --workers 2`` processes; the kernel spreads new connections over the
workers' sockets, so a worker that dies must take its socket with it (no sibling may hold it open,
or the connections the kernel gives it would wait unanswered), and a port already in use is still
an error rather than a group silently joined.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable

import httpx
import psutil

from tests.support import ProxyProcess, free_port, wait_until


def _workers(proxy: ProxyProcess) -> list[psutil.Process]:
    assert proxy.process is not None
    return [p for p in psutil.Process(proxy.process.pid).children() if "redis" not in " ".join(p.cmdline())]


def test_every_new_connection_is_served_after_a_worker_dies(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(workers=2)
    workers = wait_until(lambda: len(_workers(proxy)) == 2 and _workers(proxy), timeout=10)
    listening = {
        w.pid: [c for c in w.net_connections("tcp") if c.status == psutil.CONN_LISTEN] for w in workers
    }
    # each worker holds its own listening socket only
    assert all(len(socks) == 1 for socks in listening.values()), listening
    os.kill(workers[0].pid, signal.SIGKILL)
    wait_until(lambda: not workers[0].is_running() or workers[0].status() == psutil.STATUS_ZOMBIE, timeout=10)
    for i in range(40):  # a new connection each time: the kernel hashes each anew
        reply = httpx.get(proxy.url + f"/echo/{i}", headers={"Connection": "close"}, timeout=3)
        assert reply.status_code == 200


def test_a_port_in_use_is_refused_not_shared(start_proxy: Callable[..., ProxyProcess]) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as a stale proxy would
        holder.bind(("127.0.0.1", port))
        holder.listen(8)
        proxy = start_proxy(workers=2, port=port, wait=False)
        assert proxy.process is not None
        assert proxy.process.wait(timeout=20) != 0
        assert "in use" in proxy.output().lower()
