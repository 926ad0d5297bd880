"""``strangler bench --websocket``: the echo figure runs end to end (direct and through the proxy)."""

from __future__ import annotations

from proxy.bench import bench_websocket, render_websocket


def test_websocket_echo_bench_measures_both_targets_without_errors() -> None:
    results = bench_websocket(connections=2, seconds=0.5, rounds=1, warmup=0.2)
    assert [r.name for r in results] == ["websocket echo direct", "websocket echo through strangler"]
    for result in results:
        assert result.errors == 0 and result.rps > 0, result
    table = render_websocket(results, 2, 0.5, 1)
    assert "msg/s" in table and "through strangler" in table
