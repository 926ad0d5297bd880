"""The gRPC interop cases, by name, with grpcio clients through the proxy to grpcio backends on
both versions: over h2c (prior knowledge on the main listener, h2c to the backends) and over TLS
(ALPN h2 on the listener, https h2 backends). Every case asserts which version answered (the
proxy's ``x-api-version`` and the backend's own ``x-backend`` in the initial metadata, or in the
trailers of a trailers-only answer)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.grpc.interop import OPTIONS, InteropServer, Protos
from tests.support import ProxyThread, RedisServer, wait_until

trustme = pytest.importorskip("trustme")
CASES = [
    "empty_unary", "large_unary", "client_streaming", "server_streaming", "ping_pong", "empty_stream",
    "status_code_and_message", "special_status_message", "custom_metadata", "timeout_on_sleeping_server",
    "cancel_after_begin", "cancel_after_first_response", "unimplemented_method", "unimplemented_service",
]  # fmt: skip
REQUEST_SIZES = [27182, 8, 1828, 45904]
RESPONSE_SIZES = [31415, 9, 2653, 58979]
LARGE = 4 * 1024 * 1024 - 64  # 4 MB with the message framing under the raised limits


class Setup:
    """One transport: two backends, a proxy in front, and how a client reaches it."""

    def __init__(self, v1: InteropServer, v2: InteropServer, proxy: ProxyThread, target: str,
                 credentials: grpc.ChannelCredentials | None) -> None:  # fmt: skip
        self.servers = {"v1": v1, "v2": v2}
        self.proxy = proxy
        self.target = target
        self.credentials = credentials

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.target, options=OPTIONS)
        return grpc.secure_channel(self.target, self.credentials, options=OPTIONS)


def _proxy(
    workdir: Path, redis: RedisServer, v1: InteropServer, v2: InteropServer, **extra: Any
) -> ProxyThread:
    settings = {
        "v1_url": v1.url, "v2_url": v2.url, "v1_protocol": "h2", "v2_protocol": "h2", "redis_url": redis.url,
        "log_level": "warning", "poll_interval_seconds": 0.2, "limits": {"strict_states": True}, **extra,
    }  # fmt: skip
    return ProxyThread(workdir, settings).start(wait=False)


@pytest.fixture(scope="module", params=["h2c", "tls"])
def setup(
    request: pytest.FixtureRequest,
    pb: Protos,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("interop")
    if request.param == "h2c":
        v1, v2 = InteropServer("v1", pb), InteropServer("v2", pb)
        proxy = _proxy(workdir, redis_server, v1, v2)
        credentials = None
    else:
        ca = trustme.CA()
        backend = ca.issue_cert("localhost")
        tls = (backend.private_key_pem.bytes(), backend.cert_chain_pems[0].bytes())
        v1, v2 = InteropServer("v1", pb, tls=tls), InteropServer("v2", pb, tls=tls)
        ca_file, cert, key = workdir / "ca.pem", workdir / "cert.pem", workdir / "key.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        listener = ca.issue_cert("127.0.0.1", "localhost")
        listener.private_key_pem.write_to_path(str(key))
        cert.write_bytes(b"".join(blob.bytes() for blob in listener.cert_chain_pems))
        proxy = _proxy(workdir, redis_server, v1, v2, upstream_ca_file=str(ca_file), tls_cert_file=str(cert),
                       tls_key_file=str(key))  # fmt: skip
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
    made = Setup(v1, v2, proxy, f"127.0.0.1:{proxy.port}", credentials)
    with made.channel() as channel:  # ready when a call goes through
        stub = pb.test_grpc.TestServiceStub(channel)
        wait_until(lambda: _answers(stub, pb), timeout=20, message="proxy ready for gRPC")
    yield made
    proxy.stop()
    v1.stop()
    v2.stop()


def _answers(stub: Any, pb: Protos) -> bool:
    try:
        stub.EmptyCall(pb.empty.Empty(), timeout=2)
        return True
    except grpc.RpcError:
        return False


def answered_by(call: Any) -> str:
    """The version that answered, as the proxy and the backend each say; they must agree."""
    metadata = dict(call.initial_metadata() or ())
    if "x-api-version" not in metadata:  # a trailers-only answer: its headers are the trailers
        metadata.update(dict(call.trailing_metadata() or ()))
    assert metadata.get("x-backend", metadata["x-api-version"]) == metadata["x-api-version"]
    return str(metadata["x-api-version"])


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("case", CASES)
def test_interop(setup: Setup, pb: Protos, case: str, version: str) -> None:
    for server in setup.servers.values():
        server.reset()
    metadata = (("x-strangler-version", version),)
    with setup.channel() as channel:
        globals()[case](channel, pb, metadata, setup.servers[version], version)


def payload(pb: Protos, size: int) -> Any:
    return pb.messages.Payload(body=b"\0" * size)


def empty_unary(
    channel: grpc.Channel, pb: Protos, metadata: Any, server: InteropServer, version: str
) -> None:
    stub = pb.test_grpc.TestServiceStub(channel)
    response, call = stub.EmptyCall.with_call(pb.empty.Empty(), metadata=metadata)
    assert response == pb.empty.Empty()
    assert answered_by(call) == version


def large_unary(
    channel: grpc.Channel, pb: Protos, metadata: Any, server: InteropServer, version: str
) -> None:
    stub = pb.test_grpc.TestServiceStub(channel)
    request = pb.messages.SimpleRequest(response_size=LARGE, payload=payload(pb, LARGE))
    response, call = stub.UnaryCall.with_call(request, metadata=metadata)
    assert len(response.payload.body) == LARGE and response.payload.body == b"\0" * LARGE
    assert answered_by(call) == version


def client_streaming(
    channel: grpc.Channel, pb: Protos, metadata: Any, server: InteropServer, version: str
) -> None:
    stub = pb.test_grpc.TestServiceStub(channel)
    requests = (pb.messages.StreamingInputCallRequest(payload=payload(pb, n)) for n in REQUEST_SIZES)
    response, call = stub.StreamingInputCall.with_call(requests, metadata=metadata)
    assert response.aggregated_payload_size == 74922
    assert answered_by(call) == version


def server_streaming(
    channel: grpc.Channel, pb: Protos, metadata: Any, server: InteropServer, version: str
) -> None:
    stub = pb.test_grpc.TestServiceStub(channel)
    parameters = [pb.messages.ResponseParameters(size=n) for n in RESPONSE_SIZES]
    call = stub.StreamingOutputCall(pb.messages.StreamingOutputCallRequest(response_parameters=parameters),
                                    metadata=metadata)  # fmt: skip
    assert [len(response.payload.body) for response in call] == RESPONSE_SIZES
    assert answered_by(call) == version


class Requests:
    """A request stream the test feeds one message at a time (ping-pong), or never ends."""

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._ready = threading.Condition()
        self._done = False

    def put(self, item: Any) -> None:
        with self._ready:
            self._items.append(item)
            self._ready.notify()

    def close(self) -> None:
        with self._ready:
            self._done = True
            self._ready.notify()

    def __iter__(self) -> Iterator[Any]:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._items or self._done)
                if self._items:
                    item = self._items.pop(0)
                else:
                    return
            yield item


def ping_pong(channel: grpc.Channel, pb: Protos, metadata: Any, server: InteropServer, version: str) -> None:
    stub = pb.test_grpc.TestServiceStub(channel)
    requests = Requests()
    call = stub.FullDuplexCall(iter(requests), metadata=metadata)
    for request_size, response_size in zip(REQUEST_SIZES, RESPONSE_SIZES, strict=True):
        requests.put(pb.messages.StreamingOutputCallRequest(
            response_parameters=[pb.messages.ResponseParameters(size=response_size)],
            payload=payload(pb, request_size),
        ))  # fmt: skip
        assert len(next(call).payload.body) == response_size  # each answer before the next request
    requests.close()
    assert list(call) == []
    assert call.code() == grpc.StatusCode.OK
    assert answered_by(call) == version


def empty_stream(
    channel: grpc.Channel, pb: Protos, metadata: Any, server: InteropServer, version: str
) -> None:
    stub = pb.test_grpc.TestServiceStub(channel)
    call = stub.FullDuplexCall(iter([]), metadata=metadata)
    assert list(call) == []
    assert call.code() == grpc.StatusCode.OK
    assert answered_by(call) == version


def _status_request(pb: Protos, message: str) -> Any:
    return pb.messages.EchoStatus(code=2, message=message)


def status_code_and_message(
    channel: grpc.Channel, pb: Protos, metadata: Any, server: InteropServer, version: str
) -> None:
    stub = pb.test_grpc.TestServiceStub(channel)
    message = "test status message"
    request = pb.messages.SimpleRequest(response_status=_status_request(pb, message))
    with pytest.raises(grpc.RpcError) as raised:
        stub.UnaryCall(request, metadata=metadata)
    assert raised.value.code() == grpc.StatusCode.UNKNOWN and raised.value.details() == message
    assert answered_by(raised.value) == version
    duplex = pb.messages.StreamingOutputCallRequest(response_status=_status_request(pb, message))
    call = stub.FullDuplexCall(iter([duplex]), metadata=metadata)
    with pytest.raises(grpc.RpcError):
        list(call)
    assert call.code() == grpc.StatusCode.UNKNOWN and call.details() == message
    assert answered_by(call) == version


def special_status_message(
    channel: grpc.Channel, pb: Protos, metadata: Any, server: InteropServer, version: str
) -> None:
    stub = pb.test_grpc.TestServiceStub(channel)
    message = "\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001f608\t\n"
    request = pb.messages.SimpleRequest(response_status=_status_request(pb, message))
    with pytest.raises(grpc.RpcError) as raised:
        stub.UnaryCall(request, metadata=metadata)
    assert raised.value.code() == grpc.StatusCode.UNKNOWN and raised.value.details() == message
    assert answered_by(raised.value) == version


def custom_metadata(
    channel: grpc.Channel, pb: Protos, metadata: Any, server: InteropServer, version: str
) -> None:
    stub = pb.test_grpc.TestServiceStub(channel)
    initial = ("x-grpc-test-echo-initial", "test_initial_metadata_value")
    trailing = ("x-grpc-test-echo-trailing-bin", b"\x0a\x0b\x0a\x0b\x0a\x0b")
    request = pb.messages.SimpleRequest(response_size=314159, payload=payload(pb, 271828))
    _, call = stub.UnaryCall.with_call(request, metadata=(*metadata, initial, trailing))
    assert initial in call.initial_metadata() and trailing in call.trailing_metadata()
    assert answered_by(call) == version
    duplex = pb.messages.StreamingOutputCallRequest(
        response_parameters=[pb.messages.ResponseParameters(size=314159)], payload=payload(pb, 271828)
    )
    call = stub.FullDuplexCall(iter([duplex]), metadata=(*metadata, initial, trailing))
    assert [len(r.payload.body) for r in call] == [314159]
    assert initial in call.initial_metadata() and trailing in call.trailing_metadata()
    assert answered_by(call) == version


def timeout_on_sleeping_server(
    channel: grpc.Channel, pb: Protos, metadata: Any, server: InteropServer, version: str
) -> None:
    stub = pb.test_grpc.TestServiceStub(channel)
    requests = Requests()  # never closed: the server waits on the client until the deadline
    requests.put(pb.messages.StreamingOutputCallRequest(payload=payload(pb, 27182)))
    call = stub.FullDuplexCall(iter(requests), metadata=metadata, timeout=0.5)
    with pytest.raises(grpc.RpcError):
        list(call)
    requests.close()
    assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert answered_by(call) == version


def cancel_after_begin(
    channel: grpc.Channel, pb: Protos, metadata: Any, server: InteropServer, version: str
) -> None:
    stub = pb.test_grpc.TestServiceStub(channel)
    requests = Requests()
    future = stub.StreamingInputCall.future(iter(requests), metadata=metadata)
    wait_until(lambda: server.servicer.calls == 1, timeout=10, message="the call reached the backend")
    future.cancel()
    assert future.cancelled() and future.code() == grpc.StatusCode.CANCELLED
    assert server.servicer.ended.wait(10), "the cancel reached the backend"  # else it waits forever
    requests.close()  # only now: a half-close racing the cancel would end the call normally


def cancel_after_first_response(
    channel: grpc.Channel, pb: Protos, metadata: Any, server: InteropServer, version: str
) -> None:
    stub = pb.test_grpc.TestServiceStub(channel)
    requests = Requests()
    call = stub.FullDuplexCall(iter(requests), metadata=metadata)
    requests.put(pb.messages.StreamingOutputCallRequest(
        response_parameters=[pb.messages.ResponseParameters(size=31415)], payload=payload(pb, 27182)
    ))  # fmt: skip
    assert len(next(call).payload.body) == 31415
    assert answered_by(call) == version
    call.cancel()
    assert call.code() == grpc.StatusCode.CANCELLED
    assert server.servicer.ended.wait(10), "the cancel reached the backend"
    requests.close()


def unimplemented_method(
    channel: grpc.Channel, pb: Protos, metadata: Any, server: InteropServer, version: str
) -> None:
    stub = pb.test_grpc.TestServiceStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.UnimplementedCall(pb.empty.Empty(), metadata=metadata)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert answered_by(raised.value) == version


def unimplemented_service(
    channel: grpc.Channel, pb: Protos, metadata: Any, server: InteropServer, version: str
) -> None:
    stub = pb.test_grpc.UnimplementedServiceStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.UnimplementedCall(pb.empty.Empty(), metadata=metadata)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert answered_by(raised.value) == version
