"""Protobuf schemas for the shadow's gRPC comparison: a FileDescriptorSet file, or the v1
backend's server reflection; without either the answers are compared in wire format.

Needs the ``protobuf`` package (and ``grpcio`` with ``grpcio-reflection`` for reflection); only
imported when ``shadow.grpc_descriptor_set`` or ``shadow.grpc_reflection`` is set, so a proxy that
does not decode gRPC by name does not need them.

Reflection never runs on the request path: a service's descriptors are fetched once, in a thread
(``asyncio.to_thread``; a blocking grpcio channel is fine there), bounded by a timeout, by the
first mirrored call that needs them; calls made meanwhile and after a failure are compared in
wire format (``resolve`` lets a mirror worker wait for the fetch instead). A failure is logged
once per process and counted (``reflection_failed``); the service is tried again after
``RETRY_SECONDS``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError

from proxy.shadow.protobuf import WIRE, Count, MessageDecoder, NotDecodable, length_delimited

log = logging.getLogger("strangler.shadow")

_METHOD = re.compile(r"/([A-Za-z_][A-Za-z0-9_.]{0,200})/([A-Za-z_][A-Za-z0-9_]{0,200})")
MAX_METHODS = 1_000  # message classes cached per decoder (method paths come from traffic)
MAX_SERVICES = 100  # services reflection is asked about per process (service names come from traffic)
MAX_FILES = 500  # files one service's descriptors may span
RETRY_SECONDS = 300.0
REFLECTION_APIS = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")


def split_method(path: str) -> tuple[str, str] | None:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``); None for anything else."""
    match = _METHOD.fullmatch(path)
    return (match.group(1), match.group(2)) if match else None


# --- descriptor sets ------------------------------------------------------------------------------


def pool_from_files(files: Iterable[Any]) -> Any:
    """A DescriptorPool of these FileDescriptorProtos, added dependencies first (in whatever
    order they came). Raises ValueError naming a missing import or a bad file."""
    pending = {f.name: f for f in files}
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    while pending:
        ready = [f for f in pending.values() if all(dep in added for dep in f.dependency)]
        if not ready:
            missing = sorted({d for f in pending.values() for d in f.dependency if d not in pending} - added)
            raise ValueError(
                f"imports missing from the descriptor set: {', '.join(missing) or 'an import cycle'} "
                "(make it with protoc --include_imports)"
            )
        for proto in ready:
            try:
                pool.Add(proto)
            except (TypeError, ValueError, KeyError) as exc:
                raise ValueError(f"{proto.name}: {exc}") from exc
            added.add(proto.name)
            del pending[proto.name]
    return pool


def load_descriptor_set(path: Path) -> Any:
    """The pool of a ``protoc --descriptor_set_out --include_imports`` file; ValueError says why not."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    except DecodeError as exc:
        raise ValueError(f"{path} is not a FileDescriptorSet ({exc})") from exc
    if not files:
        raise ValueError(f"{path} holds no .proto file")
    return pool_from_files(files)


# --- decoding by name -----------------------------------------------------------------------------


class DescriptorDecoder:
    """Messages decoded with their schema into MessageToDict's JSON: proto field names
    (``preserving_proto_field_name``), enums by name, 64-bit integers as strings (MessageToDict's
    choice, kept: exact, and compared as text), bytes as base64. Fields without presence are
    printed with their default (``always_print_fields_with_no_presence``): proto3 cannot tell 0
    from absent, so both print ``0`` alike, and a value moving between 0 and 5 is a *changed*
    value (which noise calibration can learn) rather than a field added or removed (which it
    never learns). Fields the schema does not know (a v2 ahead of it) are kept, by number."""

    kind = "descriptor"

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._classes: dict[tuple[str, bool], Any] = {}

    def knows(self, service: str) -> bool:
        try:
            self._pool.FindServiceByName(service)
        except KeyError:
            return False
        return True

    def safe(self, method: str) -> bool:
        """The method is declared ``idempotency_level = NO_SIDE_EFFECTS``."""
        parts = split_method(method)
        if parts is None:
            return False
        try:
            rpc = self._pool.FindServiceByName(parts[0]).methods_by_name.get(parts[1])
        except KeyError:
            return False
        if rpc is None:
            return False
        return bool(rpc.GetOptions().idempotency_level == descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS)

    def message_class(self, method: str, response: bool = True) -> Any:
        """The generated class of the call's output (or input) type; None for an unknown method."""
        key = (method, response)
        if key in self._classes:
            return self._classes[key]
        found = None
        parts = split_method(method)
        if parts is not None:
            try:
                service = self._pool.FindServiceByName(parts[0])
            except KeyError:
                service = None
            rpc = service.methods_by_name.get(parts[1]) if service is not None else None
            if rpc is not None:
                found = message_factory.GetMessageClass(rpc.output_type if response else rpc.input_type)
        if len(self._classes) < MAX_METHODS:
            self._classes[key] = found
        return found

    def decode(self, method: str, data: bytes, response: bool = True) -> Any:
        cls = self.message_class(method, response)
        if cls is None:
            raise NotDecodable(f"no descriptor for {method[:200]}")
        message = cls()
        try:
            message.ParseFromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:  # upb: DecodeError; recursion: RuntimeError
            raise NotDecodable(f"not a {cls.DESCRIPTOR.full_name}") from exc
        try:
            value = json_format.MessageToDict(
                message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
            _add_unknown(message, value, 0)
        except (ValueError, TypeError, KeyError, RecursionError, json_format.Error) as exc:
            # a value JSON has no form for: a Timestamp past year 9999, a Duration over 10,000 years
            raise NotDecodable(f"{cls.DESCRIPTOR.full_name} has no JSON form: {str(exc)[:200]}") from exc
        return value


def _add_unknown(message: Any, value: Any, depth: int) -> None:
    """Fields the schema does not know, added to the message's dict by number (as the wire
    decoder names them), in this message and the messages under it."""
    if not isinstance(value, dict) or depth > 100:
        return
    from google.protobuf.unknown_fields import UnknownFieldSet

    unknown = UnknownFieldSet(message)
    for index in range(len(unknown)):
        item = unknown[index]
        data = item.data
        if item.wire_type == 2:
            data = length_delimited(data, 0)
        elif not isinstance(data, int):  # a group: deprecated; named, not walked
            data = "<group>"
        name = str(item.field_number)
        if name not in value:
            value[name] = data
        elif isinstance(value[name], list):
            value[name].append(data)
        else:
            value[name] = [value[name], data]
    for field, sub in message.ListFields():
        kind = field.message_type
        if kind is None or kind.GetOptions().map_entry or field.name not in value:
            continue
        target = value[field.name]
        if field.is_repeated:
            if isinstance(target, list):
                for item_message, item_value in zip(sub, target, strict=False):
                    _add_unknown(item_message, item_value, depth + 1)
        else:
            _add_unknown(sub, target, depth + 1)


# --- server reflection ----------------------------------------------------------------------------


def fetch_files(address: str, credentials: Any, service: str, timeout: float) -> list[Any]:
    """The FileDescriptorProtos defining ``service`` and everything it imports, asked of a
    backend's server reflection (v1, else v1alpha). Blocking: run it in a thread. Raises
    LookupError (the backend does not know it), TimeoutError or grpc.RpcError."""
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2

    deadline = time.monotonic() + timeout
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    try:
        for api in REFLECTION_APIS:
            call = channel.stream_stream(
                f"/{api}/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )

            try:
                first = _ask(call, deadline, timeout, file_containing_symbol=service)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    continue  # an older server: v1alpha only
                raise
            files: dict[str, Any] = {}
            queue = first
            while queue:
                for raw in queue:
                    proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
                    files.setdefault(proto.name, proto)
                missing = sorted({d for f in files.values() for d in f.dependency} - set(files))
                if len(files) + len(missing) > MAX_FILES:
                    raise LookupError(f"{service} spans over {MAX_FILES} files")
                queue = [
                    raw for name in missing for raw in _ask(call, deadline, timeout, file_by_filename=name)
                ]
            return list(files.values())
        raise LookupError("the backend offers no server reflection")
    finally:
        channel.close()


def _ask(call: Any, deadline: float, timeout: float, **what: str) -> list[bytes]:
    """One reflection request on its own stream; the serialized files it answers."""
    from grpc_reflection.v1alpha import reflection_pb2

    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"reflection took over {timeout} s")
    request = reflection_pb2.ServerReflectionRequest(**what)
    answer = next(iter(call(iter([request]), timeout=left)))
    if answer.HasField("error_response"):
        raise LookupError(answer.error_response.error_message[:200])
    return list(answer.file_descriptor_response.file_descriptor_proto)


def reflection_target(url: str, ca_file: Path | None) -> tuple[str, Any]:
    """(address, credentials or None) for a grpcio channel to a backend URL."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not secure:
        return address, None
    import grpc

    roots = ca_file.read_bytes() if ca_file is not None else None
    return address, grpc.ssl_channel_credentials(root_certificates=roots)


def _nothing(_: str) -> None:
    return None


class ReflectionSource:
    """Per service: a DescriptorDecoder once its descriptors were fetched, else WIRE."""

    def __init__(
        self,
        targets: list[tuple[str, Any]],
        timeout: float,
        count: Count = _nothing,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._targets = targets  # (address, credentials): v1 first, then v2
        self._timeout = timeout
        self._count = count
        self._clock = clock
        self._ready: dict[str, DescriptorDecoder] = {}
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self._failed: dict[str, float] = {}  # service -> when it may be tried again
        self._logged = False

    def decoder(self, method: str) -> MessageDecoder:
        """Never waits: the service's decoder, or WIRE (a fetch is started when none ran yet)."""
        parts = split_method(method)
        if parts is None:
            return WIRE
        ready = self._ready.get(parts[0])
        if ready is not None:
            return ready
        self._start(parts[0])
        return WIRE

    async def resolve(self, method: str) -> MessageDecoder:
        """The service's decoder, waiting (at most the timeout) for a fetch in flight or started."""
        parts = split_method(method)
        if parts is None:
            return WIRE
        service = parts[0]
        if service not in self._ready:
            task = self._start(service)
            if task is not None:
                await asyncio.shield(task)
        return self._ready.get(service, WIRE)

    def _start(self, service: str) -> asyncio.Task[None] | None:
        task = self._fetching.get(service)
        if task is not None:
            return task
        if self._failed.get(service, 0.0) > self._clock():
            return None
        if len(self._ready) + len(self._failed) + len(self._fetching) >= MAX_SERVICES:
            if service not in self._failed:
                return None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # asked outside the event loop (a tool, a test): no fetch from there
            return None
        task = loop.create_task(self._fetch(service), name="strangler-reflection")
        self._fetching[service] = task
        task.add_done_callback(lambda _: self._fetching.pop(service, None))
        return task

    async def _fetch(self, service: str) -> None:
        problem: BaseException | None = None
        for address, credentials in self._targets:
            try:
                files = await asyncio.to_thread(fetch_files, address, credentials, service, self._timeout)
                decoder = DescriptorDecoder(pool_from_files(files))
                if not decoder.knows(service):
                    raise LookupError(f"{service} not in the descriptors served")
            except Exception as exc:  # noqa: BLE001 - any failure: next target, then wire format
                problem = exc
                continue
            self._ready[service] = decoder
            self._failed.pop(service, None)
            return
        self._failed[service] = self._clock() + RETRY_SECONDS
        self._count("reflection_failed")
        if not self._logged:
            self._logged = True
            log.warning(
                "shadow: server reflection gave no descriptors for %s (%s); its answers are compared "
                "by field number (logged once)",
                service[:200],
                _reason(problem),
            )


def _reason(exc: BaseException | None) -> str:
    """A short cause without addresses (grpcio's details name the peer)."""
    if exc is None:
        return "no target"
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            return f"gRPC {code().name}"
        except Exception:  # noqa: BLE001
            pass
    return f"{type(exc).__name__}: {str(exc)[:200]}"


class GrpcDecoding:
    """Which decoder reads a call's messages: the descriptor set's when it has the service, else
    reflection's when on and fetched, else the wire format."""

    def __init__(
        self, static: DescriptorDecoder | None, reflection: ReflectionSource | None, count: Count = _nothing
    ) -> None:
        self._static = static
        self._reflection = reflection
        self.count = count

    def decoder(self, method: str) -> MessageDecoder:
        static = self._static
        if static is not None:
            parts = split_method(method)
            if parts is not None and static.knows(parts[0]):
                return static
        return self._reflection.decoder(method) if self._reflection is not None else WIRE

    def safe(self, method: str) -> bool:
        """Calibration allowed: the descriptors that read the call mark it NO_SIDE_EFFECTS (a
        service whose reflection is not fetched yet: not yet)."""
        decoder = self.decoder(method)
        return isinstance(decoder, DescriptorDecoder) and decoder.safe(method)

    async def resolve(self, method: str) -> MessageDecoder:
        decoder = self.decoder(method)
        if decoder is WIRE and self._reflection is not None:
            return await self._reflection.resolve(method)
        return decoder


def build_decoding(
    descriptor_set: Path | None,
    reflection: bool,
    urls: list[str],
    ca_file: Path | None,
    timeout: float,
    count: Count = _nothing,
) -> GrpcDecoding:
    """From the shadow settings; ValueError says what is wrong with the descriptor set."""
    static = DescriptorDecoder(load_descriptor_set(descriptor_set)) if descriptor_set is not None else None
    source = None
    if reflection:
        source = ReflectionSource([reflection_target(url, ca_file) for url in urls], timeout, count)
    return GrpcDecoding(static, source, count)
