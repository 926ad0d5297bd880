"""The protobuf tests' schema: tests/shadow/protos compiled at test time with grpc_tools.protoc
(Python modules and a FileDescriptorSet with its imports), and gRPC framing helpers."""

from __future__ import annotations

import gzip
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

PROTOS = Path(__file__).resolve().parent / "protos"


@dataclass(frozen=True)
class Compiled:
    pb2: ModuleType  # messages
    grpc: ModuleType  # service stubs and servicer
    descriptor_set: Path  # protoc --descriptor_set_out --include_imports
    bare_set: Path  # the same without --include_imports (imports missing)


_compiled: list[Compiled] = []


def compile_protos(factory: pytest.TempPathFactory) -> Compiled:
    """Once per process (the generated modules register in protobuf's default pool)."""
    if _compiled:
        return _compiled[0]
    import grpc_tools
    from grpc_tools import protoc

    out = factory.mktemp("shadow-protos")
    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}"]
    full, bare = out / "full.pb", out / "bare.pb"
    assert protoc.main([*args, f"--descriptor_set_out={full}", "--include_imports", "shadowtest.proto"]) == 0
    assert (
        protoc.main(
            ["protoc", f"-I{PROTOS}", f"-I{include}", f"--descriptor_set_out={bare}", "shadowtest.proto"]
        )
        == 0
    )
    sys.path.insert(0, str(out))
    compiled = Compiled(
        importlib.import_module("shadowtest_pb2"), importlib.import_module("shadowtest_pb2_grpc"), full, bare
    )
    _compiled.append(compiled)
    return compiled


def frame(*messages: bytes, compressed: bool = False) -> bytes:
    """A gRPC body: each message with its compressed flag and 4-byte big-endian length."""
    out = bytearray()
    for message in messages:
        data = gzip.compress(message, mtime=0) if compressed else message
        out += bytes([1 if compressed else 0]) + len(data).to_bytes(4, "big") + data
    return bytes(out)
