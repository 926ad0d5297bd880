"""The statistical judge's verdict table and its tally: pure numbers in, a verdict out. No server."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest

from proxy.canary import stats
from proxy.canary.analysis import BOUNDS, History, Status, Window
from proxy.canary.judge import ERROR_CHECK, LATENCY_CHECK, Tally, assess_statistical, load_tally
from proxy.canary.simulate import bucket_shares, draw
from proxy.settings import CanaryThresholds

T = CanaryThresholds(judge="statistical")
N = len(BOUNDS) + 1


def traffic(
    rng: random.Random, seconds: float, *, rate: float = 200, split: float = 0.05,
    e1: float = 0.01, e2: float = 0.01, slow: float = 1.0,
) -> tuple[Window, Window]:  # fmt: skip
    w1 = draw(rng, rate * (1 - split) * seconds, bucket_shares(0.05, 0.5), e1)
    w2 = draw(rng, rate * split * seconds, bucket_shares(0.05 * slow, 0.5), e2)
    return w1, w2


def judge(
    inc: tuple[Window, Window],
    tally: Tally | None = None,
    *,
    window: tuple[Window, Window] | None = None,
    until: int = 300,
    history: History | None = None,
    thresholds: CanaryThresholds = T,
) -> Any:
    w1, w2 = window or inc
    return assess_statistical(
        w1, w2, *inc, thresholds, history or History(), tally, now=until + 2, until=until, failures_to_act=3
    )


def test_identical_versions_with_enough_data_pass_and_show_every_figure() -> None:
    rng = random.Random(1)
    verdict, tally = judge(traffic(rng, 600), window=traffic(rng, 60))
    assert verdict.status is Status.PASS, verdict.reason
    s = verdict.as_dict()["statistics"]
    for test in ("errors", "latency"):
        part = s[test]
        assert part["enough_data"] is True and part["power"] >= T.power
        assert part["log_lr"] < part["threshold"] and 0 < part["p_value"] <= 1
        assert part["ci95"][0] <= part["effect"] <= part["ci95"][1]
        assert part["reason"] and "\n" not in part["reason"]
    assert s["requests"]["v2"] == tally.n2 > 0
    json.dumps(verdict.as_dict(), allow_nan=False)  # strict JSON: no NaN or Infinity anywhere


def test_doubled_error_rate_fails_at_once_without_a_streak() -> None:
    verdict, _ = judge(traffic(random.Random(2), 600, e2=0.03))
    assert verdict.status is Status.FAIL and verdict.failed_check == ERROR_CHECK
    assert verdict.rollback and verdict.consecutive_failures == 1  # acts on the first failing check
    errors = verdict.statistics["errors"]
    assert errors["log_lr"] >= errors["threshold"] and errors["ci95"][0] > 1
    assert "fails more often" in verdict.reason


def test_slower_v2_fails_on_latency() -> None:
    verdict, _ = judge(traffic(random.Random(3), 300, slow=1.3))
    assert verdict.status is Status.FAIL and verdict.failed_check == LATENCY_CHECK and verdict.rollback
    assert verdict.statistics["latency"]["ci95"][0] > 0.5
    assert "slower" in verdict.reason


def test_faster_v2_is_not_a_failure() -> None:
    verdict, _ = judge(traffic(random.Random(4), 600, slow=0.7, e2=0.002))
    assert verdict.status is Status.PASS, verdict.reason
    assert verdict.statistics["latency"]["log_lr"] < 0


def test_too_little_data_holds_and_never_passes() -> None:
    verdict, _ = judge(traffic(random.Random(5), 20), window=traffic(random.Random(5), 60))
    assert verdict.status is Status.INSUFFICIENT_DATA
    assert "too little data" in verdict.reason and "power" in verdict.reason
    assert verdict.statistics["errors"]["enough_data"] is False


def test_absolute_limits_stay_as_safety_nets_with_their_streak() -> None:
    rng = random.Random(6)
    inc = traffic(rng, 60)
    window = (Window.of(1000, 0, [0.01] * 1000), Window.of(200, 0, [0.9] * 200))  # v2 p95 900 ms
    verdict, _ = judge(inc, window=window)
    assert verdict.status is Status.FAIL and verdict.failed_check == "p95"
    assert not verdict.rollback and verdict.consecutive_failures == 1  # the streak rule, unlike the tests
    third, _ = judge(inc, window=window, history=History(2))
    assert third.rollback


def test_unreadable_windows_are_an_error_and_keep_the_tally() -> None:
    rng = random.Random(7)
    _, tally = judge(traffic(rng, 100))
    verdict, kept = assess_statistical(None, None, None, None, T, History(1), tally, now=400, until=398)
    assert verdict.status is Status.ERROR and verdict.consecutive_failures == 1 and kept == tally


def test_tally_survives_a_new_leader_and_counts_each_increment_once() -> None:
    rng = random.Random(8)
    incs = [traffic(rng, 10) for _ in range(12)]
    tally = None
    for i, inc in enumerate(incs[:6]):
        _, tally = judge(inc, tally, until=10 * (i + 1))
    stored = json.loads(json.dumps({"tally": tally.model_dump(mode="json")}))  # the verdict record
    carried, note = load_tally(stored["tally"])
    assert note is None and carried == tally
    again, same = judge(incs[5], carried, until=60)  # the same seconds again: not counted twice
    assert same.n2 == tally.n2
    for i, inc in enumerate(incs[6:], start=6):
        _, carried = judge(inc, carried, until=10 * (i + 1))
    assert carried.n1 == sum(a.requests for a, _ in incs) and carried.x2 == sum(b.errors for _, b in incs)


def test_a_split_changing_between_checks_keeps_each_increment_at_its_own_split() -> None:
    rng = random.Random(9)
    low, high = traffic(rng, 100, split=0.01), traffic(rng, 100, split=0.5)
    _, tally = judge(low, until=100)
    _, tally = judge(high, tally, until=200)
    ratios, _ = stats.error_grid(T.min_error_ratio)
    expected = [
        stats.error_log_lr(r, low[0].requests, low[0].errors, low[1].requests, low[1].errors)
        + stats.error_log_lr(r, high[0].requests, high[0].errors, high[1].requests, high[1].errors)
        for r in ratios
    ]
    assert list(tally.error_log_lr) == pytest.approx(expected)


def test_a_changed_error_grid_restarts_the_count_and_says_so() -> None:
    rng = random.Random(10)
    _, tally = judge(traffic(rng, 100))
    other = CanaryThresholds(judge="statistical", min_error_ratio=3.0)
    verdict, fresh = judge(traffic(rng, 10), tally, thresholds=other, until=310)
    assert "restarted" in verdict.statistics["note"] and fresh.n1 < tally.n1


HOSTILE: list[Any] = [
    "garbage",
    [],
    42,
    {"start": "x"},
    {"start": 1.0, "until": 5, "ratios": [2.0], "error_log_lr": []},
    {"start": 1.0, "until": 5, "ratios": [2.0], "error_log_lr": [float("nan")]},
    {"start": 1.0, "until": 5, "ratios": [2.0], "error_log_lr": [1e300]},
    {"start": 1.0, "until": 5, "ratios": [2.0], "error_log_lr": [0.0], "n1": -1},
    {"start": 1.0, "until": 5, "ratios": [2.0], "error_log_lr": [0.0], "n1": 10**400},
    {"start": 1.0, "until": 5, "ratios": [2.0], "error_log_lr": [0.0], "n1": 1, "x1": 5},
    {"start": 1.0, "until": 5, "ratios": [2.0], "error_log_lr": [0.0], "h1": [1, 2]},
    {"start": 1.0, "until": 5, "ratios": [2.0], "error_log_lr": [0.0], "score": "inf"},
    {"start": 1.0, "until": 5, "ratios": [0.5], "error_log_lr": [0.0]},
    {"start": 1.0, "until": 5, "ratios": [2.0], "error_log_lr": [0.0], "evil": True},
    {"start": 1.0, "until": 5, "ratios": [2.0] * 100_000, "error_log_lr": [0.0] * 100_000, "h1": "x" * 10**6},
]


@pytest.mark.parametrize("raw", HOSTILE, ids=range(len(HOSTILE)))
def test_a_hostile_stored_tally_restarts_the_count_with_one_clear_line(raw: Any) -> None:
    tally, note = load_tally(raw)
    assert tally is None and note and "\n" not in note and "counting restarted" in note
    verdict, fresh = judge(traffic(random.Random(11), 10), tally)
    assert verdict.status in (Status.INSUFFICIENT_DATA, Status.PASS) and not verdict.rollback
    assert fresh is not None and math.isfinite(verdict.statistics["errors"]["log_lr"])


def test_no_tally_is_no_note() -> None:
    assert load_tally(None) == (None, None)


def test_bad_judge_settings_are_refused() -> None:
    for bad in (
        {"judge": "magic"}, {"alpha": 0}, {"alpha": float("nan")}, {"alpha": 1.5},
        {"min_error_ratio": 1.0}, {"min_error_ratio": float("inf")}, {"min_latency_shift": -0.1},
        {"power": 1.0}, {"alpha": "lots"},
    ):  # fmt: skip
        with pytest.raises(ValueError, match="validation error"):
            CanaryThresholds(**bad)


@pytest.mark.parametrize(
    "bad",
    [
        Window(-5, 0, (0,) * N),
        Window(10, 11, (10,) + (0,) * (N - 1)),
        Window(10, 0, (10, 0)),
        Window(10**15, 0, (0,) * N),
        Window(10, 0, (-10,) + (0,) * (N - 1)),
    ],
)
def test_invalid_increment_counts_are_an_error_and_not_read_again(bad: Window) -> None:
    rng = random.Random(12)
    _, tally = judge(traffic(rng, 100), until=100)
    good = traffic(rng, 10)
    verdict, after = assess_statistical(
        *good, good[0], bad, T, History(2), tally, now=112, until=110, failures_to_act=3
    )
    assert verdict.status is Status.ERROR and "invalid" in verdict.reason and "\n" not in verdict.reason
    assert verdict.consecutive_failures == 2 and not verdict.rollback
    assert after.until == 110 and after.n1 == tally.n1  # skipped, not counted


def test_one_stalled_second_of_v2_is_not_a_slowdown_but_a_steady_one_is() -> None:
    """A pause of the v2 process delays every request it holds at once: one such second must not
    outweigh a period where v2 is otherwise as fast (the dispersion factor), a steady slowdown must."""
    rng = random.Random(13)
    tally = None
    for second in range(1, 13):
        v1, v2 = traffic(rng, 10, split=0.2)
        if second == 4:  # every v2 request of this check delayed into a slow bucket
            v2 = Window(v2.requests, v2.errors, (0,) * 14 + (v2.requests,) + (0,) * (N - 15))
        verdict, tally = judge((v1, v2), tally, until=10 * second)
        assert not verdict.rollback, verdict.reason
    latency = verdict.statistics["latency"]
    assert latency["dispersion"] > 3 and latency["log_lr"] < latency["threshold"]
    steady = None
    for second in range(1, 13):
        verdict, steady = judge(traffic(rng, 10, split=0.2, slow=1.3), steady, until=10 * second)
        if verdict.rollback:
            break
    assert verdict.rollback and verdict.failed_check == LATENCY_CHECK
    assert verdict.statistics["latency"]["dispersion"] < 2


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("judge: magic", "judge"),
        ("alpha: .nan", "alpha"),
        ("alpha: 1e400", "alpha"),
        ("min_error_ratio: [2]", "min_error_ratio"),
        ("power: {a: 1}", "power"),
        ("min_latency_shift: '" + "9" * 10_000 + "'", "min_latency_shift"),
    ],
)
def test_hostile_judge_settings_in_a_yaml_file_are_one_clear_line(
    tmp_path: Any, value: str, key: str
) -> None:
    from proxy.settings import ConfigError, load_settings

    path = tmp_path / "strangler.yaml"
    path.write_text(f"canary:\n  group_thresholds:\n    default:\n      {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert "\n" not in message and f"canary.group_thresholds.default.{key}" in message
    assert len(message) < 500


def test_the_watch_line_shows_the_evidence() -> None:
    from proxy.canary.commands import check_line

    verdict, _ = judge(traffic(random.Random(14), 20), window=traffic(random.Random(14), 60))
    line = check_line(verdict.as_dict())
    assert line.startswith("check insufficient_data: v2 ") and "; evidence errors " in line
    assert "(little data)" in line and "\n" not in line
    assert check_line({"status": "pass", "statistics": "garbage"}).endswith("v1 n/a")
    hostile = {"status": "pass", "statistics": {"errors": {"evidence": "x"}, "latency": [1]}}
    assert check_line(hostile).endswith("v1 n/a")
