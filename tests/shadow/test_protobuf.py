"""Unary gRPC answers compared field by field: real protobuf messages (tests/shadow/protos compiled
at test time), the framing under hostile bodies, descriptors and the wire format, noise learning.
Pure functions: no server (the reflection source has its own file with a real grpcio server)."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.metrics import Metrics
from proxy.settings import ConfigError, Settings, load_settings
from proxy.shadow.capability import grpc_decoding
from proxy.shadow.compare import Options, is_noisy
from proxy.shadow.descriptors import DescriptorDecoder, GrpcDecoding, load_descriptor_set
from proxy.shadow.policy import EndpointRules, RuleSet, make_rule
from proxy.shadow.protobuf import (
    WIRE,
    GrpcAnswer,
    NotDecodable,
    WireOnly,
    compare_grpc,
    decode_wire,
    grpc_differences,
    learn_grpc,
    quick_compare_grpc,
    sample_text,
    split_messages,
)
from tests.shadow.protobuf_support import Compiled, compile_protos, frame

METHOD = "/strangler.shadowtest.Users/GetUser"
GRPC = (("content-type", "application/grpc"),)
OK = (("grpc-status", "0"),)


@pytest.fixture(scope="module")
def proto(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return compile_protos(tmp_path_factory)


@pytest.fixture(scope="module")
def schema(proto: Compiled) -> DescriptorDecoder:
    return DescriptorDecoder(load_descriptor_set(proto.descriptor_set))


def reply(proto: Compiled, **user: Any) -> bytes:
    served = user.pop("served_at", None)
    message = proto.pb2.GetUserReply(user=proto.pb2.User(**user), generation=7)
    if served is not None:
        message.user.served_at.FromSeconds(served)
    return bytes(message.SerializeToString())


def answer(
    body: bytes | None,
    trailers: tuple[tuple[str, str], ...] = OK,
    headers: tuple[tuple[str, str], ...] = GRPC,
    status: int = 200,
) -> GrpcAnswer:
    return GrpcAnswer(status, headers, body, trailers)


def fields(a: GrpcAnswer, b: GrpcAnswer, decoder: Any = WIRE, **kw: Any) -> list[str]:
    return sorted(
        {d.field for d in grpc_differences(METHOD, a, b, EndpointRules(), decoder=decoder, **kw)[0]}
    )


class Counted(list[str]):
    def __call__(self, outcome: str) -> None:
        self.append(outcome)


# --- framing --------------------------------------------------------------------------------------


def test_a_body_splits_into_its_messages() -> None:
    assert split_messages(frame(b"a", b"", b"bc"), "", 100).messages == (b"a", b"", b"bc")
    assert split_messages(b"", "", 100).messages == ()


@pytest.mark.parametrize(
    ("body", "encoding", "problem"),
    [
        (b"\x00\x00\x00", "", "truncated"),  # a frame header cut short
        (b"\x00\x00\x00\x00\x09abc", "", "truncated"),  # a message cut short
        (frame(b"ok") + b"\x00\x00", "", "truncated"),  # garbage after a whole message
        (b"\x07\x00\x00\x00\x01a", "", "malformed"),  # a flag that is neither 0 nor 1
        (frame(b"x", compressed=True), "", "malformed"),  # compressed, no grpc-encoding said how
        (frame(b"x", compressed=True), "identity", "malformed"),
        (b"\x00\xff\xff\xff\xff", "", "too_large"),  # declares 4 GB: refused before reading it
        (b"\x01\x00\x00\x00\x05hello", "gzip", "corrupt_compressed"),
        (frame(b"x" * 5000, compressed=True), "gzip", "too_large"),  # a small gzip, inflating past
        (frame(b"abc", compressed=True), "snappy", "unknown_encoding"),
    ],
)
def test_hostile_framing_is_a_named_problem_never_an_exception(
    body: bytes, encoding: str, problem: str
) -> None:
    assert split_messages(body, encoding, 1000).problem == problem


def test_gzip_and_deflate_messages_are_decompressed_within_the_limit() -> None:
    assert split_messages(frame(b"hello", compressed=True), "gzip", 100).messages == (b"hello",)
    deflated = zlib.compress(b"hello")
    body = b"\x01" + len(deflated).to_bytes(4, "big") + deflated
    assert split_messages(body, "deflate", 100).messages == (b"hello",)
    bomb = frame(b"\0" * 10_000_000, compressed=True)  # 10 MB of zeros in about 10 KB
    assert len(bomb) < 20_000
    assert split_messages(bomb, "gzip", 1_000_000).problem == "too_large"


def test_an_answer_is_built_from_the_h2_clients_lists() -> None:
    built = GrpcAnswer.from_raw(
        200,
        [(b"Content-Type", b"application/grpc")],
        b"",
        [(b"grpc-status", b"3"), (b"grpc-message", b"bad")],
    )
    assert built.content_type == "application/grpc"
    assert (built.status_field("grpc-status"), built.status_field("grpc-message")) == ("3", "bad")


def test_unknown_encoding_is_compared_as_bytes(proto: Compiled) -> None:
    zipped = ("grpc-encoding", "snappy")
    a = answer(frame(b"abc", compressed=True), headers=(*GRPC, zipped))
    same = answer(frame(b"abc", compressed=True) + b"", headers=(*GRPC, zipped))
    other = answer(frame(b"abd", compressed=True), headers=(*GRPC, zipped))
    assert compare_grpc(METHOD, a, same, EndpointRules(), set()).result == "match"
    outcome = compare_grpc(METHOD, a, other, EndpointRules(), set())
    assert outcome.mismatched == ["body"]


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=64), encoding=st.sampled_from(["", "gzip", "deflate", "zstd", "identity"]))
def test_any_body_gives_an_outcome_never_an_exception(body: bytes, encoding: str) -> None:
    frames = split_messages(body, encoding, 32)
    if not frames.problem and encoding in ("", "identity"):
        assert frame(*frames.messages) == body  # every byte accounted for: nothing skipped or invented
    headers = (*GRPC, ("grpc-encoding", encoding))
    outcome = compare_grpc(
        METHOD, answer(body, headers=headers), answer(b"", headers=headers), EndpointRules(), set()
    )
    assert outcome.result in ("match", "mismatch", "skipped")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_the_wire_decoder_reads_or_refuses_any_bytes(data: bytes) -> None:
    try:
        decoded = decode_wire(data)
    except NotDecodable:
        return
    assert isinstance(decoded, dict)


@settings(max_examples=300, deadline=None)
@given(left=st.binary(max_size=80), right=st.binary(max_size=80))
def test_any_message_bytes_compare_with_the_schema_without_an_exception(
    left: bytes, right: bytes, schema: DescriptorDecoder
) -> None:
    counted = Counted()
    outcome = compare_grpc(
        METHOD,
        answer(frame(left)),
        answer(frame(right)),
        EndpointRules(),
        set(),
        decoder=schema,
        count=counted,
    )
    assert outcome.result in ("match", "mismatch")
    assert set(counted) <= {"descriptor", "wire_fallback", "not_protobuf"}


def test_a_value_json_cannot_show_falls_back_to_the_wire_format(
    proto: Compiled, schema: DescriptorDecoder
) -> None:
    far = proto.pb2.GetUserReply()
    far.user.served_at.seconds = 10**12  # past year 9999: MessageToDict refuses it
    counted = Counted()
    a, b = answer(frame(far.SerializeToString())), answer(frame(reply(proto, name="x")))
    outcome = compare_grpc(METHOD, a, b, EndpointRules(), set(), decoder=schema, count=counted)
    assert counted == ["wire_fallback", "wire_fallback"]
    assert "root['1']['7']" in outcome.mismatched


def test_deeply_nested_length_delimited_bytes_stay_bounded() -> None:
    nested = b""
    for _ in range(2000):  # 2000 levels of field 1 holding the next level
        nested = b"\x0a" + _varint(len(nested)) + nested
    decoded = decode_wire(nested)
    depth = 0
    while isinstance(decoded, dict):
        decoded = decoded["1"]
        depth += 1
    assert depth <= 33  # MAX_WIRE_DEPTH levels as messages, the rest as bytes (base64)
    a, b = answer(frame(nested)), answer(frame(nested[:-1] + b"\x01"))
    assert compare_grpc(METHOD, a, b, EndpointRules(), set()).result == "mismatch"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def test_hostile_bodies_are_named_and_counted(proto: Compiled) -> None:
    good = answer(frame(reply(proto, name="ann")))
    counted = Counted()
    outcome = compare_grpc(
        METHOD, good, answer(b"\x00\x00\x00\x00\x09ab"), EndpointRules(), set(), count=counted
    )
    assert outcome.result == "mismatch"
    assert outcome.differences[0].field == "body"
    assert outcome.differences[0].v2 == "truncated: 2 of 9 bytes"
    assert counted == ["truncated"]
    counted.clear()
    junk = answer(frame(b"\xff\xff\xff"))  # not protobuf at all: compared as bytes
    outcome = compare_grpc(METHOD, good, junk, EndpointRules(), set(), count=counted)
    assert outcome.mismatched == ["body"]
    assert counted == ["not_protobuf"]


def test_hostile_bodies_count_in_the_metric(proto: Compiled) -> None:
    metrics = Metrics()
    decoding = grpc_decoding(Settings(v1_url="http://127.0.0.1:1", v2_url="http://127.0.0.1:2"), metrics)
    good = answer(frame(reply(proto, name="ann")))
    for hostile in (b"\x00\x00", b"\x00\xff\xff\xff\xff", frame(b"\xff"), frame(reply(proto, name="bob"))):
        compare_grpc(
            METHOD, good, answer(hostile), EndpointRules(), set(), decoder=WIRE, count=decoding.count
        )

    def value(outcome: str) -> float | None:
        return metrics.registry.get_sample_value("strangler_shadow_grpc_decoding_total", {"outcome": outcome})

    assert (value("truncated"), value("too_large"), value("not_protobuf"), value("wire")) == (1, 1, 1, 2)


def test_an_answer_over_the_compare_limit_is_skipped_or_a_size_difference(proto: Compiled) -> None:
    small = answer(frame(reply(proto, name="ann")))
    options = Options(max_bytes=1000)
    huge = answer(b"\x00\x00\x10\x00\x00" + b"\x00" * 10)  # declares 1 MB
    assert compare_grpc(METHOD, small, huge, EndpointRules(), set(), options).mismatched == ["body-size"]
    assert (
        compare_grpc(METHOD, answer(None), answer(None), EndpointRules(), set(), options).result == "skipped"
    )


# --- decoding -------------------------------------------------------------------------------------


def test_with_descriptors_a_difference_names_the_protobuf_field(
    proto: Compiled, schema: DescriptorDecoder
) -> None:
    v1 = answer(frame(reply(proto, name="ann", display_name="Ann", tags=["a"])))
    v2 = answer(frame(reply(proto, name="ann", display_name="Ann B.", tags=["a", "b"])))
    outcome = compare_grpc(METHOD, v1, v2, EndpointRules(), set(), decoder=schema)
    assert outcome.result == "mismatch"
    assert sorted(outcome.mismatched) == ["root['user']['display_name']", "root['user']['tags'][*]"]
    changed = next(d for d in outcome.differences if d.field == "root['user']['display_name']")
    assert (changed.kind, changed.v1, changed.v2) == ("changed", '"Ann"', '"Ann B."')


def test_without_descriptors_a_difference_names_the_field_number(proto: Compiled) -> None:
    v1 = answer(frame(reply(proto, name="ann", display_name="Ann", address=proto.pb2.Address(zip=1000))))
    v2 = answer(frame(reply(proto, name="ann", display_name="Ann B.", address=proto.pb2.Address(zip=1001))))
    outcome = compare_grpc(METHOD, v1, v2, EndpointRules(), set(), decoder=WIRE)
    assert sorted(outcome.mismatched) == ["root['1']['2']", "root['1']['5']['2']"]


def test_int64_stays_exact_and_is_compared_as_text(proto: Compiled, schema: DescriptorDecoder) -> None:
    v1 = answer(frame(reply(proto, id=2**63 - 1)))
    v2 = answer(frame(reply(proto, id=2**63 - 2)))
    diff = compare_grpc(METHOD, v1, v2, EndpointRules(), set(), decoder=schema).differences
    assert [(d.field, d.v1, d.v2) for d in diff] == [
        ("root['user']['id']", '"9223372036854775807"', '"9223372036854775806"')
    ]
    wire = compare_grpc(METHOD, v1, v2, EndpointRules(), set()).differences  # wire: exact numbers
    assert [(d.field, d.v1, d.v2) for d in wire] == [
        ("root['1']['3']", "9223372036854775807", "9223372036854775806")
    ]


def test_a_default_value_sent_or_omitted_is_the_same_answer(
    proto: Compiled, schema: DescriptorDecoder
) -> None:
    plain = reply(proto, name="ann")
    explicit_zero = plain + b"\x10\x00"  # generation = 0 written out (proto3 omits it; both valid)
    assert plain != explicit_zero
    outcome = compare_grpc(
        METHOD, answer(frame(plain)), answer(frame(explicit_zero)), EndpointRules(), set(), decoder=schema
    )
    # generation was 7 in plain, and the later 0 wins (last value wins): a changed value, named
    assert outcome.mismatched == ["root['generation']"]
    zero = proto.pb2.GetUserReply(user=proto.pb2.User(name="ann")).SerializeToString()
    outcome = compare_grpc(
        METHOD, answer(frame(zero)), answer(frame(zero + b"\x10\x00")), EndpointRules(), set(), decoder=schema
    )
    assert outcome.result == "match"


def test_a_field_the_schema_does_not_know_is_kept_by_number(
    proto: Compiled, schema: DescriptorDecoder
) -> None:
    base = reply(proto, name="ann")
    ahead = base + b"\x62\x03new"  # field 12, length-delimited: a v2 ahead of the descriptor set
    outcome = compare_grpc(
        METHOD, answer(frame(base)), answer(frame(ahead)), EndpointRules(), set(), decoder=schema
    )
    assert outcome.mismatched == ["root['12']"]
    assert outcome.differences[0].kind == "added"


def test_a_message_the_schema_cannot_read_falls_back_to_the_wire_format_for_both(
    proto: Compiled, schema: DescriptorDecoder
) -> None:
    good = reply(proto, name="ann")
    bad_utf8 = b"\x0a\x03" + b"\x0a\x01\xff"  # user.name = b"\xff": proto3 strings must be UTF-8
    counted = Counted()
    outcome = compare_grpc(
        METHOD,
        answer(frame(good)),
        answer(frame(bad_utf8)),
        EndpointRules(),
        set(),
        decoder=schema,
        count=counted,
    )
    assert sorted(outcome.mismatched) == [
        "root['1']['1']",
        "root['2']",
    ]  # field numbers on both sides, never mixed
    assert counted == ["wire_fallback", "wire_fallback"]
    # a known field sent with another wire type is an unknown field to protobuf: kept by number
    wrong_type = good + b"\x08\x05"
    assert fields(answer(frame(good)), answer(frame(wrong_type)), schema) == ["root['1']"]
    counted.clear()
    compare_grpc(
        METHOD,
        answer(frame(good)),
        answer(frame(reply(proto))),
        EndpointRules(),
        set(),
        decoder=schema,
        count=counted,
    )
    assert counted == ["descriptor", "descriptor"]


def test_an_unknown_method_is_decoded_in_wire_format(proto: Compiled, schema: DescriptorDecoder) -> None:
    with pytest.raises(NotDecodable):
        schema.decode("/other.Service/Call", reply(proto, name="x"))
    with pytest.raises(NotDecodable):
        schema.decode("not a method path", reply(proto, name="x"))
    a, b = answer(frame(reply(proto, name="a"))), answer(frame(reply(proto, name="b")))
    assert fields(a, b, schema) == ["root['user']['name']"]
    other = grpc_differences("/other.Service/Call", a, b, EndpointRules(), decoder=schema)[0]
    assert [d.field for d in other] == ["root['1']['1']"]


def test_ignore_rules_apply_to_protobuf_fields(proto: Compiled, schema: DescriptorDecoder) -> None:
    rules = RuleSet((make_rule("exclude_path", None, "root['user']['display_name']"),)).for_endpoint("x")
    a = answer(frame(reply(proto, name="a", display_name="A")))
    b = answer(frame(reply(proto, name="a", display_name="B")))
    assert compare_grpc(METHOD, a, b, rules, set(), decoder=schema).result == "match"


def test_a_sample_shows_the_decoded_message(proto: Compiled, schema: DescriptorDecoder) -> None:
    body = answer(frame(reply(proto, name="ann")))
    assert sample_text(METHOD, body, schema, 2048) == (
        '{"user":{"name":"ann","display_name":"","id":"0","tags":[],"visits":0,"score":0.0,'
        '"avatar":"","role":"ROLE_UNSPECIFIED","past":[]},"generation":"7"}'
    )
    assert sample_text(METHOD, body, WIRE, 20) == '{"1":{"1":"ann"},"2"...'
    assert sample_text(METHOD, answer(b"\x00\x00"), WIRE, 100) == "truncated: 2 bytes after message 0"
    assert sample_text(METHOD, answer(frame(b"\xff")), WIRE, 100) == '"<1 bytes, not protobuf>"'


# --- status and metadata --------------------------------------------------------------------------


def test_status_and_message_are_compared_by_name(proto: Compiled) -> None:
    body = frame(reply(proto, name="ann"))
    failed = answer(b"", trailers=(("grpc-status", "14"), ("grpc-message", "backend%20down")))
    outcome = compare_grpc(METHOD, answer(body), failed, EndpointRules(), set())
    diffs = {d.field: (d.v1, d.v2) for d in outcome.differences}
    assert diffs["grpc-status"] == ("0 OK", "14 UNAVAILABLE")
    assert diffs["grpc-message"] == ("<absent>", "backend down")  # percent-decoded
    assert diffs["messages"] == ("1", "0")


def test_a_trailers_only_answer_equals_the_same_status_in_trailers() -> None:
    trailers_only = GrpcAnswer(200, (*GRPC, ("grpc-status", "5"), ("grpc-message", "no such user")), b"")
    with_trailers = answer(b"", trailers=(("grpc-status", "5"), ("grpc-message", "no%20such%20user")))
    assert compare_grpc(METHOD, trailers_only, with_trailers, EndpointRules(), set()).result == "match"
    empty = answer(b"", trailers=(("grpc-status", "0"), ("grpc-message", "")))
    assert compare_grpc(METHOD, empty, answer(b""), EndpointRules(), set()).result == "match"
    missing = answer(b"", trailers=())
    assert compare_grpc(METHOD, trailers_only, missing, EndpointRules(), set()).mismatched == [
        "grpc-status",
        "grpc-message",
    ]


def test_http_status_content_type_and_configured_metadata(proto: Compiled) -> None:
    body = frame(reply(proto, name="ann"))
    html = answer(
        b"<html>bad gateway</html>", trailers=(), headers=(("content-type", "text/html"),), status=502
    )
    assert fields(answer(body), html) == ["body", "content-type", "grpc-status", "status"]
    options = Options(headers=("x-shard",))
    a = answer(body, trailers=(*OK, ("x-shard", "1")))
    b = answer(body, trailers=(*OK, ("x-shard", "2")))
    assert fields(a, b, options=options) == ["trailer:x-shard"]
    assert fields(a, b) == []  # only what compare_headers names


def test_the_quick_path_only_tells_identical_answers(proto: Compiled) -> None:
    body = frame(reply(proto, name="ann"))
    quick = quick_compare_grpc(answer(body), answer(body))
    assert quick is not None and quick.result == "match"
    assert quick_compare_grpc(answer(body), answer(frame(reply(proto, name="bob")))) is None
    assert quick_compare_grpc(answer(body), answer(body, trailers=(("grpc-status", "2"),))) is None


# --- noise ----------------------------------------------------------------------------------------


def test_a_timestamp_field_is_learnt_as_noise_and_then_suppressed(
    proto: Compiled, schema: DescriptorDecoder
) -> None:
    first = answer(frame(reply(proto, name="ann", visits=0, served_at=1_700_000_000)))
    second = answer(frame(reply(proto, name="ann", visits=3, served_at=1_700_000_005)))
    learnt = learn_grpc(METHOD, first, second, EndpointRules(), decoder=schema)
    # visits went 0 -> 3: printed with its default, it is a changed value (learnable), not "added"
    assert learnt == {"root['user']['served_at']", "root['user']['visits']"}
    v2 = answer(frame(reply(proto, name="ann", display_name="x", visits=1, served_at=1_700_000_009)))
    outcome = compare_grpc(METHOD, first, v2, EndpointRules(), learnt, decoder=schema)
    assert outcome.result == "mismatch"
    assert outcome.mismatched == ["root['user']['display_name']"]
    assert sorted(outcome.suppressed) == ["root['user']['served_at']", "root['user']['visits']"]
    only_noise = answer(frame(reply(proto, name="ann", served_at=1_700_000_042)))
    assert compare_grpc(METHOD, first, only_noise, EndpointRules(), learnt, decoder=schema).result == "noise"


def test_the_same_noise_is_learnt_by_field_number_without_descriptors(proto: Compiled) -> None:
    first = answer(frame(reply(proto, name="ann", served_at=1_700_000_000)))
    second = answer(frame(reply(proto, name="ann", served_at=1_700_000_005)))
    assert learn_grpc(METHOD, first, second, EndpointRules()) == {"root['1']['7']['1']"}


def test_failed_or_odd_answers_teach_nothing(proto: Compiled, schema: DescriptorDecoder) -> None:
    ok = answer(frame(reply(proto, name="a", served_at=1)))
    failed = answer(frame(reply(proto, name="a", served_at=2)), trailers=(("grpc-status", "13"),))
    assert learn_grpc(METHOD, ok, failed, EndpointRules(), decoder=schema) == set()
    truncated = answer(frame(reply(proto, name="a", served_at=2))[:-2])
    assert learn_grpc(METHOD, ok, truncated, EndpointRules(), decoder=schema) == set()
    # a status is never noise, whatever Redis says was learnt
    outcome = compare_grpc(METHOD, ok, failed, EndpointRules(), {"grpc-status", "root['1']"})
    assert outcome.mismatched == ["grpc-status"]
    assert not is_noisy(outcome.differences[0], {"root['1']"})


# --- configuration --------------------------------------------------------------------------------


def test_a_bad_descriptor_set_is_a_config_error_at_start(proto: Compiled, tmp_path: Any) -> None:
    def build(**shadow: Any) -> Any:
        settings = Settings(v1_url="http://127.0.0.1:1", v2_url="http://127.0.0.1:2", shadow=shadow)
        return grpc_decoding(settings, Metrics())

    assert isinstance(build(), WireOnly)
    assert isinstance(build(grpc_descriptor_set=proto.descriptor_set), GrpcDecoding)
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff\xff\xff")
    with pytest.raises(ConfigError, match="missing.pb is not a file"):  # refused when loading settings
        load_settings(None, {}, shadow={"grpc_descriptor_set": str(tmp_path / "missing.pb")})
    for path, reason in [
        (junk, "not a FileDescriptorSet"),
        (proto.bare_set, "--include_imports"),
    ]:
        with pytest.raises(ConfigError, match=reason):
            build(grpc_descriptor_set=path)


def test_only_calls_declared_without_side_effects_may_be_calibrated(schema: DescriptorDecoder) -> None:
    decoding = GrpcDecoding(schema, None)
    assert decoding.safe(METHOD)  # option idempotency_level = NO_SIDE_EFFECTS
    assert not decoding.safe("/strangler.shadowtest.Users/RenameUser")
    assert not decoding.safe("/strangler.shadowtest.Users/Nope")
    assert not decoding.safe("/other.Service/Call")
    assert not WireOnly().safe(METHOD)  # without descriptors nothing says a call is a read


def test_the_decoding_picks_the_descriptor_set_then_the_wire_format(
    proto: Compiled, schema: DescriptorDecoder
) -> None:
    decoding = GrpcDecoding(schema, None)
    assert decoding.decoder(METHOD) is schema
    assert decoding.decoder("/other.Service/Call") is WIRE
    assert decoding.decoder("/../etc") is WIRE


def test_gzip_compressed_answers_are_compared_by_field(proto: Compiled, schema: DescriptorDecoder) -> None:
    zipped = (*GRPC, ("grpc-encoding", "gzip"))
    a = answer(frame(reply(proto, name="a"), compressed=True), headers=zipped)
    b = answer(frame(reply(proto, name="b")))  # one side compressed, the other not: same fields
    assert fields(a, b, schema) == ["root['user']['name']"]
    assert gzip.decompress(a.body[5:]) == reply(proto, name="a")  # type: ignore[index]
