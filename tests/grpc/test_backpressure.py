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
