"""No false alarms. A new endpoint's comparisons are pending until its noise
calibration has run (its first max(calibration_warmup, noise_threshold) calibrations), shown as
``pending`` in the report and never counted by the shadow gate (which reads ``compared`` and
``mismatched``), then judged with the noise it learnt."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from tests.shadow.conftest import Scripted
from tests.shadow.helpers import detail, wait_row
from tests.support import ProxyProcess, wait_until

Start = Callable[..., ProxyProcess]
Pair = tuple[Scripted, Scripted]
N = 30


def doc(side: str, i: int, **extra: Any) -> dict[str, Any]:
    """v1 and v2 agree on everything but ``generated_at`` and ``trace_id``."""
    return {"json": {"id": 7, "name": "a", "generated_at": f"{side}-{i}", "trace_id": f"{side}{i}"}, **extra}


def send(proxy: ProxyProcess, count: int) -> None:
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for _ in range(count):
            assert client.get("/t9/item").status_code == 200


def test_comparisons_wait_for_the_endpoints_calibration_then_none_is_a_false_alarm(
    shadow_proxy: Start, scripted: Pair
) -> None:
    v1, v2 = scripted
    calibrations = [doc("c", i) for i in range(N)]
    calibrations[2] = doc("c", 2, delay=2.0)  # the third calibration is slow: the first two wait
    v1.script("/t9/item", primary=[doc("p", i) for i in range(N)], calibration=calibrations)
    v2.script("/t9/item", shadow=[doc("s", i) for i in range(N)])
    proxy = shadow_proxy(calibration_percentage=1, calibration_warmup=3)  # one worker, in order

    send(proxy, 3)
    found = wait_row(proxy, "GET /t9/item", pending=2)
    assert (found["compared"], found["mismatched"], found["pending"]) == (0, 0, 2)  # the gate sees nothing
    status = httpx.get(proxy.admin + "/shadow", timeout=5).json()
    assert status["pending"] == {"GET /t9/item": 2}

    send(proxy, N - 3)
    found = wait_row(proxy, "GET /t9/item", compared=N)
    assert (found["compared"], found["matched"], found["mismatched"], found["noise"]) == (N, 0, 0, N)
    assert found["pending"] == 0
    report = detail(proxy, "GET /t9/item")
    assert report["fields"] == {} and not report["samples"]
    assert set(report["noise_fields"]) == {"root['generated_at']", "root['trace_id']"}
    assert proxy.metric("strangler_shadow_comparisons_total", result="mismatch") == 0
    wait_until(lambda: httpx.get(proxy.admin + "/shadow", timeout=5).json()["pending"] == {}, timeout=5)


def test_without_calibration_comparisons_are_judged_at_once(shadow_proxy: Start, scripted: Pair) -> None:
    """Nothing can calibrate (calibration off): nothing waits for it."""
    v1, v2 = scripted
    v1.script("/t9/item", primary=[doc("p", i) for i in range(5)])
    v2.script("/t9/item", shadow=[doc("s", i) for i in range(5)])
    proxy = shadow_proxy(calibration_percentage=0, calibration_warmup=3)
    send(proxy, 5)
    found = wait_row(proxy, "GET /t9/item", compared=5)
    assert (found["compared"], found["mismatched"], found["pending"]) == (5, 5, 0)
