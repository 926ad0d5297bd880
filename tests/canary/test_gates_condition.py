"""Gate conditions, the JSONPath subset and templates: table tests, no server. Hostile strings
give one clear line (ValueError at load, ConfigError through the settings), never a crash."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from proxy.canary.analysis import Status, Verdict
from proxy.canary.gates.decide import combine, dry_run_alerts, gate_record
from proxy.canary.gates.providers import json_values, prometheus_values, window_text
from proxy.canary.gates.result import GateResult, Inconclusive, judge
from proxy.gatespec import check_template, parse_condition, parse_json_path, render, select
from proxy.settings import Settings

BASE = {"kind": "http", "name": "kpi", "url": "http://127.0.0.1:1/x", "json_path": "$.v",
        "condition": "result > 1"}  # fmt: skip


@pytest.mark.parametrize(
    ("text", "value", "expected"),
    [
        ("result < 0.05", 0.01, True),
        ("result < 0.05", 0.05, False),
        ("result >= 0.95", 0.95, True),
        ("result >= 0.95", 0.9, False),
        ("result > 10", 11, True),
        ("result <= -1", -1, True),
        ("result == 0", 0, True),
        ("result != 0", 0, False),
        ("0.9 <= result <= 1", 0.95, True),
        ("0.9 <= result <= 1", 1.01, False),
        ("0.9 <= result <= 1", 0.89, False),
        ("0.05 > result", 0.01, True),
        ("result < 2e-3", 0.001, True),
        ("result < .5", 0.4, True),
        ("result < 1 || result > 5", 6, True),
        ("result < 1 || result > 5", 3, False),
        ("result > 1 && result < 5", 3, True),
        ("result > 1 && result < 5", 5, False),
        ("(result < 1 || result > 5) && result != 6", 6, False),
        ("(result < 1 || result > 5) && result != 6", 7, True),
        ("  result<0.05  ", 0.0, True),
        ("result > 1 || result < 5 && result > 4", 0.5, False),  # && binds tighter than ||
    ],
)
def test_conditions_evaluate_as_written(text: str, value: float, expected: bool) -> None:
    assert parse_condition(text).holds(value) is expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "non-empty"),
        ("   ", "non-empty"),
        ("result", "comparison"),
        ("0.5 < 1", "must use 'result'"),
        ("result < nan", "unknown name 'nan'"),
        ("result < inf", "unknown name 'inf'"),
        ("result < 1e999", "not a finite number"),
        ("__import__('os').system('x') < 1", "unexpected"),
        ("result < 1; import os", "unexpected"),
        ("result < x", "unknown name 'x'"),
        ("result <", "ends too early"),
        ("result << 1", "expected 'result' or a number"),
        ("(result < 1", "ends too early"),
        ("result < 1)", "unexpected ')'"),
        ("result < 1 &&", "ends too early"),
        ("result = 1", "unexpected"),
        ("result < 1\nresult > 0", "one line"),
        ("result < 1 " * 40, "at most 200"),
        ("(" * 20 + "result < 1" + ")" * 20, "nested deeper"),
        ("résultat < 1", "unexpected"),
    ],
)
def test_hostile_conditions_are_one_clear_error(text: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_condition(text)
    message = str(caught.value)
    assert says in message and "\n" not in message


def test_conditions_of_wrong_type_are_refused() -> None:
    for value in (None, 1, ["result < 1"]):
        with pytest.raises(ValueError, match="non-empty string"):
            parse_condition(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "segments"),
    [
        ("$", ()),
        ("$.data.rate", ("data", "rate")),
        ("$.items[0].v", ("items", 0, "v")),
        ("$['odd key'][-1]", ("odd key", -1)),
        ("$.a_b-c", ("a_b-c",)),
    ],
)
def test_json_paths_of_the_subset(path: str, segments: tuple[object, ...]) -> None:
    assert parse_json_path(path) == segments


@pytest.mark.parametrize(
    "path", ["data.rate", "$..rate", "$.*", "$[?(@.a)]", "$.a[", "$['a'", "$." + "a" * 300, "$ .a"]
)
def test_json_paths_outside_the_subset_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="json_path"):
        parse_json_path(path)


def test_select_names_the_missing_segment() -> None:
    doc = {"data": {"items": [{"v": 1}]}}
    assert select(doc, ("data", "items", 0, "v")) == 1
    with pytest.raises(LookupError, match=r"no 'w' at \$\.data\.items\[0\]"):
        select(doc, ("data", "items", 0, "w"))
    with pytest.raises(LookupError, match=r"no \[3\]"):
        select(doc, ("data", "items", 3))
    with pytest.raises(LookupError):
        select([1], ("a",))


def test_templates_fill_only_known_placeholders() -> None:
    text = 'rate(x{group="{{group}}",version="{{ version }}"}[{{window}}])'
    assert render(text, {"group": "orders", "version": "v2", "window": "60s"}) == (
        'rate(x{group="orders",version="v2"}[60s])'
    )
    with pytest.raises(ValueError, match="unknown placeholder"):
        check_template("{{user}}", "query")
    assert window_text(60) == "60s" and window_text(2.5) == "2500ms"


def V(result: object) -> dict[str, object]:  # noqa: N802 - reads as a literal
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


@pytest.mark.parametrize(
    ("answer", "values"),
    [
        (V([]), []),
        ({"status": "success", "data": {"resultType": "scalar", "result": [1, "0.5"]}}, [0.5]),
        (V([{"metric": {"a": "1"}, "value": [1, "0.1"]}, {"metric": {}, "value": [1, "3"]}]), [0.1, 3.0]),
    ],
)
def test_prometheus_answers_give_their_values(answer: object, values: list[float]) -> None:
    assert prometheus_values(answer) == values


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ("<html>", "not a successful"),
        ([], "not a successful"),
        ({"status": "error", "error": "bad"}, "not a successful"),
        ({"status": "success"}, "no data"),
        ({"status": "success", "data": {"resultType": "matrix", "result": []}}, "result type 'matrix'"),
        ({"status": "success", "data": {"resultType": "string", "result": [1, "x"]}}, "result type"),
        ({"status": "success", "data": {"resultType": "scalar", "result": "1"}}, "malformed scalar"),
        (V({}), "malformed"),
        (V([{"value": [1]}]), "malformed"),
        (V([[1, 2]]), "malformed"),
        (V([{"value": [1, "abc"]}]), "string"),
        (V([{"value": [1, [1]]}]), "list"),
        (V([{"value": [1, True]}]), "bool"),
        (V([{"value": [1, "9" * 100]}]), "long"),
        (V([{"value": [1, "1"]}] * 1001), "series"),
    ],
)
def test_hostile_prometheus_answers_are_inconclusive(answer: object, says: str) -> None:
    with pytest.raises(Inconclusive, match=says):
        prometheus_values(answer)


def test_json_values_take_a_number_or_a_flat_list_of_numbers() -> None:
    assert json_values({"a": {"b": 0.5}}, ("a", "b")) == [0.5]
    assert json_values({"a": [1, 2]}, ("a",)) == [1.0, 2.0]
    assert json_values({"a": "0.25"}, ("a",)) == [0.25]
    for answer, says in [
        ({"a": [[1]]}, "list"), ({"a": {"b": 1}}, "dict"), ({"a": None}, "NoneType"),
        ({"a": "fast"}, "string"), ({"a": False}, "bool"), ({}, "finds nothing"),
    ]:  # fmt: skip
        with pytest.raises(Inconclusive, match=says):
            json_values(answer, ("a",))


def test_judge_requires_every_series_to_pass_and_never_judges_nan() -> None:
    condition = parse_condition("result < 0.05")
    assert judge([0.01, 0.02], condition) == GateResult("pass", 0.01, "0.01 meets 'result < 0.05' (2 series)")
    failed = judge([0.01, 0.2], condition)
    assert failed.status == "fail" and failed.value == 0.2
    assert judge([], condition).status == "inconclusive"
    assert judge([math.nan], condition).status == "inconclusive"
    assert judge([0.01, math.inf], condition).status == "inconclusive"


def _gate(**extra: object) -> object:
    base = {
        "kind": "http",
        "name": "kpi",
        "url": "http://127.0.0.1:1/x",
        "json_path": "$.v",
        "condition": "result > 1",
    }
    return Settings(canary={"gates": {"default": [{**base, **extra}]}}).canary.gates["default"][0]


def test_streaks_count_failures_in_a_row_and_inconclusive_keeps_the_count() -> None:
    gate = _gate(failure_limit=2)
    record = None
    seen = []
    for status in ("fail", "inconclusive", "fail", "pass", "fail"):
        record = gate_record(gate, GateResult(status, None, status), record, 1.0)  # type: ignore[arg-type]
        seen.append(record["consecutive_failures"])
    assert seen == [1, 1, 2, 0, 1]


def _verdict(status: Status = Status.PASS, rollback: bool = False) -> Verdict:
    return Verdict(status, "built-in", "error_rate" if rollback else None, rollback=rollback)


def _record(
    status: str, streak: int, limit: int = 2, dry_run: bool = False, at: float = 1.0
) -> dict[str, Any]:
    return {"name": "kpi", "kind": "http", "status": status, "value": 3.0, "reason": "why",
            "dry_run": dry_run, "consecutive_failures": streak, "failure_limit": limit,
            "checked_at": at}  # fmt: skip


def test_combine_rolls_back_holds_or_leaves_the_verdict() -> None:
    tripped = combine(_verdict(), [_record("fail", 2)])
    assert tripped.rollback and tripped.status is Status.FAIL and tripped.failed_check == "gate:kpi"
    # a gate at its limit acts even when the built-in checks lack data
    assert combine(_verdict(Status.INSUFFICIENT_DATA), [_record("fail", 2)]).rollback
    # the built-in rollback keeps its own reason
    assert combine(_verdict(Status.FAIL, rollback=True), [_record("fail", 2)]).failed_check == "error_rate"
    below = combine(_verdict(), [_record("fail", 1)])
    assert below.status is Status.FAIL and not below.rollback and "1/2" in below.reason
    unsure = combine(_verdict(), [_record("inconclusive", 0)])
    assert unsure.status is Status.ERROR and not unsure.rollback and "inconclusive" in unsure.reason
    assert combine(_verdict(), [_record("fail", 5, dry_run=True)]) == _verdict()
    assert combine(_verdict(), [_record("pass", 0)]) == _verdict()


def test_dry_run_alerts_once_per_streak_and_only_for_fresh_records() -> None:
    assert dry_run_alerts([_record("fail", 2, dry_run=True)], 1.0)
    assert not dry_run_alerts([_record("fail", 3, dry_run=True)], 1.0)  # already alerted at 2
    assert not dry_run_alerts([_record("fail", 2, dry_run=True, at=0.5)], 1.0)  # kept from before
    assert not dry_run_alerts([_record("fail", 2)], 1.0)  # acted on, not alerted as dry-run


@pytest.mark.parametrize(
    ("gate", "says"),
    [
        ({"condition": "result <"}, "ends too early"),
        ({"condition": 5}, "string"),
        ({"json_path": "$..x"}, "json_path"),
        ({"url": "ftp://x/{{group}}"}, "http:// or https://"),
        ({"url": "http://h/{{secret}}"}, "unknown placeholder"),
        ({"failure_limit": 0}, "failure_limit"),
        ({"timeout_seconds": float("nan")}, "timeout_seconds"),
        ({"kind": "datadog"}, "kind"),
        ({"name": "a b"}, "name"),
        ({"headers": {"Authorization": "Bearer x\r\nX-Evil: 1"}}, "line break"),
        ({"headers": {"Bad Name": "x"}}, "header name"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_gate_settings_are_one_config_error(gate: dict[str, object], says: str) -> None:
    base = {
        "kind": "http",
        "name": "kpi",
        "url": "http://127.0.0.1:1/x",
        "json_path": "$.v",
        "condition": "result > 1",
    }
    with pytest.raises(ValidationError) as caught:
        Settings(canary={"gates": {"default": [{**base, **gate}]}})
    assert says in str(caught.value)


def test_gate_names_are_unique_per_group_and_groups_must_exist() -> None:
    gate = {
        "kind": "http",
        "name": "kpi",
        "url": "http://127.0.0.1:1/x",
        "json_path": "$.v",
        "condition": "result > 1",
    }
    with pytest.raises(ValidationError, match="unique"):
        Settings(canary={"gates": {"default": [gate], "*": [gate]}})
    with pytest.raises(ValidationError, match="unknown route groups"):
        Settings(canary={"gates": {"nope": [gate]}})


def test_a_prometheus_address_with_credentials_is_not_repeated_in_its_error() -> None:
    gate = {
        "kind": "prometheus",
        "name": "p",
        "address": "gopher://user:hunter2@h",
        "query": "up",
        "condition": "result > 0",
    }
    with pytest.raises(ValidationError) as caught:
        Settings(canary={"gates": {"default": [gate]}})
    assert "hunter2" not in str(caught.value).split("input_value")[0]


def test_the_example_gates_file_loads() -> None:
    from pathlib import Path

    from proxy.settings import load_settings

    example = Path(__file__).resolve().parents[2] / "config" / "gates.example.yaml"
    settings = load_settings(example, routes=[{"name": "orders", "patterns": ["/orders/**"]}])
    names = [gate.name for gate in settings.canary.gates_for("orders")]
    assert names == ["checkout-success", "fraud-score", "p99-latency"]
    assert [gate.name for gate in settings.canary.gates_for("default")] == ["p99-latency"]
    assert "CHANGE-ME" not in repr(settings.canary.gates)


def test_a_bad_gate_in_a_yaml_file_is_one_line_naming_file_line_and_field(tmp_path: Any) -> None:
    from proxy.settings import ConfigError, load_settings

    path = tmp_path / "gates.yaml"
    path.write_text(
        "canary:\n  gates:\n    default:\n"
        "      - kind: prometheus\n        name: p\n        address: http://user:hunter2@127.0.0.1:9090\n"
        "        query: up\n        condition: result >> 1\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert (
        message.startswith(f"{path}:")
        and "condition" in message
        and "expected 'result' or a number" in message
    )
    assert "\n" not in message and "hunter2" not in message


def test_a_misspelt_gate_key_names_the_path_as_written_and_suggests_the_key(tmp_path: Any) -> None:
    from proxy.settings import ConfigError, load_settings

    path = tmp_path / "gates.yaml"
    path.write_text(
        "canary:\n  gates:\n    default:\n"
        "      - {kind: http, name: k, url: 'http://h/', json_path: $.a, condition: result > 1,\n"
        "         tiemout_seconds: 2}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == (
        f"{path}:5:10: canary.gates.default[0].tiemout_seconds: unknown key; did you mean 'timeout_seconds'?"
    )
