"""The request line is the configured origin's path plus the request path, or nothing at all."""

from __future__ import annotations

import pytest

from proxy.edge.client import Origin, request_head

ORIGIN = Origin.parse("http://127.0.0.1:8001/base")


def test_head_is_built_from_the_configured_origin() -> None:
    head = request_head(b"GET", ORIGIN, b"/items?id=1", [(b"x-a", b"1")], True, b"")
    assert head == b"GET /base/items?id=1 HTTP/1.1\r\nhost: 127.0.0.1:8001\r\nx-a: 1\r\n\r\n"


@pytest.mark.parametrize(
    "target",
    [b"*@127.0.0.1:9/ssrf", b"*", b"http://evil/x", b"127.0.0.1:9", b"/a b", b"/a\r\nX: y", b"/a#f", b""],
)
def test_a_target_that_is_not_a_plain_path_is_refused(target: bytes) -> None:
    with pytest.raises(ValueError):
        request_head(b"GET", ORIGIN, target, [], True, b"")


def test_origin_host_header_and_default_ports() -> None:
    assert Origin.parse("https://api.example.com").host_header == b"api.example.com"
    assert Origin.parse("https://api.example.com").port == 443
    assert Origin.parse("http://[::1]:8080").host_header == b"[::1]:8080"
    with pytest.raises(ValueError):
        Origin.parse("ftp://x")
