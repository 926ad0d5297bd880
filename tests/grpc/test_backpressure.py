"""Flow control end to end: a client that stops reading a server stream holds the backend back
(the proxy credits the backend's window only as the client takes the data), so the proxy's memory
for a stream stays bounded by the windows, whatever the stream's length."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from tests.grpc.interop import OPTIONS, InteropServer, Protos
from tests.support import ProxyProcess, wait_until

MESSAGES, SIZE = 400, 64 * 1024  # 25 MB in all


def test_a_client_that_stops_reading_holds_the_backend_back(
    grpc_proxy: Callable[..., ProxyProcess], grpc_v1v2: tuple[InteropServer, InteropServer], pb: Protos
) -> None:
    v1, _ = grpc_v1v2
    proxy = grpc_proxy()
    parameters = [pb.messages.ResponseParameters(size=SIZE) for _ in range(MESSAGES)]
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=OPTIONS) as channel:
        stub = pb.test_grpc.TestServiceStub(channel)
        call = stub.StreamingOutputCall(
            pb.messages.StreamingOutputCallRequest(response_parameters=parameters)
        )
        next(call)  # one message read, then the client pauses
        wait_until(lambda: v1.servicer.streamed > 0, timeout=10)
        held = 0
        for _ in range(20):  # until the backend stops getting further (its window is shut)
            before = v1.servicer.streamed
            time.sleep(0.1)
            if v1.servicer.streamed == before:
                held += 1
                if held == 3:
                    break
            else:
                held = 0
        stalled_at = v1.servicer.streamed
        print(f"backend held at {stalled_at} of {MESSAGES} messages ({stalled_at * SIZE >> 20} MB)")
        assert stalled_at < MESSAGES // 2  # windows and socket buffers, not the whole stream
        assert sum(1 for _ in call) == MESSAGES - 1  # and reading on gets the rest, in full
    assert v1.servicer.streamed == MESSAGES


def _abandon(port: int, request: bytes, path: bytes) -> None:
    """An HTTP/2 client that opens no window for the answer (the proxy keeps what the backend
    sends), waits a moment, then resets its stream."""
    import socket

    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.errors import ErrorCodes
    from h2.events import ResponseReceived
    from h2.settings import SettingCodes

    with socket.create_connection(("127.0.0.1", port)) as sock:
        h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        h2.initiate_connection()
        h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", path),
                   (b"content-type", b"application/grpc"), (b"te", b"trailers")]  # fmt: skip
        h2.send_headers(1, headers)
        h2.send_data(1, request, end_stream=True)
        sock.sendall(h2.data_to_send())
        answered = False
        while not answered:
            data = sock.recv(65536)
            assert data, "the proxy closed the connection"
            answered = any(isinstance(event, ResponseReceived) for event in h2.receive_data(data))
            sock.sendall(h2.data_to_send())
        time.sleep(0.2)  # the backend's answer fills the proxy's window for this stream meanwhile
        h2.reset_stream(1, ErrorCodes.CANCEL)
        sock.sendall(h2.data_to_send())


def test_streams_abandoned_with_data_buffered_do_not_stall_the_connection(
    grpc_proxy: Callable[..., ProxyProcess], pb: Protos
) -> None:
    """A client that leaves mid-answer leaves up to a stream window (1 MB) of DATA unread in the
    proxy: it is credited back to the connection's window (16 MB), or after a few such clients
    the one connection to the backend would stall for every stream on it."""
    from tests.grpc.interop import SERVICE, frame

    proxy = grpc_proxy()
    big = pb.messages.StreamingOutputCallRequest(
        response_parameters=[pb.messages.ResponseParameters(size=SIZE) for _ in range(40)]  # 2.5 MB
    )
    for _ in range(20):  # 20 MB left unread, were it never credited
        _abandon(proxy.port, frame(big), (SERVICE + "StreamingOutputCall").encode())
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=OPTIONS) as channel:
        stub = pb.test_grpc.TestServiceStub(channel)
        assert len(list(stub.StreamingOutputCall(big, timeout=10))) == 40
