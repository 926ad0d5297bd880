"""Serving the proxy in one process: our own HTTP/1.1 server (``proxy/edge/server.py``) on uvloop,
the listeners, the backends' start-up check and the drain. ``proxy/supervisor`` runs ``strangler
serve``: a parent that binds the sockets and forks workers, each of which runs ``run_worker``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from proxy.edge.h2server import H2Config
from proxy.edge.server import HttpServer, ServerLimits
from proxy.settings import Settings

log = logging.getLogger("strangler")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
BACKEND_CHECK_SECONDS = 1.0  # how long start-up waits, at most, for the backends' check


class ListenError(OSError):
    """A listener could not bind: one line naming the address and the setting (an OSError, so
    whatever runs ``serve`` without catching it still ends in one line)."""


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_worker(
    settings: Settings, sock: socket.socket | None, early_stops: list[int] | None = None,
    admin_sock: socket.socket | None = None, app: Any = None, on_ready: Any = None,
) -> None:  # fmt: skip
    """One worker: build the app (nothing is created before this point) unless given, serve until
    stopped. ``on_ready(app)`` runs once the listeners accept and the app has started."""
    import uvloop

    if app is None:
        from proxy.app import create_app

        app = create_app(settings)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(
            serve(settings, app, sock=sock, early_stops=early_stops, admin_sock=admin_sock, on_ready=on_ready)
        )


def probe_port(host: str, port: int, setting: str) -> None:
    """Raise ``ListenError`` if ``host:port`` cannot be bound now (taken, not an address here)."""
    if not port:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise listen_error(host, port, setting, exc) from None


def listen_error(host: str, port: int, setting: str, exc: OSError) -> ListenError:
    shown = f"[{host}]" if ":" in host else host
    return ListenError(f"cannot listen on {shown}:{port} ({setting}): {exc.strerror or exc}")


def listening_sockets(host: str, port: int, count: int, setting: str = "port") -> list[socket.socket]:
    """``count`` sockets listening on one port (port 0: the one the first bind got), or a single
    shared one where SO_REUSEPORT does not exist.

    A port already in use is an error (``ListenError`` naming the address and ``setting``), as
    with one socket: a plain bind is tried first, so a stale proxy of the same user that listens
    with SO_REUSEPORT is not silently joined."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reuse_port = hasattr(socket, "SO_REUSEPORT")
    if reuse_port and port:
        probe_port(host, port, setting)
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
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise listen_error(host, port, setting, exc) from None
    return socks


class BackendCheck:
    """Whether v1 and v2 resolve and accept a TCP connection, checked once at start in threads
    (name resolution has no timeout of its own); ``report`` waits ``BACKEND_CHECK_SECONDS`` at most
    and prints one warning line per backend that does not answer. Never fatal: a backend may start
    after the proxy, and the proxy falls back or answers 502 until it does."""

    def __init__(self, settings: Settings, timeout: float = BACKEND_CHECK_SECONDS) -> None:
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.problems: dict[str, str | None] = {}
        self.targets = {"v1": settings.v1_url, "v2": settings.v2_url}
        self.threads = [
            threading.Thread(target=self._check, args=(name, url), name=f"check-{name}", daemon=True)
            for name, url in self.targets.items()
        ]
        # The threads start with SIGINT/SIGTERM blocked (a thread inherits its creator's mask): a
        # stop signal is then never delivered to one of them, where its default action would end
        # the whole process before ``strangler serve``'s parent has set its handlers (a check still
        # resolving then cost the connections queued on the sockets already bound).
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for thread in self.threads:
                thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _check(self, name: str, url: str) -> None:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            self.problems[name] = f"{host} does not resolve"
            return
        family, kind, proto, _, address = addresses[0]
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(max(0.05, self.deadline - time.monotonic()))
            try:
                sock.connect(address)
            except TimeoutError:
                self.problems[name] = f"no answer within {self.timeout:g} s (timed out)"
            except ConnectionRefusedError:
                self.problems[name] = "connection refused"
            except OSError as exc:
                self.problems[name] = f"cannot connect: {exc.strerror or exc}"
            else:
                self.problems[name] = None

    def report(self) -> list[str]:
        """Wait for the checks (until the deadline), print a warning per failed one, return them."""
        for thread in self.threads:
            thread.join(max(0.0, self.deadline - time.monotonic()))
        lines = []
        for name, url in self.targets.items():
            problem = self.problems.get(name, f"no answer within {self.timeout:g} s (timed out)")
            if problem is not None:
                lines.append(f"strangler: warning: {name} backend {url}: {problem}")
        for line in lines:
            print(line, file=sys.stderr, flush=True)
        return lines


def listener_tls(settings: Settings) -> ssl.SSLContext | None:
    """TLS termination when a certificate is configured. SIGHUP reloads the certificate and key
    into the same context: new handshakes use them, open connections are left alone."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    cert, key = str(settings.tls_cert_file), str(settings.tls_key_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if settings.http2.enabled:
        context.set_alpn_protocols(["h2", "http/1.1"])  # HTTP/2 when the client offers it

    def reload() -> None:
        try:
            context.load_cert_chain(cert, key)
            log.info("TLS certificate reloaded from %s", cert)
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS certificate reload failed, keeping the old one: %s", exc)

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    return context


def h2_config(settings: Settings) -> H2Config | None:
    """HTTP/2 on the listeners (h2c prior knowledge, ALPN h2), or None when disabled."""
    http2 = settings.http2
    if not http2.enabled:
        return None
    return H2Config(
        max_concurrent_streams=http2.max_concurrent_streams,
        initial_window_size=http2.initial_window_size,
        max_frame_size=http2.max_frame_size,
        header_table_size=http2.header_table_size,
        max_header_list_size=http2.max_header_list_size,
        max_resets_per_second=http2.max_resets_per_second,
        max_control_frames_per_second=http2.max_control_frames_per_second,
        max_continuation_frames=http2.max_continuation_frames,
        idle_timeout_seconds=http2.idle_timeout_seconds,
        stall_timeout_seconds=http2.stall_timeout_seconds,
    )


def shared_socket(host: str, port: int, setting: str) -> socket.socket:
    """A listening socket every worker (and the next generation during an upgrade) may bind too
    (SO_REUSEPORT, no probe): the h2c-only port is bound by each worker, not by the parent."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise listen_error(host, port, setting, exc) from None
    return sock


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
    early_stops: list[int] | None = None, admin_sock: Any = None, on_ready: Any = None,
) -> None:  # fmt: skip
    """Serve ``app`` (a Strangler) until stopped; with admin_port, the admin API on its own listener.

    Start-up runs the app's lifespan (Redis, control store, pools, background loops) before the
    first connection is accepted; on stop, listeners close, answers in progress get
    ``drain_timeout_seconds``, then the app shuts down. Signals go to ``group`` so a caller such as
    the demo can run other servers in the same loop and stop them all with one Ctrl-C.
    ``early_stops``: stop signals a forked worker received before this loop handled them.
    ``sock``/``admin_sock``: listening sockets bound by the caller; without them both listeners are
    bound here, before the app starts, so a taken port fails before anything says "ready".
    ``on_ready(app)``: called once both listeners accept (a supervised worker tells its parent).
    """
    own_signals = group is None
    group = group or ServerGroup()
    if own_signals:
        group.install_signal_handlers()
    for _ in early_stops or ():  # stop signals that came while this worker started (a second forces)
        group.stop()
    tls = listener_tls(settings)
    with_admin = settings.admin_port is not None and app.admin_app is not None
    if sock is None:
        sock = listening_sockets(settings.host, settings.port, 1, "port")[0]
    if with_admin and admin_sock is None:
        try:
            admin_sock = listening_sockets(settings.host, settings.admin_port or 0, 1, "admin_port")[0]
        except ListenError:
            sock.close()
            raise
    try:
        await app.startup()  # logs "strangler ready": the listeners are bound by now
    except BaseException:
        for bound in (sock, admin_sock):
            if bound is not None:
                bound.close()
        raise
    metrics = app.metrics
    h2 = h2_config(settings)
    main = HttpServer(
        app.proxy.handle,
        limits_for(settings, metrics.rejected_request),
        tls,
        fast=app.proxy.start if settings.fast_path else None,
        h2=h2,
    )
    admin_server: HttpServer | None = None
    h2_server: HttpServer | None = None
    try:
        await main.listen(settings.host, settings.port, sock=sock)
        group.servers.append(main)
        if h2 is not None and settings.http2.port is not None:
            # h2c only (prior knowledge), sharing the main listener's limits and drain
            h2_server = HttpServer(app.proxy.handle, main.limits, None, h2=h2, h2_only=True)
            h2_sock = shared_socket(settings.host, settings.http2.port, "http2.port")
            await h2_server.listen(settings.host, settings.http2.port, sock=h2_sock)
            group.servers.append(h2_server)
        if with_admin:
            admin_app = app.admin_app

            async def admin_only(ex: Any) -> None:
                await ex.asgi(admin_app)

            admin_server = HttpServer(admin_only, limits_for(settings, metrics.rejected_request), h2=h2)
            await admin_server.listen(settings.host, settings.admin_port or 0, sock=admin_sock)
            group.servers.append(admin_server)
            log.info("admin API on its own port: http://%s:%s%s", settings.host, settings.admin_port,
                     settings.admin_prefix)  # fmt: skip
        main.started = True
        if on_ready is not None:
            on_ready(app)
        await group.wait()
    finally:
        drain = 0.0 if group.forced else settings.drain_timeout_seconds
        ws = settings.websocket
        # WebSockets get their grace, then 1001 early enough for the closing handshake to fit
        ws_grace = min(ws.drain_grace_seconds, max(0.0, drain - ws.close_timeout_seconds))
        if h2_server is not None:
            h2_server.stop_listening()
        await main.stop(drain, ws_grace)
        if admin_server is not None:
            await admin_server.stop(0.5)
        await app.shutdown()
