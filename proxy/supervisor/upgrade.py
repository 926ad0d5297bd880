"""``strangler upgrade`` (or SIGUSR2 to the parent): a new generation of the whole proxy, parent
included, takes the listening sockets from the running one (``handover.py``), and the old one drains
and exits.

The old parent (``Upgrade``, driven by its loop) starts the new process the way it was itself
started: the same command line (``sys.orig_argv``: the interpreter and ``-m proxy.cli serve ...``
or the installed ``strangler`` script, so whatever version is installed there now runs), the
environment it started with and the same working directory, plus ``STRANGLER_HANDOVER`` naming its
hand-over socket. The new parent (``adopt``) takes the listeners instead of binding them, owns the
embedded Redis instead of starting one, takes the control socket, forks its workers and says
``ready`` when every one of them is; only then does the old parent drain its workers (the graceful
stop) and exit. If the new process fails, exits or is not ready within ``UPGRADE_TIMEOUT_SECONDS``,
the old parent kills what was started and keeps serving; the caller gets the new process's reason.

The new parent is a new process (as with Envoy; unlike nginx's binary upgrade the old one exits),
in a process group of its own; it writes its pid to ``strangler.pid`` beside the control socket.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.supervisor.handover import (
    ENV,
    Address,
    HandoverError,
    Listener,
    Offer,
    PeerFailed,
    Taker,
    shown,
    wanted_address,
)

if TYPE_CHECKING:
    from proxy.control.embedded import EmbeddedRedis
    from proxy.settings import Settings

UPGRADE_TIMEOUT_SECONDS = 60.0  # from the new process's start to its workers' readiness
PID_FILE = "strangler.pid"


@dataclass(frozen=True)
class Launch:
    """How this ``serve`` was started; recorded at start, before anything changes the environment."""

    argv: list[str]
    cwd: str
    env: dict[str, str]

    @classmethod
    def record(cls) -> Launch:
        env = {name: value for name, value in os.environ.items() if name != ENV}
        argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
        if argv and os.sep not in argv[0]:  # "python3" found on PATH then; the same one now
            argv[0] = sys.executable
        return cls(argv, os.getcwd(), env)


def pid_file(control_socket: Path) -> Path:
    return control_socket.parent / PID_FILE


def write_pid_file(control_socket: Path) -> None:
    path = pid_file(control_socket)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{PID_FILE}.{os.getpid()}")
        temporary.write_text(f"{os.getpid()}\n")
        temporary.replace(path)  # a reader never sees half a pid


def remove_pid_file(control_socket: Path) -> None:
    """At exit, if the file still names this process (after an upgrade it names the new one)."""
    path = pid_file(control_socket)
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()


# ---- the old generation ------------------------------------------------------------------------------


@dataclass
class Upgrade:
    """One upgrade in progress in the old parent. The parent's loop watches ``fileno()`` and calls
    ``step()`` when it is readable and ``expired(now)`` on each turn; ``step`` returns True once the
    new generation is ready (then ``commit``), and both raise ``HandoverError`` when it failed
    (then ``abort``)."""

    launch: Launch
    path: Path
    listeners: list[Listener]
    state: dict[str, Any]
    fds: dict[str, int]
    drain_timeout_seconds: float
    timeout: float = UPGRADE_TIMEOUT_SECONDS
    started: float = field(default_factory=time.monotonic)
    process: subprocess.Popen[bytes] | None = None
    stage: str = "connect"  # connect -> hello -> ready -> done
    answer: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.offer = Offer(self.path)
        self.deadline = self.started + self.timeout
        try:
            self.process = subprocess.Popen(
                self.launch.argv,
                cwd=self.launch.cwd,
                env={**self.launch.env, ENV: str(self.path)},
                stdin=subprocess.DEVNULL,
                process_group=0,  # a Ctrl-C meant for the old generation does not reach the new one
            )
        except OSError as exc:
            self.offer.close()
            raise HandoverError(f"cannot start {self.launch.argv[0]}: {exc.strerror or exc}") from None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def fileno(self) -> int:
        conn = self.offer.conn
        return conn.fileno() if conn is not None else self.offer.server.fileno()

    def gone(self) -> str | None:
        """Why the new process is no longer there, or None while it runs."""
        code = self.process.poll() if self.process is not None else None
        if code is None:
            return None
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"the new process (pid {self.pid}) was killed by {signal.Signals(-code).name}"
        return f"the new process (pid {self.pid}) exited with status {code}"

    def step(self) -> bool:
        """Advance on a readable hand-over socket; True when the new generation is ready."""
        soon = time.monotonic() + 1.0  # readable: the message is there (or the peer closed)
        if self.stage == "connect":
            self.offer.accept(soon, self.gone)
            self.stage = "hello"
        elif self.stage == "hello":
            self.offer.give(self.listeners, self.state, soon, self.gone, self.fds)
            self.stage = "ready"
        elif self.stage == "ready":
            self.answer = self.offer.wait_ready(soon, self.gone)
            self.stage = "done"
            return True
        return False

    def expired(self, now: float) -> None:
        gone = self.gone()
        if gone and self.stage != "done":
            self._last_words()
            waiting = {"connect": "it connected", "hello": "it asked for the listeners"}
            raise HandoverError(f"{gone} before {waiting.get(self.stage, 'its workers were ready')}")
        if now >= self.deadline and self.stage != "done":
            raise HandoverError(f"the new generation was not ready within {self.timeout:g} s")

    def _last_words(self) -> None:
        """The new process is gone: what it said before it went (its one-line reason, already in
        the socket) counts more than its exit status. Raises ``PeerFailed`` with it, if it said."""
        try:
            while self.stage != "done" and select.select([self.fileno()], [], [], 0)[0]:
                self.step()
        except PeerFailed:
            raise
        except HandoverError:
            pass

    def commit(self) -> dict[str, Any]:
        """Tell the new generation we drain now; the answer for the command."""
        self.offer.draining(self.drain_timeout_seconds)
        self.offer.close()
        return {
            "ok": True, "result": "ok", "old_pid": os.getpid(), "new_pid": self.pid,
            "workers": int(self.answer.get("workers", 0)),
            "seconds": round(time.monotonic() - self.started, 3),
            "drain_timeout_seconds": self.drain_timeout_seconds,
        }  # fmt: skip

    def abort(self) -> subprocess.Popen[bytes] | None:
        """The new generation failed: tell what was started to stop (SIGTERM: its parent drains
        what its workers may have accepted). Returns the process if it still runs: the caller
        reaps it, and kills it if it outlives its drain (its workers die with their parent)."""
        self.offer.close()
        process = self.process
        if process is None or process.poll() is not None:
            return None
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        return process


def handover_path(control_socket: Path) -> Path:
    return control_socket.with_name(control_socket.name + ".handover")


# ---- the new generation ------------------------------------------------------------------------------


@dataclass
class Adopted:
    """What the new parent took from the old one."""

    taker: Taker
    socks: list[socket.socket]  # main listeners, one per worker
    admin_sock: socket.socket | None
    control_sock: socket.socket | None
    embedded: EmbeddedRedis | None
    state: dict[str, Any]
    old_pid: int
    started: float
    done: bool = False  # said ready (or failed): the hand-over is over

    def ready(self, workers: int) -> None:
        """Every worker serves: tell the old generation and wait for its ``draining``."""
        self.done = True
        try:
            self.taker.ready(workers, time.monotonic() - self.started)
            self.taker.wait_draining(timeout=5.0)
        finally:
            self.taker.close()

    def fail(self, error: str) -> None:
        """This generation cannot serve: the old one keeps serving and reports ``error``."""
        self.done = True
        self.taker.fail(error)
        self.taker.close()


def wanted(settings: Settings) -> tuple[dict[str, Address], set[str]]:
    """What these settings bind: main, admin and control. Only main must match: an admin listener
    or control socket that moved (or was not there) is bound anew; one left behind closes with the
    old generation."""
    want: dict[str, Address] = {"main": wanted_address(settings.host, settings.port)}
    if settings.admin_port is not None:
        want["admin"] = wanted_address(settings.host, settings.admin_port)
    want["control"] = os.path.abspath(settings.control_socket)
    return want, {"admin", "control"}


def adopt(settings: Settings, environ: Mapping[str, str] = os.environ) -> Adopted | None:
    """In the new parent, when an upgrade started it: the listeners (checked), the embedded Redis,
    the control socket. None when no upgrade started this process. ``HandoverError`` (one line,
    told to the old parent too) when what the old generation holds does not fit these settings."""
    started = time.monotonic()
    taker = Taker.from_environment(environ)
    if taker is None:
        return None
    want, optional = wanted(settings)
    received = taker.take(want, optional=optional)
    by_role: dict[str, list[socket.socket]] = {}
    for item in sorted(received.listeners, key=lambda item: (item.role, item.index)):
        by_role.setdefault(item.role, []).append(item.sock)
    socks = by_role.get("main", [])
    embedded = None
    try:
        if len(socks) > settings.workers:
            raise HandoverError(
                f"upgrade: workers cannot shrink on an upgrade ({len(socks)} -> {settings.workers}): the "
                "sockets given up would reset the connections queued on them; restart instead"
            )
        while len(socks) < settings.workers:  # more workers: more sockets in the same group
            socks.append(join_group(socks[0]))
        state = received.state
        theirs = state.get("embedded_redis") or {}
        if (
            theirs
            and not settings.redis_url
            and Path(theirs["directory"]) == settings.embedded_redis_dir.resolve()
        ):
            from proxy.control.embedded import EmbeddedRedis

            embedded = EmbeddedRedis.adopt(state["embedded_redis"], received.fds)
    except BaseException as exc:
        for sock in (*socks, *by_role.get("admin", []), *by_role.get("control", [])):
            sock.close()
        if isinstance(exc, HandoverError):
            taker.fail(str(exc))
        raise
    finally:
        for fd in received.fds.values():  # an owner pipe not adopted (redis_url set, another directory)
            os.close(fd)
    admin = by_role.get("admin", [None])[0]
    control = by_role.get("control", [None])[0]
    return Adopted(taker, socks, admin, control, embedded, state, received.pid, started)


def join_group(first: socket.socket) -> socket.socket:
    """One more SO_REUSEPORT socket on the address of ``first`` (a new worker's)."""
    host, port = first.getsockname()[:2]
    sock = socket.socket(first.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise HandoverError(
            f"upgrade: cannot add a listener on {shown((host, port))}: {exc.strerror or exc}"
        ) from None
    return sock
