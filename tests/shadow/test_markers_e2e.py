"""Markers (``X-Strangler-*``), the request-path half: these pass once ``proxy/traffic/forward.py`` strips
every incoming ``X-Strangler-*`` header and hands ``Mirror.plan`` the overridden method (the lead's
change). The shadow half (mirror copies, calibration, naming) is in test_trust_e2e.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.shadow.conftest import Scripted
from tests.shadow.helpers import wait_row
from tests.support import ProxyProcess

Start = Callable[..., ProxyProcess]
Pair = tuple[Scripted, Scripted]


def markers(entry: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((k.lower(), v) for k, v in entry["headers"] if k.lower().startswith("x-strangler-"))


def test_forged_markers_never_reach_v1_on_real_traffic(shadow_proxy: Start, scripted: Pair) -> None:
    v1, v2 = scripted
    proxy = shadow_proxy(calibration_percentage=0)
    forged = {"X-Strangler-Shadow": "1", "X-Strangler-Calibration": "1"}
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.get("/t8/real", headers=forged).status_code == 200
        assert client.post("/t8/write", headers=forged, json={"n": 1}).status_code == 200
    wait_row(proxy, "GET /t8/real", compared=1)
    assert [markers(e) for e in v1.requests("/t8/real")] == [[]]
    assert [markers(e) for e in v1.requests("/t8/write")] == [[]]  # a real write, never taken for shadow
    assert [markers(e) for e in v2.requests("/t8/real")] == [[("x-strangler-shadow", "1")]]
    assert v2.requests("/t8/write") == []


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/t8/o1", {"X-HTTP-Method-Override": "DELETE"}),
        ("/t8/o2", {"X-Method-Override": "PUT"}),
        ("/t8/o3?_method=delete", {}),
    ],
)
def test_an_overridden_unsafe_method_is_neither_mirrored_nor_calibrated(
    shadow_proxy: Start, scripted: Pair, path: str, headers: dict[str, str]
) -> None:
    v1, v2 = scripted
    proxy = shadow_proxy(calibration_percentage=100, calibration_warmup=3)  # methods: GET, HEAD, OPTIONS
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.get(path, headers=headers).status_code == 200
        assert client.get("/t8/plain").status_code == 200  # mirrored: the override one was decided first
    wait_row(proxy, "GET /t8/plain", pending=1)  # settled; judged once calibrated (no false alarms before)
    plain = path.split("?")[0]
    assert len(v1.requests(plain)) == 1  # the primary only
    assert v2.requests(plain) == []
    assert proxy.metric("strangler_shadow_requests_total", group="default", outcome="skipped_method") == 1
