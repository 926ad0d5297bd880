"""Two real processes around proxy/supervisor/handover.py, for tests/supervisor/test_handover.py.

``old``: listens on 127.0.0.1 (a free port), answers each connection with its pid (one HTTP
answer, then close), and on SIGUSR2 starts ``new`` (this module again) with the hand-over socket in
the environment, gives it the listener, waits for ``ready``, says ``draining``, stops accepting and
exits. ``new``: takes the listener and serves the same way until SIGTERM. ``--new-arg`` values
are passed on to ``new`` (``--want-port``, ``--fail``, ``--exit``) to make it refuse or fail.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from proxy.supervisor import handover


class Acceptor(threading.Thread):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.stopping = threading.Event()
        self.body = str(os.getpid()).encode()

    def run(self) -> None:
        while not self.stopping.is_set():
            readable, _, _ = select.select([self.sock], [], [], 0.02)
            if not readable or self.stopping.is_set():
                continue
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                continue  # the other generation took it
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(self.body)
                conn.sendall(head + self.body)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def old(args: argparse.Namespace) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    acceptor = Acceptor(sock)
    acceptor.start()
    print(f"listening {sock.getsockname()[1]}", flush=True)
    while True:
        signal.sigwait([signal.SIGUSR2])
        path = Path(args.dir) / "handover.sock"
        with handover.Offer(path) as offer:
            env = {**os.environ, handover.ENV: str(path)}
            new = subprocess.Popen(
                [sys.executable, "-m", "tests.supervisor.handover_peer", "new", *args.new], env=env
            )
            print(f"started {new.pid}", flush=True)

            def alive(new: subprocess.Popen[bytes] = new) -> str | None:
                code = new.poll()
                return None if code is None else f"the new process exited with status {code}"

            deadline = time.monotonic() + 10
            try:
                offer.accept(deadline, alive)
                offer.give([handover.Listener("main", 0, sock)], {"generation": 1}, deadline, alive)
                ready = offer.wait_ready(deadline, alive)
                offer.draining(1.0)
            except handover.HandoverError as exc:
                if new.poll() is None:
                    new.kill()
                new.wait()
                print(f"failed: {exc}", flush=True)
                continue
        acceptor.stop()  # drain: nothing in flight here (each answer is written inline)
        sock.close()
        print(f"handed over to {new.pid} (workers {ready['workers']})", flush=True)
        return 0


def new(args: argparse.Namespace) -> int:
    if args.exit is not None:
        return int(args.exit)
    if args.fail:
        handover.report_failure(args.fail)
        print(args.fail, file=sys.stderr, flush=True)
        return 2
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])  # before any thread: sigwait takes it
    taker = handover.Taker.from_environment()
    assert taker is not None
    started = time.monotonic()
    try:
        received = taker.take({"main": ("127.0.0.1", args.want_port)})
    except handover.HandoverError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    sock = received.listeners[0].sock
    sock.setblocking(False)
    acceptor = Acceptor(sock)
    acceptor.start()
    taker.ready(1, time.monotonic() - started)
    taker.wait_draining()
    taker.close()
    signal.sigwait([signal.SIGTERM])
    acceptor.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["old", "new"])
    parser.add_argument("--dir", default=".")
    parser.add_argument("--want-port", type=int, default=0)
    parser.add_argument("--fail", default="")
    parser.add_argument("--exit", type=int, default=None)
    parser.add_argument("--new-arg", dest="new", action="append", default=[], help="passed on to new")
    args = parser.parse_args()
    return old(args) if args.role == "old" else new(args)


if __name__ == "__main__":
    sys.exit(main())
