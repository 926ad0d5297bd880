"""Running the proxy: resolve the embedded Redis and the admin token, then serve with our own HTTP/1.1
server (``proxy/edge/server.py``) on uvloop, in one process or several workers sharing the socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
from typing import Any

from proxy.admin.token import ensure_admin_token
from proxy.control.embedded import EmbeddedRedis
from proxy.edge.server import HttpServer, ServerLimits
from proxy.settings import Settings

log = logging.getLogger("strangler")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run(settings: Settings) -> None:
    """Blocking: serve until SIGINT/SIGTERM, then stop what we started."""
    configure_logging(settings.log_level)
    raise_open_file_limit()
    embedded: EmbeddedRedis | None = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings.embedded_redis_dir, settings.embedded_redis_port)
        url = embedded.start()
        settings = settings.model_copy(update={"redis_url": url})
        print(f"strangler: embedded Redis at {url} (data in {embedded.directory})", flush=True)
        hint = f"redis-cli -u {url} SET {settings.split_key} 10"
        print(f"strangler: change the split with `{hint}`", flush=True)
    if settings.admin_token is None:
        settings = ensure_admin_token(settings)
        print(f"strangler: admin token in {settings.admin_token_file} (the local CLI reads it)", flush=True)
    metrics_dir: str | None = None
    try:
        if settings.workers > 1:
            metrics_dir = tempfile.mkdtemp(prefix="strangler-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            supervise(settings)
        else:
            _run_worker(settings, None)
    finally:
        if embedded is not None:
            embedded.stop()
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_worker(settings: Settings, sock: socket.socket | None, early_stops: list[int] | None = None) -> None:
    """One process: build the app (nothing is created before this point), serve until stopped."""
    import uvloop

    from proxy.app import create_app

    app = create_app(settings)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(settings, app, sock=sock, early_stops=early_stops))


def _run_forked_worker(settings: Settings, socks: list[socket.socket], index: int) -> None:
    """A forked worker keeps only its own listening socket: a sibling's socket held open here
    would outlive that sibling, and the connections the kernel gives it would wait unanswered.

    Its socket queues connections from before the fork, so a stop signal while the worker starts
    (imports, Redis) must not end it by the default action, which resets them: the signals,
    blocked since ``supervise``, are recorded from here on, and ``serve`` stops (drains) as soon as
    it listens."""
    early_stops: list[int] = []

    def remember(signum: int, _frame: Any) -> None:
        early_stops.append(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, remember)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    mine = socks[index % len(socks)]
    for sock in socks:
        if sock is not mine:
            sock.close()
    _run_worker(settings, mine, early_stops)


def supervise(settings: Settings) -> None:
    """``workers: N``: one listening socket per worker on the same port (SO_REUSEPORT), so the
    kernel spreads new connections evenly; fork the workers and pass SIGINT/SIGTERM on. A worker
    that dies is not restarted: its socket leaves the group and the others keep serving; the parent
    exits when all have stopped.

    Why not one shared socket: with it, whichever worker wakes first takes the connection, and
    under load one worker ends up with most of them (48 of 64 measured), so two workers gave far
    less than twice one. Without SO_REUSEPORT (not Linux/BSD) the workers share one socket.

    SIGINT/SIGTERM are held (blocked, left pending) from before the sockets listen until every
    worker is forked and ``forward`` is set: by the default action a signal in between would end
    this process, leaving the workers running with no one to tell them, or a new worker before its
    handler is set, resetting the connections queued on its socket. The workers inherit the mask."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        socks = listening_sockets(settings.host, settings.port, settings.workers)
        context = multiprocessing.get_context("fork")
        workers = [
            context.Process(
                target=_run_forked_worker, args=(settings, socks, i), name=f"strangler-worker-{i}"
            )
            for i in range(settings.workers)
        ]
        for worker in workers:
            worker.start()
        for sock in socks:
            sock.close()

        def forward(signum: int, _frame: Any) -> None:
            for worker in workers:
                if worker.pid is not None and worker.is_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signum)

        for sig in STOP_SIGNALS:
            signal.signal(sig, forward)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one that came meanwhile runs now
    for worker in workers:
        worker.join()


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets listening on one port (port 0: the one the first bind got), or a single
    shared one where SO_REUSEPORT does not exist.

    A port already in use is an error, as with one socket: a plain bind is tried first, so a
    stale proxy of the same user that listens with SO_REUSEPORT is not silently joined."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reuse_port = hasattr(socket, "SO_REUSEPORT")
    if reuse_port and port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))  # raises "address already in use"
    socks: list[socket.socket] = []
    try:
        for _ in range(count if reuse_port else 1):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(2048)
            sock.set_inheritable(True)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def listener_tls(settings: Settings) -> ssl.SSLContext | None:
    """TLS termination when a certificate is configured. SIGHUP reloads the certificate and key
    into the same context: new handshakes use them, open connections are left alone."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    cert, key = str(settings.tls_cert_file), str(settings.tls_key_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    def reload() -> None:
        try:
            context.load_cert_chain(cert, key)
            log.info("TLS certificate reloaded from %s", cert)
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS certificate reload failed, keeping the old one: %s", exc)

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    return context


def limits_for(settings: Settings, count: Any) -> ServerLimits:
    limits = settings.limits
    return ServerLimits(
        max_request_line_bytes=limits.max_request_line_bytes,
        max_header_bytes=limits.max_header_bytes,
        max_headers=limits.max_headers,
        max_body_bytes=limits.max_body_bytes,
        header_timeout_seconds=limits.header_timeout_seconds,
        body_timeout_seconds=limits.body_timeout_seconds,
        keepalive_timeout_seconds=limits.keepalive_timeout_seconds,
        max_connections=connection_cap(limits.max_connections),
        max_pipelined_requests=limits.max_pipelined_requests,
        send_timeout_seconds=limits.send_timeout_seconds,
        drain_idle_grace_seconds=limits.drain_idle_grace_seconds,
        strict_states=limits.strict_states,
        count=count,
    )


def connection_cap(configured: int) -> int:
    """The configured cap, kept below the open-file limit: each client connection may need an
    upstream one too, and Redis, the mirror and the listener need a few. Past the limit accept()
    fails with EMFILE and nobody is served; below it we choose whom to close."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return configured
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(8, min(configured, (soft - 64) // 2))


def raise_open_file_limit() -> None:
    """Soft open-file limit up to the hard one: the default 1024 is a few hundred clients."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else 1 << 20
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


class ServerGroup:
    """Servers stopped together: the first stop() starts a graceful drain; a second one ends the
    drain at once (connections still open are aborted), after which the app shuts down as usual
    (``serve``'s ``finally``): it cuts the wait short, it does not exit the process."""

    def __init__(self) -> None:
        self.servers: list[HttpServer] = []
        self.stopping = False
        self.forced = False
        self._stop = asyncio.Event()

    def stop(self) -> None:
        if self.stopping:
            self.forced = True
            for server in self.servers:
                server.force()  # read by the drain in progress, not once before it starts
        self.stopping = True
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stop)


async def serve(
    settings: Settings, app: Any, group: ServerGroup | None = None, sock: Any = None,
    early_stops: list[int] | None = None,
) -> None:  # fmt: skip
    """Serve ``app`` (a Strangler) until stopped; with admin_port, the admin API on its own listener.

    Start-up runs the app's lifespan (Redis, control store, pools, background loops) before the
    first connection is accepted; on stop, listeners close, answers in progress get
    ``drain_timeout_seconds``, then the app shuts down. Signals go to ``group`` so a caller such as
    the demo can run other servers in the same loop and stop them all with one Ctrl-C.
    ``early_stops``: stop signals a forked worker received before this loop handled them.
    """
    own_signals = group is None
    group = group or ServerGroup()
    if own_signals:
        group.install_signal_handlers()
    for _ in early_stops or ():  # stop signals that came while this worker started (a second forces)
        group.stop()
    tls = listener_tls(settings)
    await app.startup()
    metrics = app.metrics
    main = HttpServer(
        app.proxy.handle,
        limits_for(settings, metrics.rejected_request),
        tls,
        fast=app.proxy.start if settings.fast_path else None,
    )
    admin_server: HttpServer | None = None
    try:
        await main.listen(settings.host, settings.port, sock=sock)
        group.servers.append(main)
        if settings.admin_port is not None and app.admin_app is not None:
            admin_app = app.admin_app

            async def admin_only(ex: Any) -> None:
                await ex.asgi(admin_app)

            admin_server = HttpServer(admin_only, limits_for(settings, metrics.rejected_request))
            await admin_server.listen(settings.host, settings.admin_port)
            group.servers.append(admin_server)
            log.info("admin API on its own port: http://%s:%s%s", settings.host, settings.admin_port,
                     settings.admin_prefix)  # fmt: skip
        main.started = True
        await group.wait()
    finally:
        drain = 0.0 if group.forced else settings.drain_timeout_seconds
        ws = settings.websocket
        # WebSockets get their grace, then 1001 early enough for the closing handshake to fit
        ws_grace = min(ws.drain_grace_seconds, max(0.0, drain - ws.close_timeout_seconds))
        await main.stop(drain, ws_grace)
        if admin_server is not None:
            await admin_server.stop(0.5)
        await app.shutdown()
