"""``strangler serve``: the parent that owns the listening sockets and supervises the workers.

The parent binds every listener, starts the embedded Redis, then forks ``workers`` workers (one
SO_REUSEPORT socket each) and keeps every socket open for its whole life: a socket whose worker
died keeps its queue, and the next worker on it serves that queue. It imports the app's code
before forking (workers start fast and share those pages) but runs no event loop and opens no
Redis connection: its loop is ``selectors`` over the workers' readiness pipes, the control socket
and a wake-up pipe for signals.

- A worker that exits when the parent did not ask is restarted on the same socket (``restarts``).
- SIGHUP or ``strangler reload``: the same sources are read again and validated; a new generation
  of workers starts on the same sockets; when every one of them is ready the old generation is
  told to drain (SIGTERM). A new worker that fails leaves the old generation serving.
- SIGUSR2 or ``strangler upgrade``: a new parent (a new process, whatever version is installed)
  takes the sockets, the control socket and the embedded Redis over the hand-over socket
  (``upgrade.py``, ``handover.py``); once its workers are ready this one drains and exits.
- SIGINT/SIGTERM: passed once to every worker (each worker is in its own process group, so a
  terminal's Ctrl-C reaches the parent alone); a second one forces the drain, as in one process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import selectors
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.server import (
    STOP_SIGNALS,
    BackendCheck,
    configure_logging,
    listening_sockets,
    raise_open_file_limit,
    run_worker,
)
from proxy.settings import ConfigError, Settings
from proxy.supervisor.control import ControlServer, Request
from proxy.supervisor.counters import Counters, CountersCollector
from proxy.supervisor.handover import HandoverError, Listener, report_failure
from proxy.supervisor.restarts import RestartHistory, RestartPolicy
from proxy.supervisor.sources import Sources, refuse_fixed
from proxy.supervisor.upgrade import (
    Adopted,
    Launch,
    Upgrade,
    adopt,
    handover_path,
    remove_pid_file,
    write_pid_file,
)

log = logging.getLogger("strangler")

HANDLED = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR2)
READY_TIMEOUT_SECONDS = 30.0  # a new worker not ready by then: the reload (or the start) failed
EXIT_BUILD = 3  # a worker's exit status when its settings cannot run (TLS files, the app's build)
PR_SET_PDEATHSIG = 1


class StartFailed(Exception):
    """A worker of the first generation could not start: one line; ``strangler serve`` exits 2 when
    the settings cannot run (what a worker builds failed, as ``config check`` says), else 1."""

    def __init__(self, message: str, invalid: bool = False) -> None:
        super().__init__(message)
        self.invalid = invalid


def run(settings: Settings, sources: Sources | None = None) -> None:
    """Blocking: serve until SIGINT/SIGTERM, then stop what we started (``strangler serve``)."""
    from proxy.control.embedded import EmbeddedRedis

    launch = Launch.record()  # as started: an upgrade starts the new generation the same way
    configure_logging(settings.log_level)
    try:
        check_tls(settings)  # a certificate no worker could load: ConfigError, one line, exit 2
    except ConfigError as exc:
        report_failure(str(exc))  # started by an upgrade: the old generation says why
        raise
    raise_open_file_limit()
    # Stop signals are recorded from before the sockets listen (by the default action one would end
    # this process with connections queued on its sockets) and handled once the workers run. Recorded,
    # not blocked: the embedded redis-server would inherit a blocked mask and ignore its SIGTERM.
    early: list[int] = []
    for sig in HANDLED:
        signal.signal(sig, lambda signum, _frame: early.append(signum))
    backends = BackendCheck(settings)
    try:
        adopted = adopt(settings)  # started by `strangler upgrade`: the old generation's sockets
    except HandoverError as exc:
        raise StartFailed(str(exc)) from None
    try:
        socks = (
            adopted.socks if adopted else listening_sockets(settings.host, settings.port, settings.workers)
        )
        admin_sock = adopted.admin_sock if adopted else None
        if settings.admin_port is not None and admin_sock is None:
            try:
                admin_sock = listening_sockets(settings.host, settings.admin_port or 0, 1, "admin_port")[0]
            except OSError:
                for sock in socks:
                    sock.close()
                raise
    except BaseException as exc:
        if adopted is not None:
            adopted.fail(one_line(exc))
        raise
    backends.report()
    import uvloop  # noqa: F401 - imported once here (no loop made): every worker starts with them loaded

    import proxy.app  # noqa: F401

    loaded = settings
    embedded: EmbeddedRedis | None = adopted.embedded if adopted else None
    metrics_dir: str | None = None
    supervisor: Supervisor | None = None
    try:
        if embedded is not None and adopted is not None:
            print(f"strangler: embedded Redis at {embedded.url} (data in {embedded.directory}; "
                  f"taken over from pid {adopted.old_pid})", flush=True)  # fmt: skip
        elif not settings.redis_url:
            embedded = EmbeddedRedis(settings.embedded_redis_dir, settings.embedded_redis_port)
            url = embedded.start()
            print(f"strangler: embedded Redis at {url} (data in {embedded.directory})", flush=True)
            hint = f"redis-cli -u {url} SET {settings.split_key} 10"
            print(f"strangler: change the split with `{hint}`", flush=True)
        settings = derive(settings, embedded)
        if loaded.admin_token is None:
            where = settings.admin_token_file
            print(f"strangler: admin token in {where} (the local CLI reads it)", flush=True)
        if settings.workers > 1:  # every worker's metrics summed at each scrape
            metrics_dir = tempfile.mkdtemp(prefix="strangler-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        supervisor = Supervisor(loaded, settings, sources or Sources(), socks, admin_sock, embedded)
        supervisor.signals = early
        supervisor.launch, supervisor.adopted = launch, adopted
        supervisor.run()
    except BaseException as exc:
        if adopted is not None and not adopted.done:  # the old generation keeps serving, and says why
            adopted.fail(one_line(exc))
        raise
    finally:
        for sock in [*socks, *([admin_sock] if admin_sock else [])]:
            sock.close()
        if embedded is not None:
            if supervisor is not None and supervisor.upgraded:
                embedded.release()  # the new generation owns it now
            else:
                embedded.stop()
        remove_pid_file(settings.control_socket)
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def derive(settings: Settings, embedded: Any) -> Settings:
    """The settings a worker runs with: the embedded Redis's URL when none is configured, the
    generated admin token when none is given (as at start, for every generation)."""
    from proxy.admin.token import ensure_admin_token

    if not settings.redis_url and embedded is not None:
        settings = settings.model_copy(update={"redis_url": embedded.url})
    if settings.admin_token is None:
        settings = ensure_admin_token(settings)
    return settings


def set_parent_death_signal() -> None:
    """Linux: SIGTERM this process when its parent dies (a SIGKILLed parent leaves no worker behind)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        with contextlib.suppress(ValueError):
            return f"killed by signal {number} ({signal.Signals(number).name})"
        return f"killed by signal {number}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


@dataclass
class Worker:
    slot: int
    generation: int
    pid: int
    fd: int  # the read end of its readiness pipe (-1 once closed)
    started: float
    state: str = "starting"  # starting, ready, draining (told to stop), failed
    buffer: bytes = b""
    reason: str = ""  # why it failed to start, as it told us


@dataclass
class Slot:
    """One place in the group: a listening socket, the worker on it, its restart history."""

    index: int
    sock: socket.socket | None
    history: RestartHistory = field(default_factory=RestartHistory)
    pid: int | None = None  # the current generation's worker on this socket
    restart_at: float | None = None  # a restart waiting for its backoff
    restarts: int = 0
    closed_for_loop: bool = False  # the socket was closed while the slot is in a crash loop


@dataclass
class Reload:
    generation: int
    loaded: Settings
    settings: Settings
    started: float
    deadline: float
    waiters: list[Request]
    pids: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(
        self, loaded: Settings, settings: Settings, sources: Sources, socks: list[socket.socket],
        admin_sock: socket.socket | None, embedded: Any = None, policy: RestartPolicy | None = None,
    ) -> None:  # fmt: skip
        self.loaded = loaded  # as read from the sources (compared with a reload's)
        self.settings = settings  # as the current generation's workers run it
        self.sources = sources
        self.embedded = embedded
        self.admin_sock = admin_sock
        self.policy = policy or RestartPolicy()
        self.slots = [Slot(i, sock, RestartHistory(self.policy)) for i, sock in enumerate(socks)]
        self.port = socks[0].getsockname()[1]
        self.workers: dict[int, Worker] = {}
        self.generation = 1
        self.counters = Counters(len(self.slots))
        self.counters.generation(1)
        self.selector = selectors.DefaultSelector()
        self.signals: list[int] = []
        self.stopping = 0  # stop signals received
        self.ready_announced = False
        self.reload: Reload | None = None
        self.control: ControlServer | None = None
        self.ready_line = ""
        self.failure: str | None = None  # a first-generation worker that could not start
        self.failure_invalid = False  # ... because its settings cannot run
        self.start_deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        self.pid = os.getpid()
        self.launch: Launch | None = None  # how serve was started (None: no upgrade possible)
        self.adopted: Adopted | None = None  # what an upgrade handed to this parent, until it is ready
        self.upgrade: Upgrade | None = None  # an upgrade this parent runs (the old generation's side)
        self.upgrade_fd = -1
        self.upgrade_waiters: list[Request] = []
        self.upgraded = False  # handed over: drain, exit, leave the control socket and Redis running
        self.stopping_new: list[tuple[Any, float]] = []  # failed new generations: (process, kill at)

    # --- the loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake = (wake_r, wake_w)
        self.selector.register(wake_r, selectors.EVENT_READ, "wake")
        previous_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        for sig in HANDLED:
            signal.signal(sig, self._on_signal)
        if self.adopted is not None:
            self.counters.carry(self.adopted.state.get("counters") or {})
        handlers: dict[str, Callable[[Request], None]] = {
            "reload": self._reload_request, "status": self._status, "upgrade": self._upgrade_request,
        }  # fmt: skip
        try:
            handed = self.adopted.control_sock if self.adopted else None
            self.control = ControlServer(self.settings.control_socket, handlers, sock=handed)
            self.selector.register(self.control.sock, selectors.EVENT_READ, "control")
        except OSError as exc:  # never fatal: serving matters more than reloading
            log.warning("no control socket at %s (strangler reload will not reach this proxy): %s",
                        self.settings.control_socket, exc)  # fmt: skip
        for slot in self.slots:
            self._spawn(slot, self.settings, self.generation)
        self.start_deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        try:
            self._loop()
        finally:
            signal.set_wakeup_fd(previous_wakeup)  # the handlers stay: a late signal is recorded, no more
            if self.upgrade is not None:
                self._upgrade_done(None, "the proxy is stopping")
            if self.control is not None:
                self.control.close(handed_over=self.upgraded)
            self.selector.close()
            wake_r.close()
            wake_w.close()
        if self.failure is not None:
            raise StartFailed(self.failure, self.failure_invalid)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signals.append(signum)

    def _loop(self) -> None:
        while True:
            self._handle_signals()
            self._reap()
            now = time.monotonic()
            self._timers(now)
            if self.stopping and not self.workers:
                return
            timeout = self._next_timer(now)
            for key, _ in self.selector.select(timeout):
                self._event(key)

    def _next_timer(self, now: float) -> float:
        times = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        if self.reload is not None:
            times.append(self.reload.deadline)
        if not self.ready_announced and not self.stopping:
            times.append(self.start_deadline)
        if self.upgrade is not None or self.stopping_new:
            times.append(now + 0.1)  # the new process may exit: noticed by poll()
        if any(self.counters.looping(slot.index) for slot in self.slots):
            times.append(now + 1.0)
        return max(0.0, min(times) - now) if times else 5.0

    def _event(self, key: selectors.SelectorKey) -> None:
        if key.data == "wake":
            with contextlib.suppress(OSError):
                while self._wake[0].recv(4096):
                    pass
        elif key.data == "control":
            assert self.control is not None
            conn = self.control.accept()
            if conn is not None:
                self.selector.register(conn, selectors.EVENT_READ, ("request", conn.fileno()))
        elif isinstance(key.data, tuple) and key.data[0] == "request":
            assert self.control is not None
            fd = key.data[1]
            if fd in self.control.requests:
                conn = self.control.requests[fd].conn
                done = False
                try:
                    done = self.control.readable(fd)
                finally:
                    if done:
                        self.selector.unregister(conn)
        elif key.data == "upgrade":
            self._upgrade_step()
        elif isinstance(key.data, Worker):
            self._worker_said(key.data)

    # --- signals ------------------------------------------------------------------------------------

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGCHLD:
                continue  # _reap runs each turn
            if signum == signal.SIGHUP:
                if not self.stopping:
                    self._start_reload(None)
                continue
            if signum == signal.SIGUSR2:
                self._start_upgrade(None)
                continue
            self.stopping += 1
            if self.stopping == 1:
                log.info("stopping: draining %d worker(s)", len(self.workers))
                for slot in self.slots:
                    slot.restart_at = None
                if self.reload is not None:
                    self._reload_done("failed", "the proxy is stopping", keep_new=True)
                if self.upgrade is not None:
                    self._upgrade_done(None, "the proxy is stopping")
            for worker in self.workers.values():  # once per signal received: a second one forces
                self._kill(worker.pid, signum)
                worker.state = "draining"
            self._close_listeners()

    def _close_listeners(self) -> None:
        """At a stop: the parent's copies of the listening sockets go now, so that a socket closes
        when its worker's drain closes it (new connections are refused, not queued for nobody)."""
        for slot in self.slots:
            if slot.sock is not None:
                slot.sock.close()
                slot.sock = None
        if self.admin_sock is not None:
            self.admin_sock.close()

    @staticmethod
    def _kill(pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    # --- workers ------------------------------------------------------------------------------------

    def _spawn(self, slot: Slot, settings: Settings, generation: int) -> Worker:
        if slot.sock is None:
            slot.sock = reuse_port_socket(settings.host, self.port)
            slot.closed_for_loop = False
        read_fd, write_fd = os.pipe()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
            if pid == 0:  # the worker: never returns
                os.close(read_fd)
                self._become_worker(slot, settings, write_fd)
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        worker = Worker(slot.index, generation, pid, read_fd, time.monotonic())
        self.workers[pid] = worker
        self.selector.register(read_fd, selectors.EVENT_READ, worker)
        if generation == self.generation:
            slot.pid = pid
        return worker

    def _become_worker(self, slot: Slot, settings: Settings, write_fd: int) -> None:
        code = 1
        try:
            code = worker_main(self, slot, settings, write_fd)
        except BaseException as exc:  # noqa: BLE001 - never back into the parent's code
            with contextlib.suppress(BaseException):
                tell(write_fd, "failed", one_line(exc))
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _worker_said(self, worker: Worker) -> None:
        try:
            data = os.read(worker.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        worker.buffer += data
        while b"\n" in worker.buffer:
            line, worker.buffer = worker.buffer.split(b"\n", 1)
            kind, _, text = line.decode(errors="replace").partition(" ")
            if kind == "ready" and worker.state == "starting":
                worker.state = "ready"
                self.ready_line = text or self.ready_line
                self._became_ready(worker)
            elif kind in ("invalid", "failed"):
                worker.reason = text
                worker.state = "failed" if worker.state == "starting" else worker.state
                if kind == "invalid":
                    worker.reason = "invalid: " + text
        if not data:
            self._close_pipe(worker)

    def _close_pipe(self, worker: Worker) -> None:
        if worker.fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(worker.fd)
            os.close(worker.fd)
            worker.fd = -1

    def _became_ready(self, worker: Worker) -> None:
        if not self.ready_announced and worker.generation == 1:
            first = [w for w in self.workers.values() if w.generation == 1]
            if all(w.state == "ready" for w in first) and len(first) == len(self.slots):
                self.ready_announced = True
                log.info("%s", self.ready_line)
                if self.settings.workers > 1:
                    log.info("%d workers ready on port %d", len(first), self.port)
                if self.adopted is not None:
                    self._took_over(self.adopted, len(first))
                write_pid_file(self.settings.control_socket)
        if self.reload is not None and worker.pid in self.reload.pids:
            news = [self.workers.get(pid) for pid in self.reload.pids]
            if all(w is not None and w.state == "ready" for w in news):
                self._reload_done("ok", "")

    def _reap(self) -> None:
        """Our workers that ended (only theirs: the embedded Redis is its owner's to wait for)."""
        for pid in list(self.workers):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            worker = self.workers.pop(pid)
            if worker.fd >= 0:  # what it wrote before it died (its reason) is still in the pipe
                self._worker_said(worker)
                self._close_pipe(worker)
            self._mark_dead(pid)
            self._exited(worker, status)

    @staticmethod
    def _mark_dead(pid: int) -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            with contextlib.suppress(Exception):
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(pid)

    def _exited(self, worker: Worker, status: int) -> None:
        how = describe_status(status)
        slot = self.slots[worker.slot]
        if self.reload is not None and worker.pid in self.reload.pids:  # a new worker that failed
            if worker.reason.startswith("invalid: "):
                self._reload_done("invalid", worker.reason)
            else:
                reason = worker.reason or f"{how} before it was ready"
                self._reload_done("failed", f"worker {worker.slot} did not start: {reason}")
            return
        if worker.state == "draining" or self.stopping:  # told to stop: an old generation, or all
            log.debug("worker %d (pid %d, generation %d) %s", worker.slot, worker.pid, worker.generation, how)
            return
        if slot.pid != worker.pid:
            return  # a worker of an older generation
        slot.pid = None
        if not self.ready_announced and worker.generation == 1 and not os.WIFSIGNALED(status):
            # the start itself failed (a worker killed from outside meanwhile is restarted below)
            self.failure_invalid = worker.reason.startswith("invalid: ")
            reason = worker.reason.removeprefix("invalid: ") or how
            self.failure = f"worker {worker.slot} did not start: {reason}"
            self._stop_all()
            return
        now = time.monotonic()
        decision = slot.history.died(now, now - worker.started)
        if decision.crash_loop:
            self.counters.crash_loop(slot.index, True)
            log.error(
                "worker %d is in a crash loop: %s (pid %d), %d deaths within %g s, restarted %d times; "
                "next attempt in %g s%s", slot.index, how, worker.pid, decision.deaths,
                self.policy.loop_window, slot.restarts, decision.delay,
                f": {worker.reason}" if worker.reason else "",
            )  # fmt: skip
            others = [s for s in self.slots if s is not slot and s.pid is not None]
            if decision.delay > 0 and others and slot.sock is not None:
                # its queue would wait out the backoff: the live workers take every new connection
                slot.sock.close()
                slot.sock = None
                slot.closed_for_loop = True
        else:
            log.warning("worker %d (pid %d) %s; restarting it%s", slot.index, worker.pid, how,
                        f" in {decision.delay:g} s" if decision.delay else "")  # fmt: skip
        slot.restart_at = now + decision.delay

    def _stop_all(self) -> None:
        self.stopping = max(self.stopping, 1)
        for slot in self.slots:
            slot.restart_at = None
        for worker in self.workers.values():
            self._kill(worker.pid, signal.SIGTERM)
            worker.state = "draining"
        self._close_listeners()

    def _timers(self, now: float) -> None:
        for process, kill_at in list(self.stopping_new):  # a failed new generation, told to stop
            if process.poll() is not None:
                self.stopping_new.remove((process, kill_at))
            elif now >= kill_at:
                process.kill()
        if self.upgrade is not None:
            try:
                self.upgrade.expired(now)
            except HandoverError as exc:
                self._upgrade_done(None, str(exc))
        if self.stopping:
            return
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now:
                slot.restart_at = None
                try:
                    self._spawn(slot, self.settings, self.generation)
                except OSError as exc:  # no socket or no fork now (the port taken, no memory): later
                    slot.restart_at = now + self.policy.cap
                    log.error("worker %d cannot be restarted (%s); next attempt in %g s",
                              slot.index, exc.strerror or exc, self.policy.cap)  # fmt: skip
                    continue
                slot.restarts += 1
                self.counters.restarted(slot.index)
            if self.counters.looping(slot.index) and not slot.history.in_crash_loop(now):
                self.counters.crash_loop(slot.index, False)
                log.info("worker %d is out of its crash loop", slot.index)
        if self.reload is not None and now >= self.reload.deadline:
            news = [self.workers.get(pid) for pid in self.reload.pids]
            late = [w.slot for w in news if w is not None and w.state != "ready"]
            self._reload_done(
                "failed", f"worker {late[0] if late else 0} not ready within {READY_TIMEOUT_SECONDS:g} s"
            )
        if not self.ready_announced and now >= self.start_deadline and self.failure is None:
            self.failure = f"the workers were not ready within {READY_TIMEOUT_SECONDS:g} s"
            self._stop_all()

    # --- reload -----------------------------------------------------------------------------------------

    def _reload_request(self, request: Request) -> None:
        if self.stopping:
            request.answer({"ok": False, "result": "failed", "error": "reload: the proxy is stopping"})
            return
        self._start_reload(request)

    def _start_reload(self, request: Request | None) -> None:
        if self.upgrade is not None or self.upgraded:  # the new generation reads the sources anew
            log.error("reload refused: an upgrade is in progress")
            if request is not None:
                request.answer(
                    {"ok": False, "result": "failed", "error": "reload: an upgrade is in progress"}
                )
            return
        if self.reload is not None:  # the one in progress answers this caller too
            if request is not None:
                self.reload.waiters.append(request)
            return
        try:
            loaded = self.sources.load()
            refuse_fixed(self.loaded, loaded)
            settings = derive(loaded, self.embedded)
        except ConfigError as exc:
            self.counters.reloaded("invalid")
            log.error("reload refused, nothing changed: %s", exc)
            if request is not None:
                request.answer({"ok": False, "result": "invalid", "error": str(exc)})
            return
        generation = self.generation + 1
        now = time.monotonic()
        self.reload = Reload(generation, loaded, settings, now, now + READY_TIMEOUT_SECONDS,
                             [request] if request else [])  # fmt: skip
        for slot in self.slots:
            slot.restart_at = None  # the new generation takes this place now
            try:
                self.reload.pids.append(self._spawn(slot, settings, generation).pid)
            except OSError as exc:
                self._reload_done("failed", f"worker {slot.index} did not start: {exc.strerror or exc}")
                return

    def _reload_done(self, result: str, reason: str, keep_new: bool = False) -> None:
        reload = self.reload
        assert reload is not None
        self.reload = None
        seconds = time.monotonic() - reload.started
        news = [self.workers[pid] for pid in reload.pids if pid in self.workers]
        if result == "ok":
            olds = [w for w in self.workers.values() if w.generation < reload.generation]
            for worker in olds:  # the old generation drains: the existing graceful stop
                if worker.state != "draining":
                    worker.state = "draining"
                    self._kill(worker.pid, signal.SIGTERM)
            self.generation = reload.generation
            self.counters.generation(self.generation)
            self.settings, self.loaded = reload.settings, reload.loaded
            for worker in news:
                self.slots[worker.slot].pid = worker.pid
            for slot in self.slots:
                self.counters.crash_loop(slot.index, False)
            log.info(
                "reloaded: generation %d, %d worker%s ready in %.2f s; generation %d drains",
                self.generation, len(news), "s" if len(news) != 1 else "", seconds, self.generation - 1,
            )  # fmt: skip
            answer: dict[str, Any] = {
                "ok": True, "result": "ok", "generation": self.generation, "workers": len(news),
                "seconds": round(seconds, 3),
            }  # fmt: skip
        else:
            if not keep_new:
                for worker in news:  # any that already accepted connections finishes them
                    worker.state = "draining"
                    self._kill(worker.pid, signal.SIGTERM)
            reason = reason.removeprefix("invalid: ") if result == "invalid" else reason
            log.error("reload failed, generation %d keeps serving: %s", self.generation, reason)
            answer = {"ok": False, "result": result, "error": reason, "generation": self.generation}
            # a slot whose old worker died meanwhile gets its restart back
            for slot in self.slots:
                if slot.pid is None or slot.pid not in self.workers:
                    slot.pid = None
                    if not self.stopping:
                        slot.restart_at = time.monotonic()
        self.counters.reloaded(result)
        for request in reload.waiters:
            request.answer(answer)

    # --- upgrade ------------------------------------------------------------------------------------

    def _upgrade_request(self, request: Request) -> None:
        self._start_upgrade(request)

    def _start_upgrade(self, request: Request | None) -> None:
        """Start a new generation of the whole proxy and hand it the sockets (``upgrade.py``)."""
        if self.upgrade is not None:  # the one in progress answers this caller too
            if request is not None:
                self.upgrade_waiters.append(request)
            return
        refusal = None
        if self.stopping or self.upgraded:
            refusal = "the proxy is stopping"
        elif not self.ready_announced or self.adopted is not None:
            refusal = "the proxy is still starting"
        elif self.reload is not None:
            refusal = "a reload is in progress; try again when it is done"
        elif self.launch is None:
            refusal = "this proxy was not started by strangler serve"
        listeners = [Listener("main", slot.index, slot.sock) for slot in self.slots if slot.sock is not None]
        if self.admin_sock is not None:
            listeners.append(Listener("admin", 0, self.admin_sock))
        if self.control is not None:
            listeners.append(Listener("control", 0, self.control.sock))
        embedded = self.embedded
        state = {
            "generation": self.generation, "counters": self.counters.export(),
            "embedded_redis": embedded.handover_state() if embedded is not None else None,
        }  # fmt: skip
        if refusal is None:
            assert self.launch is not None
            try:
                self.upgrade = Upgrade(
                    self.launch, handover_path(self.settings.control_socket), listeners, state,
                    embedded.handover_fds() if embedded is not None else {},
                    self.settings.drain_timeout_seconds,
                )  # fmt: skip
            except (HandoverError, OSError) as exc:
                refusal = str(exc)
        if refusal is not None or self.upgrade is None:
            self.counters.upgraded("failed")
            log.error("upgrade refused: %s", refusal)
            if request is not None:
                request.answer({"ok": False, "result": "failed", "error": refusal, "old_pid": self.pid})
            return
        self.upgrade_waiters = [request] if request is not None else []
        self._watch_upgrade()
        log.info("upgrade: started the new generation, pid %d", self.upgrade.pid)

    def _watch_upgrade(self) -> None:
        upgrade = self.upgrade
        fd = upgrade.fileno() if upgrade is not None else -1
        if fd == self.upgrade_fd:
            return
        if self.upgrade_fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.upgrade_fd)
        self.upgrade_fd = fd
        if fd >= 0:
            self.selector.register(fd, selectors.EVENT_READ, "upgrade")

    def _upgrade_step(self) -> None:
        upgrade = self.upgrade
        if upgrade is None:
            return
        try:
            ready = upgrade.step()
        except HandoverError as exc:
            self._upgrade_done(None, str(exc))
            return
        if ready:
            self._upgrade_done(upgrade.commit(), "")
        else:
            self._watch_upgrade()

    def _upgrade_done(self, answer: dict[str, Any] | None, reason: str) -> None:
        upgrade = self.upgrade
        assert upgrade is not None
        self.upgrade = None
        self._watch_upgrade()
        if answer is None:
            process = upgrade.abort()
            if process is not None:  # its parent drains what its workers accepted, then exits
                self.stopping_new.append(
                    (process, time.monotonic() + self.settings.drain_timeout_seconds + 5)
                )
            self.counters.upgraded("failed")
            log.error("upgrade failed, pid %d keeps serving: %s", self.pid, reason)
            answer = {
                "ok": False,
                "result": "failed",
                "error": reason,
                "old_pid": self.pid,
                "new_pid": upgrade.pid,
            }
        else:
            self.counters.upgraded("ok")
            self.upgraded = True
            log.info(
                "upgraded: pid %d -> %d, %d worker%s ready in %.1f s; this generation drains (up to %g s)",
                self.pid, upgrade.pid, answer["workers"], "s" if answer["workers"] != 1 else "",
                answer["seconds"], self.settings.drain_timeout_seconds,
            )  # fmt: skip
            if self.control is not None:  # the new parent answers there now
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(self.control.sock)
                for fd in list(self.control.requests):
                    with contextlib.suppress(KeyError, ValueError):
                        self.selector.unregister(self.control.requests[fd].conn)
                self.control.close(handed_over=True)
                self.control = None
            if self.reload is not None:
                self._reload_done("failed", "the proxy was upgraded", keep_new=True)
            self._stop_all()
        waiters, self.upgrade_waiters = self.upgrade_waiters, []
        for request in waiters:
            request.answer(answer)

    def _took_over(self, adopted: Adopted, workers: int) -> None:
        """The new generation's workers are ready: the old one drains from now on."""
        self.adopted = None
        try:
            adopted.ready(workers)
        except HandoverError as exc:  # the old parent did not confirm (gone?): we hold the sockets
            log.warning("upgrade: %s; serving anyway", exc)
        else:
            self.counters.upgraded("ok")
        log.info(
            "took over from pid %d: %d worker%s ready", adopted.old_pid, workers, "s" if workers != 1 else ""
        )

    def _status(self, request: Request) -> None:
        request.answer({
            "ok": True,
            "generation": self.generation,
            "reloading": self.reload is not None,
            "workers": [
                {"slot": w.slot, "pid": w.pid, "generation": w.generation, "state": w.state,
                 "restarts": self.slots[w.slot].restarts}
                for w in sorted(self.workers.values(), key=lambda w: (w.generation, w.slot))
            ],
            "crash_loop": [s.index for s in self.slots if self.counters.looping(s.index)],
        })  # fmt: skip


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A new listening socket joining the group on ``port`` (after a crash loop closed a slot's)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def tell(fd: int, kind: str, text: str) -> None:
    os.write(fd, f"{kind} {' '.join(text.split())}\n".encode())


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, ConfigError | OSError):
        return text or repr(exc)
    return f"{type(exc).__name__}: {text}"


def check_tls(settings: Settings) -> None:
    """The certificate and key load (as the worker's listener will load them), or ConfigError."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            str(settings.tls_cert_file), str(settings.tls_key_file)
        )
    except (OSError, ssl.SSLError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        problem = f"cannot load {settings.tls_cert_file} with {settings.tls_key_file}: {problem}"
        raise ConfigError(problem, None, "tls_cert_file") from None


def worker_main(sup: Supervisor, slot: Slot, settings: Settings, write_fd: int) -> int:
    """In the forked worker: keep only what is ours, build the app, serve; the exit status."""
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the parent only, which passes one signal on
    set_parent_death_signal()
    if os.getppid() != sup.pid:  # the parent died before the death signal was set
        return 1
    signal.set_wakeup_fd(-1)
    early_stops: list[int] = []

    def remember(signum: int, _frame: Any) -> None:
        early_stops.append(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, remember)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the parent reloads; a worker's own SIGHUP is harmless
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # the parent upgrades
    # Not ours: a sibling's socket held open here would outlive that sibling; the parent's control
    # socket, its loop and the other workers' pipes belong to the parent.
    mine = slot.sock
    for other in sup.slots:
        if other.sock is not None and other.sock is not mine:
            other.sock.close()
    if sup.control is not None:
        for request in sup.control.requests.values():
            request.conn.close()
        sup.control.sock.close()
    for worker in sup.workers.values():
        if worker.fd >= 0:
            os.close(worker.fd)
    for end in sup._wake:
        end.close()
    if sup.upgrade is not None:
        sup.upgrade.offer.forget()
    if sup.adopted is not None:
        sup.adopted.taker.close()
    sup.selector.close()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
    logging.getLogger().setLevel(settings.log_level.upper())

    from proxy.app import create_app
    from proxy.metrics import Metrics

    try:
        check_tls(settings)
        metrics = Metrics()
        metrics.add_collector(CountersCollector(sup.counters))
        app = create_app(settings, metrics)
    except Exception as exc:  # noqa: BLE001 - settings that parse but cannot run: one line
        tell(write_fd, "invalid", one_line(exc))
        return EXIT_BUILD
    app.announce_ready = False

    def ready(started: Any) -> None:
        tell(write_fd, "ready", started.ready_line())

    try:
        run_worker(settings, mine, early_stops, admin_sock=sup.admin_sock, app=app, on_ready=ready)
    except Exception as exc:  # noqa: BLE001 - told to the parent in one line
        tell(write_fd, "failed", one_line(exc))
        return 1
    return 0
