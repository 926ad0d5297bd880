"""Handing the listening sockets from one generation of the proxy to the next (``strangler upgrade``).

The old parent makes a Unix socket (mode 0600, ``SOCK_SEQPACKET`` so every message keeps its
bounds and its descriptors), starts the new process with the socket's path in ``STRANGLER_HANDOVER``
and waits for it. The new process connects, asks for the listeners, receives each one's descriptor
(``SCM_RIGHTS``: the same kernel socket, so its accept queue is shared and never closed), checks
each against its own settings, starts its workers on them and says ``ready``; the old one answers
``draining`` and drains. Nothing stops accepting at any moment: until the new workers accept, the
old ones still do, on the same queue.

Messages are JSON objects, one per datagram, every one with ``"v": PROTOCOL``::

    new -> old  {"op": "hello", "pid": 5678}
    old -> new  {"op": "listeners", "pid": 1234, "count": 3, "state": {...}}
    old -> new  {"op": "listener", "role": "main", "index": 0, "family": "inet",
                 "address": ["127.0.0.1", 8080]}   + one descriptor         (x count)
    new -> old  {"op": "ready", "workers": 2, "seconds": 0.9}
    old -> new  {"op": "draining", "pid": 1234, "drain_timeout_seconds": 30.0}
    new -> old  {"op": "failed", "error": "error: ..."}   (instead of hello or ready: why it stops)
    old -> new  {"op": "refused", "error": "..."}         (a protocol version the old one does not speak)

Taken from Envoy's hot restart: the new process initialises fully before it asks for the sockets,
asks for them by what they are (it checks the address rather than trusting the order), and tells
the old one when to drain; the two sides check that they speak the same version and refuse
otherwise. From HAProxy's ``expose-fd listeners``: a Unix socket of mode 0600 as the only way in,
each descriptor sent with what it is (role, address), and a new process that refuses to start on
sockets that do not match its configuration instead of binding beside them. Unlike HAProxy's
always-open stats socket, ours exists only while an upgrade runs, and the old side accepts one
connection, from a process of the same user (``SO_PEERCRED``).

Standard library only: this module knows nothing of settings or workers; the parent passes the
listeners and the addresses it wants.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROTOCOL = 1
ENV = "STRANGLER_HANDOVER"  # where the new generation finds the old one's hand-over socket
MAX_MESSAGE = 65536
POLL = 0.05  # how often a wait checks that the other process is still alive

Address = tuple[str, int] | str  # (host, port) for inet listeners, a path for Unix ones


class HandoverError(Exception):
    """The hand-over did not happen; the message is one line, said as the command prints it."""


class PeerFailed(HandoverError):
    """The new process said why it stops (its own one-line error)."""


@dataclass(frozen=True)
class Listener:
    """A listening socket and what it is: ``role`` (main, admin, control) and the worker ``index``
    it serves (main sockets: one per worker under SO_REUSEPORT; others 0)."""

    role: str
    index: int
    sock: socket.socket


@dataclass
class Received:
    """What the new generation got: the listeners (checked), the old one's state and pid."""

    listeners: list[Listener]
    state: dict[str, Any]
    pid: int
    fds: dict[str, int] = field(default_factory=dict)  # extra descriptors by name (not sockets)


FAMILIES: dict[int, str] = {socket.AF_INET: "inet", socket.AF_INET6: "inet6", socket.AF_UNIX: "unix"}
SETTINGS = {"main": "host/port", "admin": "host/admin_port", "control": "control_socket"}  # said in refusals


def family_name(family: int) -> str:
    return FAMILIES.get(int(family), str(family))


def shown(address: Address) -> str:
    if isinstance(address, str):
        return address
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bound_address(sock: socket.socket) -> Address:
    name = sock.getsockname()
    if isinstance(name, str | bytes):
        return name.decode() if isinstance(name, bytes) else name
    return str(name[0]), int(name[1])


def wanted_address(host: str, port: int) -> tuple[str, int]:
    """The address a listener for ``host:port`` is bound to (a name resolved as bind() would)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        info = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror:
        return host, port
    return str(info[0][4][0]), port


def _send(sock: socket.socket, op: str, fds: Sequence[int] = (), **fields: Any) -> None:
    data = json.dumps({"v": PROTOCOL, "op": op, **fields}).encode()
    try:
        if fds:
            socket.send_fds(sock, [data], list(fds))
        else:
            sock.sendall(data)
    except OSError as exc:
        raise HandoverError(f"the other process closed the hand-over ({exc.strerror or exc})") from None


def _receive(
    sock: socket.socket, deadline: float, alive: Callable[[], str | None] | None, waiting_for: str
) -> tuple[dict[str, Any], list[int]]:
    """The next message and its descriptors; ``HandoverError`` at the deadline, when the other side
    closes, or when ``alive()`` says why the other process is gone."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HandoverError(f"no {waiting_for} within the time allowed")
        readable, _, _ = select.select([sock], [], [], min(POLL, left))
        if not readable:
            gone = alive() if alive is not None else None
            if gone:
                raise HandoverError(f"{gone} before {waiting_for}")
            continue
        data, fds, _flags, _ = socket.recv_fds(sock, MAX_MESSAGE, 16)
        if not data:
            for fd in fds:
                os.close(fd)
            gone = _wait_gone(alive)
            raise HandoverError(f"{gone or 'the other process closed the hand-over'} before {waiting_for}")
        try:
            message = json.loads(data)
            if not isinstance(message, dict):
                raise ValueError("not an object")
        except ValueError:
            for fd in fds:
                os.close(fd)
            raise HandoverError(f"a hand-over message that is not JSON: {data[:60]!r}") from None
        return message, fds


def _wait_gone(alive: Callable[[], str | None] | None, timeout: float = 1.0) -> str | None:
    """After the other side closed: its exit status if it exits soon (a clearer reason)."""
    if alive is None:
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gone = alive()
        if gone:
            return gone
        time.sleep(0.02)
    return None


# ---- the old generation's side -------------------------------------------------------------------


class Offer:
    """The old parent's end: bound and listening before the new process starts (so its first
    ``connect`` never races the bind), accepting one connection; removed when closed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale one from a killed upgrade
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old_mask = os.umask(0o177)  # 0600 from the start, not after a window
        try:
            self.server.bind(str(path))
        finally:
            os.umask(old_mask)
        self.server.listen(1)
        self.conn: socket.socket | None = None
        self.peer_pid: int | None = None

    def __enter__(self) -> Offer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def forget(self) -> None:
        """In a forked child: close our copies, leave the socket file to the parent."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.server.close()

    def accept(self, deadline: float, alive: Callable[[], str | None] | None = None) -> socket.socket:
        """The new process's connection (same user only, checked with SO_PEERCRED)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HandoverError("the new process did not connect to the hand-over socket in time")
            readable, _, _ = select.select([self.server], [], [], min(POLL, left))
            if readable:
                break
            gone = alive() if alive is not None else None
            if gone:
                raise HandoverError(f"{gone} before it connected")
        conn, _ = self.server.accept()
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            conn.close()
            raise HandoverError(f"refused a hand-over connection from uid {uid} (pid {pid})")
        self.conn, self.peer_pid = conn, pid
        return conn

    def give(
        self,
        listeners: Iterable[Listener],
        state: Mapping[str, Any],
        deadline: float,
        alive: Callable[[], str | None] | None = None,
        fds: Mapping[str, int] | None = None,
    ) -> None:
        """Answer the new process's hello with every listener (and the named extra descriptors).
        Raises ``HandoverError`` with the new process's own line if it failed instead of asking."""
        conn = self._conn()
        hello, stray = _receive(conn, deadline, alive, "it asked for the listeners")
        for fd in stray:
            os.close(fd)
        _check_version(conn, hello)
        if hello.get("op") == "failed":
            raise PeerFailed(str(hello.get("error") or "the new process failed"))
        if hello.get("op") != "hello":
            raise HandoverError(f"unexpected hand-over message {hello.get('op')!r} (wanted hello)")
        items = list(listeners)
        extra = dict(fds or {})
        _send(conn, "listeners", pid=os.getpid(), count=len(items) + len(extra), state=dict(state))
        for item in items:
            address = bound_address(item.sock)
            described = address if isinstance(address, str) else list(address)
            _send(
                conn, "listener", [item.sock.fileno()], role=item.role, index=item.index,
                family=family_name(item.sock.family), address=described,
            )  # fmt: skip
        for name, fd in extra.items():
            _send(conn, "fd", [fd], name=name)

    def wait_ready(self, deadline: float, alive: Callable[[], str | None] | None = None) -> dict[str, Any]:
        """The new generation's ``ready`` (its workers listen); ``HandoverError`` with its reason if
        it failed, exited or did not become ready by ``deadline``."""
        conn = self._conn()
        message, stray = _receive(conn, deadline, alive, "its workers were ready")
        for fd in stray:
            os.close(fd)
        if message.get("op") == "failed":
            raise PeerFailed(str(message.get("error") or "the new process failed"))
        if message.get("op") != "ready":
            raise HandoverError(f"unexpected hand-over message {message.get('op')!r} (wanted ready)")
        return message

    def draining(self, drain_timeout_seconds: float) -> None:
        """Tell the new generation that this one drains now (it owns the sockets from here)."""
        _send(self._conn(), "draining", pid=os.getpid(), drain_timeout_seconds=drain_timeout_seconds)

    def _conn(self) -> socket.socket:
        if self.conn is None:
            raise HandoverError("no hand-over connection")
        return self.conn


def _check_version(conn: socket.socket, message: Mapping[str, Any]) -> None:
    version = message.get("v")
    if version != PROTOCOL:
        error = f"the new process speaks hand-over protocol {version}, this one {PROTOCOL}: restart instead"
        with contextlib.suppress(HandoverError):
            _send(conn, "refused", error=error)
        raise HandoverError(error)


# ---- the new generation's side -------------------------------------------------------------------


class Taker:
    """The new process's end: connect, ask, check, take; then ``ready`` and wait for ``draining``."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 5.0) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError as exc:
            self.sock.close()
            problem = exc.strerror or exc
            raise HandoverError(f"cannot reach the old generation at {self.path}: {problem}") from None
        self.sock.settimeout(None)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Taker | None:
        path = environ.get(ENV)
        return cls(path) if path else None

    def close(self) -> None:
        self.sock.close()

    def take(
        self, wanted: Mapping[str, Address], timeout: float = 10.0, optional: Iterable[str] = ()
    ) -> Received:
        """Every listener the old generation holds, checked against ``wanted`` (role -> the address
        this process's settings bind; a port of 0 accepts any port). A listener that is not a
        listening stream socket, or is bound elsewhere, or a role the settings do not want, or a
        wanted role not handed over, refuses the whole hand-over (``HandoverError``, one line; the
        old side is told why) and closes what was received. A role in ``optional`` that does not
        fit is only left out (closed here; this process binds its own)."""
        optional = set(optional)
        deadline = time.monotonic() + timeout
        _send(self.sock, "hello", pid=os.getpid())
        head, stray = _receive(self.sock, deadline, None, "the listeners came")
        for fd in stray:
            os.close(fd)
        if head.get("op") == "refused":
            raise HandoverError(str(head.get("error")))
        if head.get("v") != PROTOCOL or head.get("op") != "listeners":
            version = head.get("v")
            raise HandoverError(
                f"the old generation speaks hand-over protocol {version}, this one {PROTOCOL}: "
                "restart instead"
            )
        listeners: list[Listener] = []
        extra: dict[str, int] = {}
        try:
            for _ in range(int(head.get("count", 0))):
                message, fds = _receive(self.sock, deadline, None, "every listener came")
                if len(fds) != 1:
                    for fd in fds:
                        os.close(fd)
                    raise HandoverError(f"a hand-over message with {len(fds)} descriptors (wanted 1)")
                if message.get("op") == "fd":
                    extra[str(message.get("name"))] = fds[0]
                    continue
                sock = socket.socket(fileno=fds[0])
                role = str(message.get("role"))
                listeners.append(Listener(role, int(message.get("index", 0)), sock))
                problem = check(sock, message, wanted)
                if problem and role in optional:
                    listeners.pop().sock.close()
                elif problem:
                    raise HandoverError(problem)
            missing = sorted(set(wanted) - optional - {item.role for item in listeners})
            if missing:
                raise HandoverError(
                    f"upgrade: the old generation has no {', '.join(missing)} listener; restart instead"
                )
        except BaseException as exc:
            for item in listeners:
                item.sock.close()
            for fd in extra.values():
                os.close(fd)
            if isinstance(exc, HandoverError):
                self.fail(str(exc))
            raise
        return Received(listeners, dict(head.get("state") or {}), int(head.get("pid", 0)), extra)

    def ready(self, workers: int, seconds: float) -> None:
        _send(self.sock, "ready", pid=os.getpid(), workers=workers, seconds=round(seconds, 3))

    def wait_draining(self, timeout: float = 10.0) -> dict[str, Any]:
        message, stray = _receive(self.sock, time.monotonic() + timeout, None, "the old generation drained")
        for fd in stray:
            os.close(fd)
        if message.get("op") != "draining":
            raise HandoverError(f"unexpected hand-over message {message.get('op')!r} (wanted draining)")
        return message

    def fail(self, error: str) -> None:
        """Tell the old generation why this one stops (it keeps serving and reports the line)."""
        with contextlib.suppress(HandoverError):
            _send(self.sock, "failed", error=error)


def report_failure(error: str, environ: Mapping[str, str] = os.environ) -> None:
    """A new generation that fails before it took the listeners (its settings are invalid, say):
    tell the old one the line it printed, if an upgrade started this process. Never raises."""
    path = environ.get(ENV)
    if not path:
        return
    with contextlib.suppress(OSError, HandoverError):
        taker = Taker(path, timeout=1.0)
        try:
            taker.fail(error)
        finally:
            taker.close()


def check(sock: socket.socket, described: Mapping[str, Any], wanted: Mapping[str, Address]) -> str | None:
    """Why this received socket cannot serve ``described['role']`` here, or None."""
    role = str(described.get("role"))
    label = f"the {role} listener" if role != "main" else "the listener"
    if role not in wanted:
        return f"upgrade: the old generation hands over the {role} listener, which these settings do not have"
    if sock.type != socket.SOCK_STREAM:
        return f"upgrade: {label} handed over is not a stream socket"
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return f"upgrade: {label} handed over is not listening"
    if family_name(sock.family) != described.get("family"):
        family, said = family_name(sock.family), described.get("family")
        return f"upgrade: {label} handed over is {family}, described as {said}"
    have = bound_address(sock)
    want = wanted[role]
    if isinstance(want, str) or isinstance(have, str):
        same = (
            isinstance(have, str) and isinstance(want, str) and os.path.abspath(have) == os.path.abspath(want)
        )
    else:
        same = have[0] == want[0] and (want[1] == 0 or have[1] == want[1])
    if not same:
        setting = SETTINGS.get(role, role)
        return (
            f"upgrade: {label} handed over is bound to {shown(have)}, these settings want {shown(want)} "
            f"({setting} changed: restart instead)"
        )
    return None
