"""Comparing two unary gRPC answers field by field: pure functions, run in the compare thread.

A gRPC answer is an HTTP/2 status, headers, a body of length-prefixed messages (1-byte
compressed flag, 4-byte big-endian length, the message) and trailers (``grpc-status``,
``grpc-message``). ``compare_grpc`` compares, in order:

* the HTTP status and whether both answers are gRPC at all (``status``, ``content-type``);
* ``grpc-status``, ``grpc-message`` (percent-decoded) and ``grpc-status-details-bin``, from the
  trailers or, for a trailers-only answer, the headers;
* headers and trailers named in ``compare_headers`` (``header:<name>``, ``trailer:<name>``);
* the messages: split (``split_messages``: hostile framing gives a named problem, never an
  exception), decoded by a ``MessageDecoder`` into a JSON value and handed to the same diff
  engine as JSON bodies (``proxy.shadow.compare``), so a difference is named
  ``root['user']['display_name']`` with descriptors and ``root['2']['1']`` (field numbers)
  without, and noise calibration (``learn_grpc``) works on protobuf fields as on JSON ones.

This module needs no protobuf runtime: the wire-format decoder is ours. Descriptor decoding
(a FileDescriptorSet or server reflection) lives in ``proxy.shadow.descriptors``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote

import orjson

from proxy.shadow.compare import (
    ITEM_KINDS,
    WHOLE,
    Difference,
    Options,
    Outcome,
    TooLarge,
    classify,
    decode_body,
    deep_differences,
    length_name,
    load_json,
    media_type,
    needs_exact,
    quick_differences,
)
from proxy.shadow.policy import EndpointRules

FRAME_HEADER = 5
MAX_WIRE_DEPTH = 32  # nested messages tried this deep without a schema; deeper: bytes
_MAX_FIELD = (1 << 29) - 1
# status names for reading reports (the numbers are what is compared)
CODE_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip
# trailers always compared (the call's outcome); other metadata only when named in compare_headers
STATUS_FIELDS = ("grpc-status", "grpc-message", "grpc-status-details-bin")
# what went wrong with one answer's body, counted per side (a closed set: metric label values)
PROBLEMS = ("truncated", "malformed", "too_large", "corrupt_compressed", "unknown_encoding", "not_protobuf")
# how one answer's messages were decoded, and reflection failures (the rest of the label values)
DECODED = ("descriptor", "wire", "wire_fallback", "reflection_failed")
_FIELD_NAMES = ("root", "len(root")  # what a learnt noise name may be (message fields)
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# --- answers --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GrpcAnswer:
    """One side of a gRPC comparison. ``body`` is None when it was over the compare limit;
    header and trailer names are lower-case (HTTP/2 sends them so)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    trailers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_raw(
        cls,
        status: int,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes | None,
        trailers: Iterable[tuple[bytes, bytes]] = (),
    ) -> GrpcAnswer:
        """From the h2 client's header and trailer lists."""

        def text(pairs: Iterable[tuple[bytes, bytes]]) -> tuple[tuple[str, str], ...]:
            return tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in pairs)

        return cls(status, text(headers), body, text(trailers))

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def trailer(self, name: str) -> str | None:
        for key, value in self.trailers:
            if key == name:
                return value
        return None

    def status_field(self, name: str) -> str | None:
        """A status trailer, from the trailers or (trailers-only answer) the headers."""
        value = self.trailer(name)
        return value if value is not None else self.header(name)

    @property
    def content_type(self) -> str:
        return self.header("content-type") or ""

    @property
    def encoding(self) -> str:
        return self.header("grpc-encoding") or ""


def is_grpc(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/grpc" or media.startswith("application/grpc+")


def _status_text(value: str | None) -> str:
    if value is None:
        return "<absent>"
    code = value.strip()
    if code.isdigit() and int(code) < len(CODE_NAMES):
        return f"{code} {CODE_NAMES[int(code)]}"
    return code


# --- framing --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frames:
    """The messages of a gRPC body, or what stopped the split (``problem``, one of PROBLEMS).

    With ``unknown_encoding`` the messages are there but still compressed (compared as bytes)."""

    messages: tuple[bytes, ...]
    problem: str = ""
    detail: str = ""


def split_messages(body: bytes, encoding: str, limit: int) -> Frames:
    """Split a gRPC body into its messages, decompressing those flagged compressed.

    Never raises. ``limit`` bounds the messages' total (decoded) size: a frame declaring more is
    refused before any byte of it is touched, and a compressed one stops inflating there."""
    messages: list[bytes] = []
    total = pos = 0
    end = len(body)
    coding = encoding.strip().lower()
    unknown = False
    while pos < end:
        if end - pos < FRAME_HEADER:
            return Frames(tuple(messages), "truncated", f"{end - pos} bytes after message {len(messages)}")
        flag = body[pos]
        length = int.from_bytes(body[pos + 1 : pos + FRAME_HEADER], "big")
        if flag > 1:
            return Frames(tuple(messages), "malformed", f"compressed flag {flag}")
        if length > limit - total:
            return Frames(tuple(messages), "too_large", f"a message of {length} bytes")
        start = pos + FRAME_HEADER
        if start + length > end:
            return Frames(tuple(messages), "truncated", f"{end - start} of {length} bytes")
        message = body[start : start + length]
        pos = start + length
        if flag:
            if coding in ("", "identity"):
                return Frames(tuple(messages), "malformed", "compressed message without grpc-encoding")
            if coding in ("gzip", "deflate"):
                try:
                    message = decode_body(message, coding, limit - total)
                except TooLarge:
                    return Frames(tuple(messages), "too_large", f"{coding} message over {limit} bytes")
                except ValueError:
                    return Frames(tuple(messages), "corrupt_compressed", f"corrupt {coding} message")
            else:
                unknown = True  # snappy, zstd, ...: kept compressed, compared as bytes
        total += len(message)
        messages.append(message)
    if unknown:
        return Frames(tuple(messages), "unknown_encoding", f"grpc-encoding {coding[:40]!r}")
    return Frames(tuple(messages))


# --- decoding -------------------------------------------------------------------------------------


Count = Callable[[str], None]  # called with a PROBLEMS or DECODED name, once per answer side


def _nothing(_: str) -> None:
    return None


class NotDecodable(Exception):
    """This decoder cannot read that message (not protobuf, or not of the expected type)."""


class MessageDecoder(Protocol):
    """Turns one protobuf message into the JSON value the diff engine compares."""

    @property
    def kind(self) -> str:
        """``descriptor`` or ``wire`` (a metric label)."""
        ...

    def decode(self, method: str, data: bytes, response: bool = True) -> Any:
        """``method`` is the call's path ``/pkg.Service/Method``; ``response``: the output type
        (else the input). Raises NotDecodable."""
        ...


class _Bad(Exception):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Bad
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >> 64:
                raise _Bad
            return value, pos
        shift += 7


def _message(data: bytes, depth: int) -> dict[str, Any]:
    """A message without its schema: field number -> value; a number seen twice -> a list."""
    fields: dict[str, Any] = {}
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if not 1 <= number <= _MAX_FIELD:
            raise _Bad
        value: Any
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise _Bad
            value = int.from_bytes(data[pos : pos + size], "little")
            pos += size
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise _Bad
            value = length_delimited(data[pos : pos + length], depth)
            pos += length
        else:  # groups (3, 4: deprecated since proto2) and the unused 6, 7
            raise _Bad
        name = str(number)
        if name not in fields:
            fields[name] = value
        elif isinstance(fields[name], list):  # a value itself is never a list: only repetition
            fields[name].append(value)
        else:
            fields[name] = [fields[name], value]
    return fields


def length_delimited(chunk: bytes, depth: int) -> Any:
    """A nested message if it parses as one, else UTF-8 text without control characters, else
    base64 (as MessageToDict shows bytes). Packed repeated numbers come out as bytes: without the
    schema they cannot be told from a string."""
    if chunk and depth < MAX_WIRE_DEPTH:
        try:
            return _message(chunk, depth + 1)
        except _Bad:
            pass
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(chunk).decode("ascii")
    return text if not _CONTROL.search(text) else base64.b64encode(chunk).decode("ascii")


def decode_wire(data: bytes) -> dict[str, Any]:
    """The schema-less reading of one message; raises NotDecodable when it is not protobuf."""
    try:
        return _message(data, 0)
    except _Bad as exc:
        raise NotDecodable("not a protobuf message") from exc


class WireDecoder:
    """Field numbers and values (varint and fixed as unsigned integers, length-delimited as a
    nested message, text or base64): what can be compared without descriptors."""

    kind = "wire"

    def decode(self, method: str, data: bytes, response: bool = True) -> Any:
        return decode_wire(data)


WIRE = WireDecoder()


class Decoding(Protocol):
    """Which decoder reads a call's messages (``descriptors.GrpcDecoding`` with a descriptor set
    or reflection; ``WireOnly`` without), and ``count``: what ``compare_grpc`` is given to count
    outcomes with (the metric)."""

    count: Count

    def decoder(self, method: str) -> MessageDecoder:
        """Never waits (reflection not fetched yet: the wire format)."""
        ...

    async def resolve(self, method: str) -> MessageDecoder:
        """May wait, bounded, for the service's descriptors (a mirror worker, never the request path)."""
        ...

    def safe(self, method: str) -> bool:
        """Whether the call may be sent to v1 a second time (calibration): its descriptor says
        ``option idempotency_level = NO_SIDE_EFFECTS`` (gRPC's GET). Unknown: False."""
        ...


class WireOnly:
    """No schema configured: every call in wire format."""

    def __init__(self, count: Count | None = None) -> None:
        self.count: Count = count or _nothing

    def decoder(self, method: str) -> MessageDecoder:
        return WIRE

    async def resolve(self, method: str) -> MessageDecoder:
        return WIRE

    def safe(self, method: str) -> bool:
        return False


# --- comparing ------------------------------------------------------------------------------------


def _decoded(
    method: str, a: tuple[bytes, ...], b: tuple[bytes, ...], decoder: MessageDecoder, count: Count
) -> tuple[Any, Any] | None:
    """Both sides' messages decoded by one decoder: the schema's, or (when it cannot read either
    side) the wire format for both, so the two sides always have the same shape of names.
    None when a side is not protobuf at all."""
    for reader in (decoder, WIRE) if decoder.kind != "wire" else (WIRE,):
        try:
            left = [reader.decode(method, m) for m in a]
            right = [reader.decode(method, m) for m in b]
        except NotDecodable:
            continue
        label = reader.kind if reader is decoder else "wire_fallback"
        count(label)
        count(label)
        if len(left) == 1 and len(right) == 1:  # unary: the message is the root
            return left[0], right[0]
        return left, right
    return None


def _to_engine(value: Any) -> tuple[bool, Any]:
    """The decoded message as the engine's JSON value (numbers exact, depth bounded)."""
    try:
        text = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):  # pragma: no cover - decoders give JSON types only
        return False, None
    return load_json(text, needs_exact(text))


def _message_differences(
    method: str,
    a: GrpcAnswer,
    b: GrpcAnswer,
    rules: EndpointRules,
    options: Options,
    decoder: MessageDecoder,
    count: Count,
) -> list[Difference] | None:
    """Differences of the messages; None when they could not be compared (over the limit)."""
    if a.body is None or b.body is None:
        return _over_limit(a.body, b.body, options.max_bytes)
    if a.body == b.body and a.encoding == b.encoding:
        return []  # the same bytes: nothing to split or decode
    left = split_messages(a.body, a.encoding, options.max_bytes)
    right = split_messages(b.body, b.encoding, options.max_bytes)
    for frames in (left, right):
        if frames.problem:
            count(frames.problem)
    if left.problem == "too_large" or right.problem == "too_large":
        return _over_limit(
            None if left.problem == "too_large" else b"".join(left.messages),
            None if right.problem == "too_large" else b"".join(right.messages),
            options.max_bytes,
        )
    if left.problem or right.problem:
        if left.problem == right.problem == "unknown_encoding":
            same = left.messages == right.messages
            return [] if same else [_bytes_difference(left.messages, right.messages)]
        return [_framing_difference(left, right)]
    if len(left.messages) != len(right.messages):
        return [Difference("messages", "changed", str(len(left.messages)), str(len(right.messages)))]
    if left.messages == right.messages:
        return []
    decoded = _decoded(method, left.messages, right.messages, decoder, count)
    if decoded is None:
        count("not_protobuf")
        return [_bytes_difference(left.messages, right.messages)]
    ok_a, value_a = _to_engine(decoded[0])
    ok_b, value_b = _to_engine(decoded[1])
    if not (ok_a and ok_b):  # nested deeper than the engine walks
        return [_bytes_difference(left.messages, right.messages)]
    quick = quick_differences(value_a, value_b, rules)
    return quick if quick is not None else deep_differences(value_a, value_b, rules)


def _over_limit(left: bytes | None, right: bytes | None, limit: int) -> list[Difference] | None:
    """One side over the compare limit: a ``body-size`` difference when the other is far under
    it (as for HTTP bodies), else not compared."""
    small = left if left is not None else right
    if (left is None) != (right is None) and small is not None and len(small) < limit // 2:
        size, over = f"{len(small)} bytes", f"over {limit} bytes"
        return [Difference("body-size", "changed", *((size, over) if left is not None else (over, size)))]
    return None


def _describe(frames: Frames) -> str:
    if frames.problem:
        return f"{frames.problem}: {frames.detail}"
    return f"{len(frames.messages)} message(s)"


def _framing_difference(left: Frames, right: Frames) -> Difference:
    return Difference("body", "changed", _describe(left), _describe(right))


def _bytes_difference(left: tuple[bytes, ...], right: tuple[bytes, ...]) -> Difference:
    return Difference("body", "changed", f"{sum(map(len, left))} bytes", f"{sum(map(len, right))} bytes")


def _metadata_differences(a: GrpcAnswer, b: GrpcAnswer, options: Options) -> list[Difference]:
    found: list[Difference] = []
    for name in STATUS_FIELDS:
        one, two = a.status_field(name), b.status_field(name)
        if name == "grpc-message":  # percent-encoded on the wire (RFC 3986 style)
            one = unquote(one, errors="replace") if one is not None else None
            two = unquote(two, errors="replace") if two is not None else None
        if not one:  # an empty grpc-message (grpcio sends one with OK) says nothing: absent
            one = None
        if not two:
            two = None
        if one == two:
            continue
        if name == "grpc-status":
            found.append(Difference(name, "changed", _status_text(one), _status_text(two)))
        else:
            kind = "changed" if one is not None and two is not None else "added" if one is None else "removed"
            found.append(Difference(name, kind, one or "<absent>", two or "<absent>"))
    for prefix, pick_a, pick_b in (("header", a.header, b.header), ("trailer", a.trailer, b.trailer)):
        for name in options.headers:
            one, two = pick_a(name), pick_b(name)
            if one is not None and two is not None and one.strip() == two.strip():
                continue
            if one is None and two is None:
                continue
            kind = "changed" if one is not None and two is not None else "added" if one is None else "removed"
            found.append(Difference(f"{prefix}:{name}", kind, one or "<absent>", two or "<absent>"))
    return found


def grpc_differences(
    method: str,
    a: GrpcAnswer,
    b: GrpcAnswer,
    rules: EndpointRules,
    options: Options | None = None,
    decoder: MessageDecoder = WIRE,
    count: Count = _nothing,
) -> tuple[list[Difference], bool]:
    """Every difference between two answers to the call ``method`` (v1 first), rules applied; and
    whether the messages were compared (False: one side over the compare limit)."""
    options = options or Options()
    found: list[Difference] = []
    if a.status != b.status:
        found.append(Difference("status", "changed", str(a.status), str(b.status)))
    grpc_a, grpc_b = is_grpc(a.content_type), is_grpc(b.content_type)
    if grpc_a != grpc_b or (not grpc_a and media_type(a.content_type) != media_type(b.content_type)):
        found.append(Difference("content-type", "changed", a.content_type, b.content_type))
    found.extend(_metadata_differences(a, b, options))
    if not (grpc_a and grpc_b):  # not a gRPC answer (a proxy's 502 page, say): bytes only
        if a.body is None or b.body is None:
            over = _over_limit(a.body, b.body, options.max_bytes)
            found.extend(over or ())
            return found, over is not None
        if a.body != b.body:
            found.append(Difference("body", "changed", f"{len(a.body)} bytes", f"{len(b.body)} bytes"))
        return found, True
    messages = _message_differences(method, a, b, rules, options, decoder, count)
    if messages is not None:
        found.extend(messages)
    return found, messages is not None


def compare_grpc(
    method: str,
    a: GrpcAnswer,
    b: GrpcAnswer,
    rules: EndpointRules,
    noisy: frozenset[str] | set[str],
    options: Options | None = None,
    decoder: MessageDecoder = WIRE,
    count: Count = _nothing,
) -> Outcome:
    """v1 answer ``a`` against v2 answer ``b`` of the unary call ``method``; the result is
    ``match``, ``mismatch``, ``noise`` or ``skipped`` as for HTTP (``classify``)."""
    found, compared = grpc_differences(method, a, b, rules, options, decoder, count)
    if noisy:  # only message fields can be noise: never grpc-status, grpc-message, messages, metadata
        noisy = frozenset(name for name in noisy if name.startswith(_FIELD_NAMES))
    return classify(found, noisy, compared)


def quick_compare_grpc(a: GrpcAnswer, b: GrpcAnswer, options: Options | None = None) -> Outcome | None:
    """A match told without splitting or decoding (the same status, metadata and bytes: the
    usual case in a migration), cheap enough for the event loop; else None (``compare_grpc`` in
    the compare thread)."""
    if a.body is None or b.body is None or a.body != b.body or a.encoding != b.encoding:
        return None
    if a.status != b.status or a.content_type != b.content_type:
        return None
    if _metadata_differences(a, b, options or Options()):
        return None
    return Outcome("match")


def sample_text(method: str, answer: GrpcAnswer, decoder: MessageDecoder, limit: int) -> str | None:
    """An answer's messages as JSON text for a mismatch sample (binary protobuf means nothing
    to a reader), cut at ``limit`` characters; the framing problem when there is one."""
    if answer.body is None:
        return None
    frames = split_messages(answer.body, answer.encoding, max(limit, 1) * 64)
    if frames.problem:
        return _describe(frames)[:limit]
    values: list[Any] = []
    for message in frames.messages:
        for reader in (decoder, WIRE):
            try:
                values.append(reader.decode(method, message))
                break
            except NotDecodable:
                continue
        else:
            values.append(f"<{len(message)} bytes, not protobuf>")
    try:
        text = orjson.dumps(values[0] if len(values) == 1 else values).decode()
    except (TypeError, orjson.JSONEncodeError):  # pragma: no cover - decoders give JSON types only
        return None
    return text if len(text) <= limit else text[:limit] + "..."


def learn_grpc(
    method: str,
    first: GrpcAnswer,
    second: GrpcAnswer,
    rules: EndpointRules,
    options: Options | None = None,
    decoder: MessageDecoder = WIRE,
) -> set[str]:
    """Noise candidates from two v1 answers to the same call, by ``learn``'s rule: only two
    successful answers (HTTP 200, grpc-status 0) teach anything, and only a protobuf field whose
    value changed with its type kept (``root['served_at']``) or a repeated field whose length
    changed (``len(root['items'])``); status, metadata, presence and types never are."""
    for answer in (first, second):
        if answer.status != 200 or (answer.status_field("grpc-status") or "").strip() != "0":
            return set()
    if not (is_grpc(first.content_type) and is_grpc(second.content_type)):
        return set()
    found, compared = grpc_differences(method, first, second, rules, options, decoder)
    if not compared:
        return set()
    names: set[str] = set()
    for diff in found:
        if diff.field in WHOLE or not diff.field.startswith("root"):
            continue
        if diff.kind == "changed":
            names.add(diff.field)
        elif diff.kind in ITEM_KINDS:
            names.add(length_name(diff.field))
    return names
