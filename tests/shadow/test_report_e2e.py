"""Mirroring and the diff report, end to end: real proxy, real v1/v2, real Redis."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.shadow.helpers import detail, header, shadow_entries, start_shadow_proxy, wait_row
from tests.support import Backend, ProxyProcess, wait_until


def test_one_field_difference_is_reported_for_its_endpoint_only(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    v1.control(extra={"price": 10})
    v2.control(extra={"price": 12})
    v1.log(clear=True)
    v2.log(clear=True)
    proxy = start_shadow_proxy(proxy_factory, v1, v2, redis_url)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for i in range(10):
            response = client.get(f"/api/items/{i + 1}", headers={"X-Request-ID": f"req-{i}"})
            assert response.status_code == 200
            assert response.json() == {"version": "v1", "path": f"/api/items/{i + 1}", "method": "GET",
                                       "price": 10}  # fmt: skip
            assert response.headers["x-api-version"] == "v1"
            assert client.get("/status/200").status_code == 200

    items = wait_row(proxy, "GET /api/items/{id}", compared=10)
    assert (items["compared"], items["matched"], items["mismatched"], items["noise"]) == (10, 0, 10, 0)
    assert items["errors"] == 0 and items["skipped"] == 0
    assert items["top_fields"] == [["root['price']", 10]]
    same = wait_row(proxy, "GET /status/{id}", compared=10)
    assert (same["compared"], same["matched"], same["mismatched"]) == (10, 10, 0)

    one = detail(proxy, "GET /api/items/{id}")
    assert one["fields"] == {"root['price']": 10}
    assert one["samples"], "mismatches keep samples"
    sample = one["samples"][0]
    assert sample["method"] == "GET" and sample["v1_status"] == 200 and sample["v2_status"] == 200
    assert sample["diff"] == [{"field": "root['price']", "kind": "changed", "v1": "10", "v2": "12"}]
    assert '"price":10' in sample["v1_body"].replace(" ", "")
    assert detail(proxy, "GET /status/{id}")["fields"] == {}

    # the mirrored copy: marked, same request id and Host as the primary, never seen by the client
    mirrored = [e for e in shadow_entries(v2) if e["raw_path"].startswith("/api/items/")]
    assert len(mirrored) == 10
    primaries = {header(e, "x-request-id"): e for e in v1.log() if e["raw_path"].startswith("/api/items/")}
    for entry in mirrored:
        assert header(entry, "x-strangler-shadow") == "1"
        primary = primaries[header(entry, "x-request-id")]
        assert entry["raw_path"] == primary["raw_path"]
        assert header(entry, "host") == header(primary, "host") == f"127.0.0.1:{proxy.port}"
    assert {header(e, "x-request-id") for e in mirrored} == {f"req-{i}" for i in range(10)}
    assert proxy.metric("strangler_shadow_requests_total", outcome="sent") == 20
    assert proxy.metric("strangler_shadow_comparisons_total", result="mismatch") == 10
    assert proxy.metric("strangler_shadow_comparisons_total", result="match") == 10
    wait_until(lambda: proxy.metric("strangler_shadow_latency_delta_seconds_count") == 20, timeout=5)


def test_noise_learnt_by_calibration_is_not_a_mismatch(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    for backend in v1v2:
        backend.control(noise=True)  # a random uuid and the current time in every answer
    v1.log(clear=True)
    proxy = start_shadow_proxy(proxy_factory, v1, v2, redis_url, calibration_percentage=100)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for i in range(8):
            assert client.get(f"/api/things/{i}").status_code == 200

    # a field is noise once it varied in noise_threshold (2) calibrations: the first answer waits
    # (pending) until the second calibration, then is judged with the noise known (no false alarms)
    things = wait_row(proxy, "GET /api/things/{id}", compared=8)
    assert (things["compared"], things["mismatched"], things["noise"], things["matched"]) == (8, 0, 8, 0)
    assert things["pending"] == 0
    report = detail(proxy, "GET /api/things/{id}")
    assert report["fields"] == {}
    assert set(report["noise_fields"]) == {"root['request_uuid']", "root['generated_at']"}
    assert report["noise_seen"] == {"root['request_uuid']": 8, "root['generated_at']": 8}
    assert report["suppressed"] == {"root['request_uuid']": 8, "root['generated_at']": 8}
    assert proxy.metric("strangler_shadow_comparisons_total", result="noise") == 8
    assert proxy.metric("strangler_shadow_comparisons_total", result="mismatch") == 0
    # calibration asked v1 a second time, marked as such
    calibrations = [e for e in v1.log() if header(e, "x-strangler-calibration") == "1"]
    assert len(calibrations) == 8

    # a real difference next to the noise is still a mismatch, naming only the real field
    v2.control(extra={"currency": "EUR"})
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for i in range(3):
            assert client.get(f"/api/things/{i}").status_code == 200
    things = wait_row(proxy, "GET /api/things/{id}", compared=11)
    assert (things["mismatched"], things["noise"]) == (3, 8)
    assert detail(proxy, "GET /api/things/{id}")["fields"] == {"root['currency']": 3}


def test_noise_is_shared_through_redis_and_warmup_calibrates_new_endpoints(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    """Calibration at 0% after the warm-up: the first answers teach the noise, later ones use it."""
    v1, v2 = v1v2
    for backend in v1v2:
        backend.control(noise=True)
    v1.log(clear=True)
    proxy = start_shadow_proxy(proxy_factory, v1, v2, redis_url, calibration_percentage=0.001,
                               calibration_warmup=2)  # fmt: skip
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for _ in range(6):
            assert client.get("/api/noisy").status_code == 200
    noisy = wait_row(proxy, "GET /api/noisy", compared=6)
    # noise_threshold 2: the first answer waits for the second warm-up calibration
    assert noisy["mismatched"] == 0 and noisy["noise"] == 6
    calibrations = [e for e in v1.log() if header(e, "x-strangler-calibration") == "1"]
    assert len(calibrations) >= 2
    # a second replica learns the noise from Redis
    other = start_shadow_proxy(
        proxy_factory, v1, v2, redis_url, calibration_percentage=0, calibration_warmup=0
    )
    with httpx.Client(base_url=other.url, timeout=10) as client:
        for _ in range(4):
            assert client.get("/api/noisy").status_code == 200
    noisy = wait_row(proxy, "GET /api/noisy", compared=10)
    assert noisy["mismatched"] == 0 and noisy["noise"] == 10
