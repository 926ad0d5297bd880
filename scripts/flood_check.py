"""How an ordinary client fares while others hold connections: idle floods and slow uploads.

    .venv/bin/python scripts/flood_check.py --mode idle --connections 600 --nofile 256
    .venv/bin/python scripts/flood_check.py --mode slow --connections 300

Starts a fast local backend and `strangler serve` (optionally under an open-file limit), holds
the connections, then times 20 ordinary GETs and prints the proxy's refusal counters. Loopback
only; it stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.bench import start_backend, stop, wait_http  # noqa: E402
from proxy.control.embedded import free_port  # noqa: E402


def one_get(port: int) -> int:
    """Status of one GET on a new connection (raw socket: no client library in the timing)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /fast HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("idle", "slow"), default="idle")
    parser.add_argument("--connections", type=int, default=600)
    parser.add_argument("--nofile", type=int, default=0, help="the proxy's open-file limit (0: as is)")
    args = parser.parse_args()

    backend, v1 = start_backend("v1")
    port = free_port()
    limit = args.nofile

    def limit_files() -> None:
        if limit:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with tempfile.TemporaryDirectory(prefix="strangler-flood-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
        proxy = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--v1", v1, "--v2", v1, "--port", str(port)],
            cwd=tmp, env={**env, "STRANGLER_LOG_LEVEL": "warning", "STRANGLER_EMBEDDED_REDIS_PORT": "0"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=limit_files,
        )  # fmt: skip
        held: list[socket.socket] = []
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/_strangler/health")
            for _ in range(args.connections):
                sock = socket.create_connection(("127.0.0.1", port))
                if args.mode == "slow":  # one byte of a declared 1,000-byte body, then nothing
                    sock.sendall(b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nx")
                held.append(sock)
            time.sleep(0.5)
            times, codes = [], []
            for _ in range(20):  # a new connection each, as a new client would
                started = time.perf_counter()
                codes.append(one_get(port))
                times.append((time.perf_counter() - started) * 1000)
            times.sort()
            held_text = f"{args.connections} connections held (nofile {limit or 'as is'})"
            print(
                f"{args.mode}: {held_text}; 20 GETs on new connections: statuses {sorted(set(codes))}, "
                f"median {times[10]:.2f} ms, max {times[-1]:.2f} ms"
            )
            metrics = httpx.get(url + "/_strangler/metrics", timeout=5).text
            for line in metrics.splitlines():
                if line.startswith("strangler_rejected_requests_total{"):
                    print(line)
        finally:
            for sock in held:
                sock.close()
            proxy.terminate()
            proxy.wait(20)
            stop(backend)


if __name__ == "__main__":
    main()
