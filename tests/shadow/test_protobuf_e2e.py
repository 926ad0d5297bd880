"""A shadow run over gRPC, end to end: a grpcio client -> the proxy (h2c) -> v1, the unary call
mirrored to v2 over h2, both answers decoded and compared field by field. Real grpcio servers,
the real proxy, real Redis; the report names the differing protobuf field, with noise learnt on
a Timestamp field by calibration (the method is declared NO_SIDE_EFFECTS)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection

from tests.grpc.rawh2 import ANSWER, TRAILERS, RawH2Server
from tests.shadow.helpers import BASE_SHADOW, detail, summary
from tests.shadow.protobuf_support import Compiled, compile_protos
from tests.support import ProxyProcess, wait_until

SHADOW = {
    **BASE_SHADOW,
    "methods": ["POST"],  # a gRPC call is a POST: mirrored only when POST is
    "calibration_percentage": 100,
    "calibration_warmup": 2,
    "noise_threshold": 2,
}


@pytest.fixture(scope="module")
def proto(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return compile_protos(tmp_path_factory)


class Users:
    """A Users service whose answers carry a fresh served_at each call (noise) and the
    version's own display_name (the real difference)."""

    def __init__(
        self, proto: Compiled, display_name: str, first_tick: int, with_reflection: bool = False
    ) -> None:
        pb2 = proto.pb2
        ticks = itertools.count(first_tick)

        class Servicer(proto.grpc.UsersServicer):  # type: ignore[name-defined,misc]
            def GetUser(self, request: Any, context: Any) -> Any:  # noqa: N802 - the generated name
                reply = pb2.GetUserReply(user=pb2.User(id=request.id, name="ann", display_name=display_name))
                reply.user.served_at.FromSeconds(next(ticks))
                return reply

        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        proto.grpc.add_UsersServicer_to_server(Servicer(), self.server)
        if with_reflection:
            names = (pb2.DESCRIPTOR.services_by_name["Users"].full_name, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        self.url = f"http://127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()


@pytest.fixture(scope="module")
def users(proto: Compiled) -> Iterator[tuple[Users, Users]]:
    v1, v2 = Users(proto, "Ann", 1_700_000_000, with_reflection=True), Users(proto, "Ann B.", 1_800_000_000)
    yield v1, v2
    v1.server.stop(0)
    v2.server.stop(0)


def calls(proxy: ProxyProcess, proto: Compiled, count: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
        stub = proto.grpc.UsersStub(channel)
        for user_id in range(count):
            reply, call = stub.GetUser.with_call(proto.pb2.GetUserRequest(id=user_id), timeout=5)
            assert reply.user.display_name == "Ann"  # the client always gets v1's answer
            assert dict(call.initial_metadata())["x-api-version"] == "v1"


def grpc_row(proxy: ProxyProcess, compared: int) -> dict[str, Any] | None:
    for item in summary(proxy)["endpoints"]:
        if "GetUser" in item["endpoint"] and item["compared"] >= compared:
            return dict(item)
    return None


def start(
    proxy_factory: Callable[..., ProxyProcess], users: tuple[Users, Users], redis_url: str, **shadow: Any
) -> ProxyProcess:
    v1, v2 = users
    return proxy_factory(
        v1_url=v1.url, v2_url=v2.url, v1_protocol="h2", v2_protocol="h2", redis_url=redis_url,
        shadow={**SHADOW, **shadow},
    )  # fmt: skip


@pytest.mark.parametrize("source", ["descriptor_set", "reflection"])
def test_a_shadow_run_names_the_differing_protobuf_field(
    proxy_factory: Callable[..., ProxyProcess],
    users: tuple[Users, Users],
    redis_url: str,
    proto: Compiled,
    source: str,
) -> None:
    schema = {"grpc_descriptor_set": str(proto.descriptor_set)} if source == "descriptor_set" else {}
    proxy = start(proxy_factory, users, redis_url, grpc_reflection=source == "reflection", **schema)
    calls(proxy, proto, 6)
    found = wait_until(lambda: grpc_row(proxy, compared=6), timeout=20, interval=0.1, message="6 compared")
    assert (found["mismatched"], found["errors"]) == (6, 0)
    one = detail(proxy, found["endpoint"])
    # the Timestamp varied between two v1 answers in calibration: noise, suppressed; the name is
    # the one difference left, named as the .proto names it
    assert one["fields"] == {"root['user']['display_name']": 6}
    assert one["suppressed"] == {"root['user']['served_at']": 6}
    assert "root['user']['served_at']" in one["noise_fields"]
    sample = one["samples"][0]
    assert {"field": "root['user']['display_name']", "kind": "changed", "v1": '"Ann"', "v2": '"Ann B."'} in (
        sample["diff"]
    )
    assert '"display_name":"Ann B."' in sample["v2_body"]  # the sample shows the decoded message


def test_without_descriptors_the_field_number_is_named(
    proxy_factory: Callable[..., ProxyProcess], users: tuple[Users, Users], redis_url: str, proto: Compiled
) -> None:
    proxy = start(proxy_factory, users, redis_url)
    calls(proxy, proto, 3)
    found = wait_until(lambda: grpc_row(proxy, compared=3), timeout=20, interval=0.1, message="3 compared")
    one = detail(proxy, found["endpoint"])
    # nothing says the call is a read: no calibration, so served_at (field 7) differs too
    assert set(one["fields"]) == {"root['1']['2']", "root['1']['7']['1']"}
    assert found["pending"] == 0


class HostileV2(RawH2Server):
    """A v2 whose answers a grpcio server would never send: ``answer`` is the body it sends (then
    grpc-status 0), or ``reset`` (cut mid-answer)."""

    body = b""

    def _ok(self, h2: Any, stream_id: int) -> None:  # type: ignore[override]
        h2.send_headers(stream_id, ANSWER)
        h2.send_data(stream_id, self.body)
        h2.send_headers(stream_id, TRAILERS, end_stream=True)


@pytest.mark.parametrize(
    ("mode", "body", "outcome", "field", "v2"),
    [
        ("ok", b"\x00\x00\x00\x00\x09ab", "truncated", "body", "truncated: 2 of 9 bytes"),
        ("ok", b"\x00\xff\xff\xff\xff", "too_large", "body-size", "over 1048576 bytes"),
        ("ok", b"\x07\x00\x00\x00\x01a", "malformed", "body", "malformed: compressed flag 7"),
        ("ok", b"\x00\x00\x00\x00\x02\xff\xff", "not_protobuf", "body", "2 bytes"),
        ("reset", b"", "", "", ""),
    ],
)
def test_a_hostile_v2_answer_is_named_counted_and_harmless(
    proxy_factory: Callable[..., ProxyProcess],
    users: tuple[Users, Users],
    redis_url: str,
    proto: Compiled,
    mode: str,
    body: bytes,
    outcome: str,
    field: str,
    v2: str,
) -> None:
    hostile = HostileV2(mode)
    hostile.body = body
    try:
        v1 = users[0]
        proxy = proxy_factory(
            v1_url=v1.url, v2_url=hostile.url, v1_protocol="h2", v2_protocol="h2", redis_url=redis_url,
            shadow={**SHADOW, "grpc_descriptor_set": str(proto.descriptor_set), "calibration_percentage": 0,
                    "calibration_warmup": 0},
        )  # fmt: skip
        calls(proxy, proto, 2)  # the client is served by v1 whatever v2 does
        if mode == "reset":
            errors = {"group": "default", "outcome": "error"}
            wait_until(lambda: proxy.metric("strangler_shadow_requests_total", **errors) == 2, timeout=20)
        else:
            found = wait_until(
                lambda: grpc_row(proxy, compared=2), timeout=20, interval=0.1, message="2 compared"
            )
            one = detail(proxy, found["endpoint"])
            assert one["fields"] == {field: 2}
            assert one["samples"][0]["diff"][-1]["v2"] == v2
            assert proxy.metric("strangler_shadow_grpc_decoding_total", outcome=outcome) == 2
        calls(proxy, proto, 1)  # and keeps serving
    finally:
        hostile.stop()
