"""Real grpcio backends for the gRPC tests: the interop ``TestService`` (compiled at session start
from ``protos/`` with grpc_tools.protoc into a temporary directory; no generated code is kept),
served by grpcio's own server on 127.0.0.1, h2c or TLS.

Each server says which version it is (initial metadata ``x-backend: v1``), echoes the interop
metadata (``x-grpc-test-echo-initial``, ``x-grpc-test-echo-trailing-bin``), answers the status a
request asks for (``response_status``), and can be told to fail a share of calls with
UNAVAILABLE (``fail_share``: deterministic, every 1/share-th call, so a test's error rate is exact).
"""

from __future__ import annotations

import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

PROTOS = Path(__file__).parent / "protos"
MAX_MESSAGE = 8 * 1024 * 1024  # large_unary sends 4 MB (grpc's default limit is 4 MB)
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
SERVICE = "/grpc.testing.TestService/"


class Protos:
    """The compiled interop modules."""

    empty: ModuleType
    messages: ModuleType
    test: ModuleType
    test_grpc: ModuleType


def compile_protos(out: Path) -> Protos:
    from grpc_tools import protoc

    files = [str(PROTOS / name) for name in ("empty.proto", "messages.proto", "test.proto")]
    code = protoc.main(["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--grpc_python_out={out}", *files])
    assert code == 0, "protoc failed"
    sys.path.insert(0, str(out))
    import empty_pb2  # type: ignore[import-not-found]
    import messages_pb2  # type: ignore[import-not-found]
    import test_pb2  # type: ignore[import-not-found]
    import test_pb2_grpc  # type: ignore[import-not-found]

    protos = Protos()
    protos.empty, protos.messages, protos.test, protos.test_grpc = (
        empty_pb2,
        messages_pb2,
        test_pb2,
        test_pb2_grpc,
    )
    return protos


def _status(code: int) -> grpc.StatusCode:
    return next(status for status in grpc.StatusCode if status.value[0] == code)


class Servicer:
    """TestService as the interop spec describes it, plus the version mark and failure share."""

    def __init__(self, name: str, pb: Protos) -> None:
        self.name = name
        self.pb = pb
        self.fail_share = 0.0
        self.calls = 0
        self.time_left: list[float | None] = []  # per call: the deadline the server saw
        self.metadata: list[dict[str, Any]] = []  # per call: the request metadata it saw
        self.ended = threading.Event()  # a streaming call ended on the server (see _watch)
        self._lock = threading.Lock()

    def _start(self, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata())
        with self._lock:
            self.calls += 1
            failing = int(self.calls * self.fail_share) != int((self.calls - 1) * self.fail_share)
        self.time_left.append(context.time_remaining())
        self.metadata.append(metadata)
        initial = [("x-backend", self.name)]
        if "x-grpc-test-echo-initial" in metadata:
            initial.append(("x-grpc-test-echo-initial", metadata["x-grpc-test-echo-initial"]))
        context.send_initial_metadata(initial)
        if "x-grpc-test-echo-trailing-bin" in metadata:
            context.set_trailing_metadata(
                [("x-grpc-test-echo-trailing-bin", metadata["x-grpc-test-echo-trailing-bin"])]
            )
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} injected failure")

    def _watch(self, context: grpc.ServicerContext) -> None:
        """``ended`` is set when a streaming call is over on the server, however it ended: a call
        whose client went away (cancel, reset) ends only if that reached the backend."""
        if not context.add_callback(self.ended.set):
            self.ended.set()  # over already

    def _payload(self, size: int) -> Any:
        return self.pb.messages.Payload(body=b"\0" * size)

    def _check(self, request: Any, context: grpc.ServicerContext) -> None:
        status = request.response_status
        if status.code:
            context.abort(_status(status.code), status.message)

    def EmptyCall(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC's names
        self._start(context)
        return self.pb.empty.Empty()

    def UnaryCall(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._start(context)
        self._check(request, context)
        return self.pb.messages.SimpleResponse(
            payload=self._payload(request.response_size), server_id=self.name
        )

    def StreamingOutputCall(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._start(context)
        for parameters in request.response_parameters:
            if parameters.interval_us:
                time.sleep(parameters.interval_us / 1e6)
            yield self.pb.messages.StreamingOutputCallResponse(payload=self._payload(parameters.size))
        self._check(request, context)

    def StreamingInputCall(self, requests: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._watch(context)
        self._start(context)
        total = sum(len(request.payload.body) for request in requests)
        return self.pb.messages.StreamingInputCallResponse(aggregated_payload_size=total)

    def UnimplementedCall(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")  # as the generated base does

    def FullDuplexCall(self, requests: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._watch(context)
        self._start(context)
        for request in requests:
            self._check(request, context)
            for parameters in request.response_parameters:
                if parameters.interval_us:
                    time.sleep(parameters.interval_us / 1e6)
                yield self.pb.messages.StreamingOutputCallResponse(payload=self._payload(parameters.size))


class InteropServer:
    """A grpcio server for one version, h2c or (with ``tls``: key and certificate PEM) TLS."""

    def __init__(self, name: str, pb: Protos, tls: tuple[bytes, bytes] | None = None) -> None:
        self.name = name
        self.servicer = Servicer(name, pb)
        self.server = grpc.server(ThreadPoolExecutor(max_workers=16), options=OPTIONS)
        pb.test_grpc.add_TestServiceServicer_to_server(self.servicer, self.server)
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            self.url = f"http://127.0.0.1:{self.port}"
        else:
            credentials = grpc.ssl_server_credentials([tls])
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
            self.url = f"https://localhost:{self.port}"
        self.server.start()

    def reset(self) -> None:
        servicer = self.servicer
        servicer.fail_share = 0.0
        servicer.calls = 0
        servicer.time_left.clear()
        servicer.metadata.clear()
        servicer.ended.clear()

    def stop(self) -> None:
        self.server.stop(0).wait(5)


def frame(message: Any) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    data = message.SerializeToString()
    return struct.pack(">BI", 0, len(data)) + data


def unframe(body: bytes) -> list[bytes]:
    """The messages in a gRPC body."""
    out = []
    while body:
        assert body[0] == 0, "compressed messages are not expected"
        (size,) = struct.unpack(">I", body[1:5])
        out.append(body[5 : 5 + size])
        body = body[5 + size :]
    return out
