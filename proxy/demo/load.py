"""A light, steady load against a proxy (the demo's generator on its own, for docker compose).

``python -m proxy.demo.load --url http://proxy:8080 --rate 20`` runs until stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from proxy.demo.runner import TrafficGenerator


async def run(url: str, rate: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    generator = TrafficGenerator(url.rstrip("/"), rate)
    await generator.start()
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=30)
            print(f"load: {generator.sent} requests, by version {generator.by_version}", flush=True)
    finally:
        await generator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Strangler demo traffic generator")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    args = parser.parse_args()
    asyncio.run(run(args.url, args.rate))


if __name__ == "__main__":
    main()
