"""WebSockets through the split, with a real client, real WebSocket backends per version
and the real proxy process."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.support import ProxyProcess, RedisServer, asgi_adapter, free_port, metric_value, wait_until
from tests.wsbackend import WsBackend


@pytest.fixture()
def ws_backends() -> Iterator[tuple[WsBackend, WsBackend]]:
    v1, v2 = WsBackend("v1").start(), WsBackend("v2").start()
    yield v1, v2
    v1.stop()
    v2.stop()


@pytest.fixture()
def ws_proxy(
    proxy_factory: Callable[..., ProxyProcess], ws_backends: tuple[WsBackend, WsBackend], redis_url: str
) -> Callable[..., ProxyProcess]:
    v1, v2 = ws_backends
    split_key = f"ws{uuid.uuid4().hex[:8]}:split"

    def start(**settings: Any) -> ProxyProcess:
        base = {"v1_url": v1.url, "v2_url": v2.url, "redis_url": redis_url, "split_key": split_key}
        return proxy_factory(**{**base, **settings})

    start.split_key = split_key  # type: ignore[attr-defined]
    return start


def ws_url(proxy: ProxyProcess, path: str = "/echo") -> str:
    return proxy.url.replace("http://", "ws://") + path


def open_ws(proxy: ProxyProcess, path: str = "/echo", **kwargs: Any) -> ClientConnection:
    kwargs.setdefault("max_size", None)
    kwargs.setdefault("compression", None)
    kwargs.setdefault("open_timeout", 10)
    return connect(ws_url(proxy, path), **kwargs)


def metrics(proxy: ProxyProcess) -> str:
    return httpx.get(proxy.admin + "/metrics", timeout=5).text


def http_version(proxy: ProxyProcess, user: str) -> str:
    return httpx.get(proxy.url + "/", headers={"X-User-ID": user}, timeout=5).headers["x-api-version"]


def set_split(redis_server: RedisServer, proxy: ProxyProcess, key: str, value: float) -> None:
    redis_server.client().set(key, str(value))
    wait_until(lambda: httpx.get(proxy.admin + "/split", timeout=5).json()["default"] == value, timeout=5)


def test_echo_text_binary_fragmented_and_subprotocol(ws_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = ws_proxy(websocket={"max_message_bytes": 4 * 1024 * 1024})
    with open_ws(proxy, subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v2"
        assert ws.response is not None and ws.response.headers["X-API-Version"] == "v1"
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=5) == b"\x00\x01binary"
        big = os.urandom(1024 * 1024)
        ws.send([big[i : i + 65536] for i in range(0, len(big), 65536)])  # 16 fragments
        assert ws.recv(timeout=10) == big
        ws.send(["fragmented ", "text ", "message"])
        assert ws.recv(timeout=5) == "fragmented text message"
        pong = ws.ping(b"are you there")
        assert pong.wait(5)
    with open_ws(proxy, subprotocols=["chat.v1"]) as ws:
        assert ws.subprotocol == "chat.v1"
    with open_ws(proxy) as ws:
        assert ws.subprotocol is None


def test_split_and_stickiness_across_many_keys_and_headers_passed(
    ws_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    proxy = ws_proxy(user_key_query="uid")
    set_split(redis_server, proxy, ws_proxy.split_key, 30)  # type: ignore[attr-defined]
    http_versions: dict[int, str] = {}
    ws_versions: dict[int, str] = {}
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        for user in range(150):
            answer = client.get("/echo", headers={"X-User-ID": f"user-{user}"})
            http_versions[user] = answer.headers["x-api-version"]
            # browsers cannot set headers: the key comes from the query parameter here
            with open_ws(proxy, f"/echo?uid=user-{user}") as ws:
                ws.send("whoami")
                ws_versions[user] = ws.recv(timeout=5)  # type: ignore[assignment]
    assert ws_versions == http_versions, "a key got a different version over WebSocket than over HTTP"
    share = sum(v == "v2" for v in ws_versions.values()) / len(ws_versions)
    assert 0.15 <= share <= 0.45, share

    headers = {"Cookie": "session=abc", "Authorization": "Bearer t0k", "X-User-ID": "user-1"}
    with open_ws(proxy, "/echo?q=1", additional_headers=headers, origin="https://app.example") as ws:  # type: ignore[arg-type]
        ws.send("headers")
        seen = json.loads(ws.recv(timeout=5))
    assert seen["cookie"] == "session=abc" and seen["authorization"] == "Bearer t0k"
    assert seen["origin"] == "https://app.example"
    assert seen["path"] == "/echo?q=1"
    assert seen["x-forwarded-for"] == "127.0.0.1" and "x-request-id" in seen
    assert "sec-websocket-extensions" not in seen  # never negotiated: frames pass as they are

    # a header the client names in Connection is hop-by-hop: it stops at the proxy, as for HTTP
    hop = {"Connection": "Upgrade, X-Hop-Only", "X-Hop-Only": "secret", "X-Kept": "yes"}
    with open_ws(proxy, "/echo", additional_headers=hop) as ws:  # type: ignore[arg-type]
        ws.send("headers")
        seen = json.loads(ws.recv(timeout=5))
    assert "x-hop-only" not in seen and seen["x-kept"] == "yes"

    with open_ws(proxy, additional_headers={"X-Strangler-Version": "v2"}) as ws:
        ws.send("whoami")
        assert ws.recv(timeout=5) == "v2"


def test_refused_upgrade_gives_the_status_and_counts(ws_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = ws_proxy()
    with pytest.raises(InvalidStatus) as refused:
        open_ws(proxy, "/refuse")
    response = refused.value.response
    assert response.status_code == 403
    assert response.headers["X-API-Version"] == "v1"
    assert json.loads(response.body) == {"error": "no entry", "version": "v1"}
    text = metrics(proxy)
    assert metric_value(text, "strangler_websocket_handshake_failures_total", version="v1") == 1
    assert metric_value(text, "strangler_websocket_connections_total", version="v1") == 0


def test_v2_unreachable_falls_back_to_v1_and_counts_an_error(
    proxy_factory: Callable[..., ProxyProcess], ws_backends: tuple[WsBackend, WsBackend], redis_url: str
) -> None:
    v1, _ = ws_backends
    proxy = proxy_factory(
        v1_url=v1.url, v2_url=f"http://127.0.0.1:{free_port()}", redis_url=redis_url,
        split_key=f"ws{uuid.uuid4().hex[:8]}:split", default_percentage=100,
    )  # fmt: skip
    with open_ws(proxy) as ws:
        assert ws.response is not None and ws.response.headers["X-API-Version"] == "v1"
        ws.send("whoami")
        assert ws.recv(timeout=5) == "v1"
    text = metrics(proxy)
    assert metric_value(text, "strangler_fallbacks_total") == 1
    assert (
        metric_value(text, "strangler_websocket_handshake_failures_total", version="v2", reason="connect")
        == 1
    )
    assert metric_value(text, "http_errors_total", version="v2") == 1


def test_close_codes_pass_and_upstream_death_is_1011_with_metrics(
    ws_proxy: Callable[..., ProxyProcess],
) -> None:
    proxy = ws_proxy()
    with open_ws(proxy) as ws:
        ws.send("close:4001:backend says bye")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "backend says bye")

    with open_ws(proxy) as ws:
        ws.send("one")
        assert ws.recv(timeout=5) == "one"
        ws.send("die")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011

    with open_ws(proxy) as ws:
        ws.send("two")
        assert ws.recv(timeout=5) == "two"
        ws.close(4321, "client leaving")
    wait_until(
        lambda: metric_value(metrics(proxy), "strangler_websocket_open_connections", version="v1") == 0
    )
    text = metrics(proxy)
    assert metric_value(text, "strangler_websocket_connections_total", version="v1") == 3
    assert metric_value(text, "strangler_websocket_closed_total", version="v1", code="4xxx") == 2
    assert metric_value(text, "strangler_websocket_closed_total", version="v1", code="1011") == 1
    assert (
        metric_value(text, "strangler_websocket_messages_total", version="v1", direction="to_upstream") == 4
    )
    assert metric_value(text, "strangler_websocket_messages_total", version="v1", direction="to_client") == 2
    # the upgrade's answer (101) is what the canary counts, as for any request (a failed one counts
    # as the version's error, so the successes must count too); the session's length never does
    assert metric_value(text, "http_requests_total", version="v1", code="101") == 3
    assert metric_value(text, "http_request_duration_seconds_count", version="v1") == 3
    assert metric_value(text, "http_request_duration_seconds_sum", version="v1") < 1.0


def test_rollback_drains_v2_connections_with_1012(
    ws_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    proxy = ws_proxy()
    key = ws_proxy.split_key  # type: ignore[attr-defined]
    set_split(redis_server, proxy, key, 100)
    stack = contextlib.ExitStack()
    sockets = [stack.enter_context(open_ws(proxy, f"/echo?n={n}")) for n in range(3)]
    for ws in sockets:
        ws.send("whoami")
        assert ws.recv(timeout=5) == "v2"
    started = time.monotonic()
    set_split(redis_server, proxy, key, 0)
    for ws in sockets:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    assert time.monotonic() - started < 5  # rollback grace is 0 by default: well within 5 s
    stack.close()
    with open_ws(proxy) as ws:
        ws.send("whoami")
        assert ws.recv(timeout=5) == "v1"
    text = metrics(proxy)
    assert metric_value(text, "strangler_websocket_drained_total", reason="rollback") == 3
    assert metric_value(text, "strangler_websocket_closed_total", version="v2", code="1012") == 3


def test_lower_split_drains_only_moved_connections_after_grace(
    ws_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    proxy = ws_proxy(websocket={"drain_grace_seconds": 2.0})
    key = ws_proxy.split_key  # type: ignore[attr-defined]
    set_split(redis_server, proxy, key, 60)
    sockets: dict[int, ClientConnection] = {}
    stack = contextlib.ExitStack()
    for user in range(40):
        ws = stack.enter_context(open_ws(proxy, additional_headers={"X-User-ID": f"u{user}"}))
        ws.send("whoami")
        if ws.recv(timeout=5) == "v2":
            sockets[user] = ws
        else:
            ws.close()
    set_split(redis_server, proxy, key, 20)
    for ws in sockets.values():  # the proxy serves 20% now; within the grace everyone still talks
        ws.send("whoami")
        assert ws.recv(timeout=5) == "v2"
    # who stays is what HTTP now says for the same key (the version header of any answer)
    staying = {u for u in sockets if http_version(proxy, f"u{u}") == "v2"}
    assert staying and staying != set(sockets)
    for user, ws in sockets.items():
        if user in staying:
            continue
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    for user in staying:
        sockets[user].send("still")
        assert sockets[user].recv(timeout=5) == "still"
        sockets[user].close()
    stack.close()
    assert metric_value(metrics(proxy), "strangler_websocket_drained_total", reason="split_lowered") == len(
        set(sockets) - staying
    )


def test_slow_reader_keeps_proxy_memory_bounded(
    ws_proxy: Callable[..., ProxyProcess], ws_backends: tuple[WsBackend, WsBackend]
) -> None:
    v1, _ = ws_backends
    proxy = ws_proxy(process=True)  # its memory is measured
    assert proxy.process is not None
    process = psutil.Process(proxy.worker_pid())  # the worker: the parent only holds the sockets
    count, size = 2000, 64 * 1024  # 125 MiB offered by the backend
    with open_ws(proxy, max_queue=1) as ws:
        ws.send("warm")
        assert ws.recv(timeout=5) == "warm"
        before = process.memory_info().rss
        ws.send(f"flood:{count}:{size}")
        # the client reads nothing: the backend must be held back well before it has sent it all
        wait_until(lambda: v1.sent > 10, timeout=10)
        time.sleep(1.0)
        stalled = v1.sent
        time.sleep(0.5)
        assert v1.sent == stalled < count // 4, (stalled, count)
        grown = process.memory_info().rss - before
        assert grown < 24 * 1024 * 1024, grown
        received = 0
        while received < count:
            message = ws.recv(timeout=10)
            assert len(message) == size
            received += 1
    assert v1.sent == count


def test_message_over_the_limit_is_closed_1009(ws_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = ws_proxy(websocket={"max_message_bytes": 1000})
    with open_ws(proxy) as ws:
        ws.send("x" * 1000)
        assert ws.recv(timeout=5) == "x" * 1000
        ws.send("x" * 1001)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_idle_timeout_closes_with_1001(ws_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = ws_proxy(websocket={"idle_timeout_seconds": 0.5})
    with open_ws(proxy, ping_interval=None) as ws:
        ws.send("a")
        assert ws.recv(timeout=5) == "a"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


@pytest.fixture()
def asgi_proxy(ws_backends: tuple[WsBackend, WsBackend], redis_url: str, tmp_path: Path) -> Iterator[str]:
    """``proxy.app:app`` under uvicorn: the same relay through the ASGI entry point."""
    v1, v2 = ws_backends
    with asgi_adapter(v1.url, v2.url, redis_url, "asgiws:", tmp_path, "--ws", "websockets-sansio") as url:
        yield url


def test_asgi_entry_point_relays_and_refuses_with_the_status(asgi_proxy: str) -> None:
    base = asgi_proxy.replace("http://", "ws://")
    with connect(base + "/echo", subprotocols=["chat.v2"], max_size=None, compression=None) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat.v2"
        assert ws.response is not None and ws.response.headers["X-API-Version"] == "v1"
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        big = os.urandom(1024 * 1024 - 10)
        ws.send([big[i : i + 100_000] for i in range(0, len(big), 100_000)])
        assert ws.recv(timeout=10) == big
        ws.send("close:4002:asgi bye")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and (closed.value.rcvd.code, closed.value.rcvd.reason) == (
        4002, "asgi bye",
    )  # fmt: skip
    with connect(base + "/echo", additional_headers={"X-Strangler-Version": "v2"}) as ws:
        ws.send("whoami")
        assert ws.recv(timeout=5) == "v2"
        ws.send("die")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    with pytest.raises(InvalidStatus) as refused:
        connect(base + "/refuse", open_timeout=10)
    assert refused.value.response.status_code == 403


def test_shutdown_tells_websocket_clients_1001(ws_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = ws_proxy(process=True)  # SIGTERM
    with open_ws(proxy) as ws:
        ws.send("a")
        assert ws.recv(timeout=5) == "a"
        assert proxy.process is not None
        proxy.process.terminate()  # SIGTERM: the graceful stop
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    proxy.process.wait(15)


def test_pinned_sessions_survive_a_lower_split_but_not_a_rollback_forced_ones_stay(
    ws_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    pinning = {"groups": ["*"], "secret": "websocket-test-pin-secret-01"}
    proxy = ws_proxy(session_pinning=pinning, websocket={"drain_grace_seconds": 0.2})
    key = ws_proxy.split_key  # type: ignore[attr-defined]
    set_split(redis_server, proxy, key, 99)  # pins are given and honoured only while 0 < split < 100
    user = {"X-User-ID": "pinned-user"}  # bucket 6900: v2 at 99%, v1 at 1% unless pinned
    with open_ws(proxy, additional_headers=user) as first:  # the 101 carries the pin, bound to the user
        assert first.response is not None
        pin = first.response.headers["Set-Cookie"].split(";")[0]
        assert pin.startswith("strangler_pin_default=v2.")
    with contextlib.ExitStack() as stack:
        pinned = stack.enter_context(open_ws(proxy, additional_headers={**user, "Cookie": pin}))
        forced = stack.enter_context(open_ws(proxy, additional_headers={"X-Strangler-Version": "v2"}))
        keyed = {
            user: stack.enter_context(open_ws(proxy, additional_headers={"X-User-ID": user}))
            for user in ("k0", "k1", "k2")
        }
        set_split(redis_server, proxy, key, 1)
        moved = [ws for user, ws in keyed.items() if http_version(proxy, user) == "v1"]
        assert moved, "no key moved from 100% to 1%"
        with pytest.raises(ConnectionClosed) as drained:  # past the grace: the drain has run...
            moved[0].recv(timeout=5)
        assert drained.value.rcvd is not None and drained.value.rcvd.code == 1012
        for ws in (pinned, forced):  # ...and a pinned session is not moved by a lower split
            ws.send("whoami")
            assert ws.recv(timeout=5) == "v2"
        set_split(redis_server, proxy, key, 0)
        with pytest.raises(ConnectionClosed) as closed:
            pinned.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        forced.send("whoami")  # the force header wins at any percentage: left alone
        assert forced.recv(timeout=5) == "v2"
