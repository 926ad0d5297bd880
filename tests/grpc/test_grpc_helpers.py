"""The pure gRPC helpers (proxy/traffic/grpc.py) and the grpc settings, table-driven: a peer's bad
value is reported, never raised."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from proxy.settings import Settings
from proxy.traffic import grpc


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (b"application/grpc", True), (b"application/grpc+proto", True), (b"Application/GRPC;charset=x", True),
        (b"application/grpc-web", False), (b"application/grpcx", False), (b"application/json", False),
    ],
)  # fmt: skip
def test_is_grpc(content_type: bytes, expected: bool) -> None:
    assert grpc.is_grpc([(b"x", b"y"), (b"content-type", content_type)]) is expected
    assert grpc.is_grpc([]) is False


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1S", 1.0), (b"250m", 0.25), (b"3M", 180.0), (b"2H", 7200.0), (b"5u", 5e-6), (b"7n", 7e-9),
        (b"99999999S", 99999999.0), (b"", None), (b"S", None), (b"1", None), (b"123456789S", None),
        (b"1s", None), (b"-1S", None), (b"1.5S", None), (b" 1S", None), (b"1\x00S", None),
    ],
)  # fmt: skip
def test_parse_timeout(value: bytes, seconds: float | None) -> None:
    assert grpc.parse_timeout(value) == (None if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize("seconds", [0.0, 1e-9, 0.0001234, 0.5, 1.0, 59.9, 3600.0, 1e6, 1e9])
def test_format_timeout_round_trips_without_shortening(seconds: float) -> None:
    value = grpc.format_timeout(seconds)
    parsed = grpc.parse_timeout(value)
    assert parsed is not None and len(value) <= 9
    assert parsed >= seconds * (1 - 1e-12)


def test_status_from_trailers_then_headers_then_the_http_status() -> None:
    assert grpc.call_status(200, [], [(b"grpc-status", b"14")]) == 14
    assert grpc.call_status(200, [(b"grpc-status", b"12")], []) == 12  # trailers-only
    assert grpc.call_status(200, [], []) == grpc.UNKNOWN  # no status at all
    assert grpc.call_status(503, [], []) == grpc.UNAVAILABLE  # http-grpc-status-mapping
    assert grpc.call_status(404, [], []) == 12
    assert grpc.call_status(200, [], [(b"grpc-status", b"x1")]) == grpc.UNKNOWN  # malformed
    assert grpc.call_status(200, [], [(b"grpc-status", b"99999")]) == grpc.UNKNOWN


def test_code_names_and_recorded_statuses() -> None:
    errors = frozenset(["UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED"])
    assert [grpc.code_name(c) for c in (0, 14, 16, 17, 999)] == ["OK", "UNAVAILABLE", "UNAUTHENTICATED",
                                                                "UNKNOWN", "UNKNOWN"]  # fmt: skip
    assert grpc.recorded_status(200, "UNAVAILABLE", errors) == 503
    assert grpc.recorded_status(200, "DEADLINE_EXCEEDED", errors) == 504
    assert grpc.recorded_status(200, "INTERNAL", errors) == 500
    assert grpc.recorded_status(200, "NOT_FOUND", errors) == 200
    assert grpc.recorded_status(200, "OK", errors) == 200


def test_method_labels_are_bounded_and_only_method_names() -> None:
    labels = grpc.MethodLabels(2)
    assert labels.label("/pkg.Svc/Call") == "pkg.Svc/Call"
    assert labels.label("/not a method") == "other"
    assert labels.label("/pkg.Svc/Call/extra") == "other"
    assert labels.label("/a.B/C") == "a.B/C"
    assert labels.label("/a.B/D") == "other"  # past the bound
    assert labels.label("/pkg.Svc/Call") == "pkg.Svc/Call"  # known ones keep their label
    assert labels.label("/" + "x" * 500 + "/M") == "other"


def test_grpc_settings_take_names_or_numbers_and_refuse_the_rest() -> None:
    settings = Settings(grpc={"error_codes": ["unavailable", 13, "4", "UNAVAILABLE"]})
    assert settings.grpc.error_codes == ["UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED"]
    for bad in (["NOPE"], [0], ["OK"], [17], [True], "UNAVAILABLE"):
        with pytest.raises(ValidationError):
            Settings(grpc={"error_codes": bad})
    with pytest.raises(ValidationError):
        Settings(v1_protocol="h3")
