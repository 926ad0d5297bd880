"""``strangler demo``: the whole migration on one machine, no setup (see proxy/demo/runner.py).

``proxy/cli.py`` adds ``demo`` as a command."""

from __future__ import annotations

from typing import Annotated

import typer


def demo(
    port: Annotated[int, typer.Option(help="Proxy port (0 = any free port).")] = 8080,
    v1_port: Annotated[int, typer.Option("--v1-port", help="v1 backend port (0 = any).")] = 8001,
    v2_port: Annotated[int, typer.Option("--v2-port", help="v2 backend port (0 = any).")] = 8002,
    host: Annotated[str, typer.Option(help="Address for all demo servers.")] = "127.0.0.1",
    rate: Annotated[float, typer.Option(help="Generated requests per second (0 = none).")] = 20.0,
    duration: Annotated[float | None, typer.Option(help="Stop by itself after this many seconds.")] = None,
    admin_token: Annotated[
        str | None, typer.Option(envvar="STRANGLER_ADMIN_TOKEN", help="Require this admin token.")
    ] = None,
) -> None:
    """Two sample backends, embedded Redis, the proxy and a light load; Ctrl-C stops it all."""
    from proxy.cliutil import require_extra

    require_extra("demo", "aiohttp")  # the backends and the load (the tools extra)
    import asyncio
    import logging

    import uvloop

    from proxy.demo.runner import DemoOptions, run_demo
    from proxy.server import configure_logging

    configure_logging("warning")
    logging.getLogger("strangler").setLevel(logging.WARNING)
    options = DemoOptions(host, port, v1_port, v2_port, rate, duration, admin_token)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        seen = runner.run(run_demo(options))
    print(f"demo traffic: {seen['sent']} requests, by version {seen['by_version']}", flush=True)
