"""Run one session through the proxy over a raw socket, parse what comes back with h11, and compare
it with what the scripted backend received and produced.

The client: a writer thread sends the requests (after the previous answer, or all at once when
pipelined; pauses and disconnects where the session says), the calling thread reads and parses the
answers. Both use short socket timeouts so either can stop the other; only the reader closes the
socket (a close from one thread under a blocking call in another would leave the socket open).

The documented differences between what the backend wrote and what the client gets, and between
what the client wrote and what the backend gets, are listed once below (README "Failure semantics",
docs/security.md, proxy/traffic/forward.py, proxy/edge/client.py): everything else must be equal.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import h11

from tests.differential.backend import Delivery, ScriptedBackend
from tests.differential.spec import (
    Request,
    Session,
    answer_body,
    answer_headers,
    has_body,
    request_body,
    request_bytes,
)

# --- the documented changes, in one place ----------------------------------------------------------
# hop-by-hop fields (proxy/edge/headers.py HOP_BY_HOP) and any field named in Connection never pass
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
                        "expect", "http2-settings"})  # fmt: skip
# request: Host is passed on (preserve_host, the default); the framing is the proxy's own (a
# canonical Content-Length, or chunked for a large body of unknown length); the X-Strangler-*
# markers (the force header among them) are dropped; X-Forwarded-For is appended to (the client's
# value, then the peer), X-Forwarded-Proto and X-Forwarded-Host are set, X-Request-ID is passed on
# (1-200 bytes) or generated
REQUEST_SET_BY_PROXY = frozenset({"content-length", "transfer-encoding", "x-forwarded-for",
                                  "x-forwarded-proto", "x-forwarded-host", "x-request-id"})  # fmt: skip
# answer: the backend's X-Api-Version is replaced by the version that served it; the framing is
# the proxy's own (the backend's Content-Length passed on when it sent one; else Content-Length
# for a body read whole, chunked when streamed); Connection: close is the proxy's to say; 1xx
# interim answers of the backend are not relayed (the proxy sends its own 100 Continue to a client
# that asked for one)
ANSWER_SET_BY_PROXY = frozenset({"content-length", "transfer-encoding", "connection", "x-api-version"})
# a backend that closes without answering: the proxy may send the request again once, on a new
# connection, only when its method is idempotent (RFC 9110 9.2.2: a POST must never apply twice)
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})

SESSION_TIMEOUT = 5.0  # a session that makes no progress for this long hangs: a finding
POLL = 0.02  # socket timeout: how often each side looks at the other's flags


@dataclass
class Answered:
    """What the client got for one request."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    interim: list[int] = field(default_factory=list)
    complete: bool = False


@dataclass
class Outcome:
    answers: list[Answered | None]
    closed_by_proxy_after: int | None = None  # the answer that said Connection: close
    disconnected_at: int | None = None  # the client's disconnect, at this request
    error: str | None = None  # what the client's h11 refused, or a hang
    sent: list[int] = field(default_factory=list)  # request bytes sent, per request
    seconds: float = 0.0


class Registry:
    """Every request the harness ever sent, by id: a delivery is checked against its own request,
    whichever session is running when it arrives."""

    def __init__(self) -> None:
        self.requests: dict[str, tuple[Request, str]] = {}  # id -> (request, target)
        self.delivered: Counter[str] = Counter()
        # ids the client gave up on (it disconnected before their answer): they may still reach
        # the backend after their session (a pipelined request the proxy had read), at most once
        self.abandoned: set[str] = set()


def ids_for(run: str, number: int, session: Session) -> list[str]:
    return [f"{run}-{number}-{i}" for i in range(len(session.requests))]


def target_for(diff_id: str, index: int) -> str:
    return f"/d/{diff_id}?i={index}&x=%41b"


def run_session(port: int, session: Session, ids: list[str]) -> Outcome:
    n = len(session.requests)
    wire = [request_bytes(r, ids[i], target_for(ids[i], i), i == n - 1, session.close_last)
            for i, r in enumerate(session.requests)]  # fmt: skip
    outcome = Outcome(answers=[None] * n, sent=[0] * n)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(POLL)
    stop = threading.Event()
    disconnect_now = threading.Event()
    answered = [threading.Event() for _ in range(n)]
    started = time.monotonic()

    def send(data: bytes, index: int) -> bool:
        view = memoryview(data)
        while view:
            if stop.is_set():
                return False
            try:
                sent = sock.send(view[:262144])
            except TimeoutError:
                continue
            except OSError:
                return False
            outcome.sent[index] += sent
            view = view[sent:]
        return True

    def writer() -> None:
        for i, request in enumerate(session.requests):
            if not session.pipelined and i > 0:
                while not answered[i - 1].wait(POLL):
                    if stop.is_set():
                        return
            data = wire[i]
            cut = len(data)
            if session.disconnect and session.disconnect[0] == "send" and session.disconnect[1] == i:
                cut = min(len(data) - 1, int(len(data) * session.disconnect[2]))
            pause = request.pause_at if request.pause_ms and request.pause_at is not None else None
            if pause is not None and pause < cut:
                if not send(data[:pause], i):
                    return
                time.sleep(request.pause_ms / 1000)
                if not send(data[pause:cut], i):
                    return
            elif not send(data[:cut], i):
                return
            if cut < len(data):
                outcome.disconnected_at = i
                disconnect_now.set()
                return

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    conn = h11.Connection(h11.CLIENT)
    last_progress = time.monotonic()
    eof = False
    reset = bool(session.disconnect and session.disconnect[3])
    try:
        for i, request in enumerate(session.requests):
            # tell h11 what we sent (its bytes are dropped): the method decides whether a body follows
            body_follows = has_body(request)
            conn.send(h11.Request(method=request.method, target=target_for(ids[i], i),
                                  headers=[("host", "diff.test")] + ([("transfer-encoding", "chunked")]
                                                                       if body_follows else [])))  # fmt: skip
            conn.send(h11.EndOfMessage())
            got: Answered | None = None
            recv_cut = None
            if session.disconnect and session.disconnect[0] == "recv" and session.disconnect[1] == i:
                recv_cut = session.disconnect[2]
            pause = session.read_pause if session.read_pause and session.read_pause[0] == i else None
            body = bytearray()
            interim: list[int] = []
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    if not eof:  # a close mid-answer is for the oracle to judge, not a parse error
                        outcome.error = f"request {i}: h11 refused the proxy's answer: {exc}"
                    return outcome
                if event is h11.NEED_DATA:
                    if disconnect_now.is_set():
                        return outcome
                    try:
                        data = sock.recv(session.read_size)
                    except TimeoutError:
                        if time.monotonic() - last_progress > SESSION_TIMEOUT:
                            outcome.error = f"request {i}: no progress for {SESSION_TIMEOUT} s (hang)"
                            if got is not None:
                                outcome.answers[i] = got
                            return outcome
                        continue
                    except OSError:
                        data = b""
                    eof = not data
                    last_progress = time.monotonic()
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.InformationalResponse):
                    interim.append(event.status_code)
                elif isinstance(event, h11.Response):
                    got = Answered(event.status_code,
                                   [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
                                   b"", interim)  # fmt: skip
                    outcome.answers[i] = got
                elif isinstance(event, h11.Data):
                    body += event.data
                    assert got is not None
                    got.body = bytes(body)
                    if pause is not None and len(body) >= pause[1]:
                        time.sleep(pause[2] / 1000)
                        pause = None
                    if recv_cut is not None and got is not None:
                        expected = answer_body(ids[i], request.answer.size)
                        if len(body) >= int(len(expected) * recv_cut):
                            outcome.disconnected_at = i
                            return outcome
                elif isinstance(event, h11.EndOfMessage):
                    assert got is not None
                    got.body = bytes(body)
                    got.complete = True
                    answered[i].set()
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return outcome
                else:  # pragma: no cover - h11 has no other events here
                    outcome.error = f"request {i}: unexpected {event!r}"
                    return outcome
            if recv_cut is not None:
                outcome.disconnected_at = i  # the answer ended before the cut point: leave now
                return outcome
            if conn.their_state is h11.MUST_CLOSE:
                outcome.closed_by_proxy_after = i
                return outcome
            conn.start_next_cycle()
        return outcome
    finally:
        stop.set()
        thread.join(5)
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        outcome.seconds = time.monotonic() - started


# --- the oracle ------------------------------------------------------------------------------------


def check_delivery(delivery: Delivery, registry: Registry) -> list[str]:
    """One request as the backend received it, against what the client sent for that id."""
    diff_id = delivery.diff_id or ""
    found = registry.requests.get(diff_id)
    where = f"backend got {delivery.method} {delivery.target} (id {diff_id}) on {delivery.version}"
    if found is None:
        return [f"{where}: no client sent this id"]
    request, target = found
    problems = []
    registry.delivered[diff_id] += 1
    allowed = 2 if request.answer.drop and request.method in IDEMPOTENT else 1
    if registry.delivered[diff_id] > allowed:
        problems.append(f"{where}: delivered {registry.delivered[diff_id]} times (must be once)")
    if delivery.method != request.method:
        problems.append(f"{where}: method {delivery.method}, client sent {request.method}")
    if delivery.target != target:
        problems.append(f"{where}: target {delivery.target!r}, client sent {target!r}")
    if delivery.version != request.version:
        problems.append(f"{where}: forced to {request.version}, reached {delivery.version}")
    headers = delivery.headers
    sent = _client_headers(request, diff_id)
    named = {
        part.strip().lower() for name, value in sent if name == "connection" for part in value.split(",")
    }
    expected = [(k, v) for k, v in sent if k not in HOP_BY_HOP and k not in named
                and k not in REQUEST_SET_BY_PROXY and not k.startswith("x-strangler-")]  # fmt: skip
    actual = [(k, v) for k, v in headers if k not in REQUEST_SET_BY_PROXY]
    if actual != expected:
        problems.append(f"{where}: headers {actual}, expected {expected}")
    values = {k: [v for n, v in headers if n == k] for k in REQUEST_SET_BY_PROXY}
    xff = "10.1.2.3, 127.0.0.1" if request.forwarded else "127.0.0.1"
    if values["x-forwarded-for"] != [xff]:
        problems.append(f"{where}: x-forwarded-for {values['x-forwarded-for']}, expected [{xff!r}]")
    if values["x-forwarded-proto"] != ["http"] or values["x-forwarded-host"] != ["diff.test"]:
        problems.append(
            f"{where}: x-forwarded-proto/host {values['x-forwarded-proto']} {values['x-forwarded-host']}"
        )
    rid = values["x-request-id"]
    if len(rid) != 1 or (request.forwarded and rid != [f"rid-{diff_id}"]):
        problems.append(f"{where}: x-request-id {rid}")
    if len(values["content-length"]) + len(values["transfer-encoding"]) > 1:
        problems.append(f"{where}: framing {values['content-length']} {values['transfer-encoding']}")
    body = request_body(diff_id, request.size) if has_body(request) else b""
    if delivery.complete and bytes(delivery.body) != body:
        problems.append(f"{where}: body of {len(delivery.body)} bytes differs from the {len(body)} sent"
                        f"{_first_difference(bytes(delivery.body), body)}")  # fmt: skip
    if not delivery.complete and not body.startswith(bytes(delivery.body)):
        problems.append(f"{where}: the body part received is not what the client sent"
                        f"{_first_difference(bytes(delivery.body), body)}")  # fmt: skip
    return problems


def _client_headers(request: Request, diff_id: str) -> list[tuple[str, str]]:
    head = request_bytes(request, diff_id, "/", False, False).split(b"\r\n\r\n", 1)[0].decode()
    return [(k.lower(), v.strip()) for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])]


def _first_difference(got: bytes, want: bytes) -> str:
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f" (first difference at byte {i}: got {got[max(0, i - 8) : i + 24]!r})"
    return " (one is a prefix of the other)"


def check_session(
    session: Session, ids: list[str], outcome: Outcome, deliveries: dict[str, list[Delivery]]
) -> list[str]:
    """The client's view against the backend's for one session (deliveries: this session's, by id)."""
    problems = []
    if outcome.error:
        problems.append(outcome.error)
    # requests that may legitimately go unanswered: all those unanswered when the client left
    # (pipelined, earlier answers may still have been on their way), and those after an answer that
    # said Connection: close
    excused_from = len(session.requests)
    if outcome.disconnected_at is not None:
        excused_from = 0
    if outcome.closed_by_proxy_after is not None:
        excused_from = min(excused_from, outcome.closed_by_proxy_after + 1)
    seqs = []
    for i, request in enumerate(session.requests):
        diff_id = ids[i]
        got = outcome.answers[i]
        delivered = deliveries.get(diff_id, [])
        where = f"request {i} ({request.method} {request.size} B, id {diff_id})"
        if delivered:
            seqs.append((delivered[0].seq, i))
        if outcome.closed_by_proxy_after is not None and i > outcome.closed_by_proxy_after and delivered:
            problems.append(f"{where}: reached the backend after the proxy said Connection: close "
                            f"to request {outcome.closed_by_proxy_after}")  # fmt: skip
        if got is None or not got.complete:
            if i < excused_from and not outcome.error:
                cut = (
                    ""
                    if got is None
                    else f" (answer cut after {len(got.body)} body bytes, status {got.status})"
                )
                problems.append(
                    f"{where}: no complete answer and the connection closed{cut}"
                    f"{'; the backend answered it' if any(d.answered for d in delivered) else ''}"
                )
            continue
        problems += _check_answer(request, diff_id, got, delivered, where)
    if seqs != sorted(seqs):
        problems.append(f"requests reached the backend out of order: {[i for _, i in sorted(seqs)]}")
    return problems


def _check_dropped(request: Request, got: Answered, delivered: list[Delivery], where: str) -> list[str]:
    """The backend closed without answering: a clean 502 from the proxy; sent again at most once,
    on a new connection, and only an idempotent request (RFC 9110 9.2.2)."""
    problems = []
    if got.status != 502 or any(k == "x-diff-answer" for k, _ in got.headers):
        problems.append(f"{where}: the backend never answered, the client got {got.status} (expected 502)")
    if len(delivered) > (2 if request.method in IDEMPOTENT else 1):
        problems.append(f"{where}: the backend closed without answering, and the proxy sent it "
                        f"{len(delivered)} times")  # fmt: skip
    if len(delivered) == 2 and delivered[1].nth != 0:
        problems.append(f"{where}: retried on a reused backend connection")
    return problems


def _check_answer(
    request: Request, diff_id: str, got: Answered, delivered: list[Delivery], where: str
) -> list[str]:
    answer = request.answer
    if answer.drop:
        return _check_dropped(request, got, delivered, where)
    answered_by = [v for k, v in got.headers if k == "x-diff-answer"]
    if not answered_by:
        body = got.body[:200]
        return [f"{where}: the proxy answered {got.status} itself ({body!r}); the backend "
                f"{'got it' if delivered else 'never got it'}"]  # fmt: skip
    if answered_by != [diff_id]:
        return [f"{where}: got the answer to {answered_by} (answers crossed)"]
    problems = []
    if len(delivered) != 1:
        problems.append(f"{where}: answered, but delivered {len(delivered)} times")
    if got.status != answer.status:
        problems.append(f"{where}: status {got.status}, backend sent {answer.status}")
    head_only = request.method == "HEAD"
    sent = answer_headers(answer, diff_id, head_only)
    named = {part.strip() for name, value in sent if name == "connection" for part in value.split(",")}
    expected = [
        (k, v) for k, v in sent if k not in HOP_BY_HOP and k not in named and k not in ANSWER_SET_BY_PROXY
    ]
    actual = [(k, v) for k, v in got.headers if k not in ANSWER_SET_BY_PROXY]
    if actual != expected:
        problems.append(f"{where}: answer headers {actual}, backend sent {expected}")
    version = [v for k, v in got.headers if k == "x-api-version"]
    if version != [request.version]:
        problems.append(f"{where}: x-api-version {version}, expected [{request.version!r}]")
    lengths = [v for k, v in got.headers if k == "content-length"]
    backend_length = [v for k, v in sent if k == "content-length"]
    if backend_length and answer.status not in (204, 304) and lengths != backend_length:
        problems.append(f"{where}: content-length {lengths}, backend sent {backend_length}")
    body = b"" if head_only or answer.status in (204, 304) else answer_body(diff_id, answer.size)
    if got.body != body:
        problems.append(f"{where}: answer body of {len(got.body)} bytes differs from the backend's "
                        f"{len(body)}{_first_difference(got.body, body)}")  # fmt: skip
    unexpected_interim = [s for s in got.interim if s != 100 or not request.expect]
    if unexpected_interim:
        problems.append(f"{where}: interim answers {got.interim} relayed")
    return problems


def run_and_check(
    backend: ScriptedBackend, port: int, registry: Registry, session: Session, run: str, number: int,
    proxy_alive: object = None,
) -> tuple[Outcome, list[str]]:  # fmt: skip
    ids = ids_for(run, number, session)
    for diff_id, request, i in zip(ids, session.requests, range(len(ids)), strict=True):
        registry.requests[diff_id] = (request, target_for(diff_id, i))
        backend.scripts[diff_id] = request.answer
    outcome = run_session(port, session, ids)
    problems: list[str] = []
    if outcome.disconnected_at is not None:
        registry.abandoned.update(diff_id for diff_id, got in zip(ids, outcome.answers, strict=True)
                                  if got is None or not got.complete)  # fmt: skip
        time.sleep(0.05)  # what the proxy still forwards for them arrives now, not in the next session
    if not backend.wait_quiet(set(ids), 2.0):
        problems.append("a backend connection was left inside an exchange 2 s after the session ended")
    deliveries: dict[str, list[Delivery]] = {}
    mine = set(ids)
    for delivery in backend.take():
        problems += check_delivery(delivery, registry)
        if delivery.diff_id in mine:
            deliveries.setdefault(delivery.diff_id or "", []).append(delivery)
        elif delivery.diff_id not in registry.abandoned:
            problems.append(f"during this session the backend got {delivery.method} {delivery.target} of "
                            f"an earlier one (id {delivery.diff_id}), which had not given up")  # fmt: skip
    problems += [f"backend: {p}" for p in backend.take_problems()]
    problems += check_session(session, ids, outcome, deliveries)
    return outcome, problems
