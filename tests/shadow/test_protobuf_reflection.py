"""Descriptors from server reflection: real grpcio servers on 127.0.0.1 (one offering reflection,
one not), real answers fetched with a grpcio client and compared field by field."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection

from proxy.shadow.descriptors import DescriptorDecoder, GrpcDecoding, ReflectionSource
from proxy.shadow.policy import EndpointRules
from proxy.shadow.protobuf import WIRE, GrpcAnswer, compare_grpc
from tests.shadow.protobuf_support import Compiled, compile_protos, frame

METHOD = "/strangler.shadowtest.Users/GetUser"
SERVICE = "strangler.shadowtest.Users"


@pytest.fixture(scope="module")
def proto(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return compile_protos(tmp_path_factory)


def serve(proto: Compiled, display_name: str, with_reflection: bool) -> tuple[Any, str]:
    pb2 = proto.pb2

    class Users(proto.grpc.UsersServicer):  # type: ignore[name-defined,misc]
        def GetUser(self, request: Any, context: Any) -> Any:  # noqa: N802 - the generated name
            return pb2.GetUserReply(user=pb2.User(id=request.id, name="ann", display_name=display_name))

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    proto.grpc.add_UsersServicer_to_server(Users(), server)
    if with_reflection:
        names = (pb2.DESCRIPTOR.services_by_name["Users"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def servers(proto: Compiled) -> Iterator[dict[str, str]]:
    v1, v1_address = serve(proto, "Ann", with_reflection=True)
    v2, v2_address = serve(proto, "Ann B.", with_reflection=False)
    yield {"v1": v1_address, "v2": v2_address}
    v1.stop(0)
    v2.stop(0)


def call(address: str, user_id: int) -> bytes:
    """One unary call with a real grpcio client; the answer's message bytes as sent."""
    with grpc.insecure_channel(address) as channel:
        get = channel.unary_unary(METHOD, request_serializer=bytes, response_deserializer=bytes)
        request = b"\x08" + bytes([user_id])  # GetUserRequest{id}
        return bytes(get(request, timeout=5))


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


class Counted(list[str]):
    def __call__(self, outcome: str) -> None:
        self.append(outcome)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_reflection_gives_the_descriptors_and_the_diff_names_the_field(servers: dict[str, str]) -> None:
    source = ReflectionSource([(servers["v1"], None)], timeout=5)
    decoder = run(source.resolve(METHOD))
    assert isinstance(decoder, DescriptorDecoder)  # v1 offers v1alpha only: asked after v1's UNIMPLEMENTED
    v1 = GrpcAnswer(
        200, (("content-type", "application/grpc"),), frame(call(servers["v1"], 5)), (("grpc-status", "0"),)
    )
    v2 = GrpcAnswer(
        200, (("content-type", "application/grpc"),), frame(call(servers["v2"], 5)), (("grpc-status", "0"),)
    )
    outcome = compare_grpc(METHOD, v1, v2, EndpointRules(), set(), decoder=decoder)
    assert outcome.mismatched == ["root['user']['display_name']"]
    diff = outcome.differences[0]
    assert (diff.v1, diff.v2) == ('"Ann"', '"Ann B."')


def test_the_fetch_runs_once_in_the_background_and_never_blocks_the_caller(servers: dict[str, str]) -> None:
    async def scenario() -> tuple[Any, Any, Any]:
        source = ReflectionSource([(servers["v1"], None)], timeout=5)
        first = source.decoder(METHOD)  # not fetched yet: the wire format now, a fetch started
        waiting = await asyncio.gather(*(source.resolve(METHOD) for _ in range(5)))  # all on one fetch
        return first, waiting, source.decoder(METHOD)

    first, waiting, later = run(scenario())
    assert first is WIRE
    assert len({id(d) for d in waiting}) == 1 and isinstance(waiting[0], DescriptorDecoder)
    assert later is waiting[0]


def test_a_backend_without_reflection_means_wire_format_logged_once_and_counted(
    servers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    counted = Counted()

    async def scenario() -> list[Any]:
        source = ReflectionSource([(servers["v2"], None), (closed_port(), None)], timeout=5, count=counted)
        found = [await source.resolve(METHOD), await source.resolve(METHOD)]  # the second: not asked again
        found.append(await source.resolve("/strangler.shadowtest.Other/Call"))
        return found

    with caplog.at_level(logging.WARNING, logger="strangler.shadow"):
        found = run(scenario())
    assert found == [WIRE, WIRE, WIRE]
    assert counted == ["reflection_failed", "reflection_failed"]  # one per service, not per call
    warnings = [r for r in caplog.records if "server reflection" in r.getMessage()]
    assert len(warnings) == 1
    assert "127.0.0.1" not in warnings[0].getMessage()  # no backend address in the log


def test_a_v1_without_the_service_falls_through_to_v2(servers: dict[str, str], proto: Compiled) -> None:
    source = ReflectionSource([(closed_port(), None), (servers["v1"], None)], timeout=5)
    assert isinstance(run(source.resolve(METHOD)), DescriptorDecoder)


def test_the_descriptor_set_comes_first_and_reflection_fills_in(servers: dict[str, str]) -> None:
    source = ReflectionSource([(servers["v1"], None)], timeout=5)
    decoding = GrpcDecoding(None, source)
    assert not decoding.safe(METHOD)  # not fetched yet: nothing says the call is a read
    assert isinstance(run(decoding.resolve(METHOD)), DescriptorDecoder)
    assert decoding.safe(METHOD)  # the method's options come through reflection
    assert not decoding.safe("/strangler.shadowtest.Users/RenameUser")
    assert run(decoding.resolve("no/method")) is WIRE


def test_method_paths_from_traffic_never_reach_reflection(servers: dict[str, str]) -> None:
    counted = Counted()
    source = ReflectionSource([(servers["v1"], None)], timeout=5, count=counted)
    hostile: list[Callable[[], Any]] = [
        lambda: source.resolve("/a b/c"),
        lambda: source.resolve("/" + "x" * 5000 + "/M"),
        lambda: source.resolve("//"),
    ]
    for make in hostile:
        assert run(make()) is WIRE
    assert counted == []
