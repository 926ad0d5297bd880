"""The check history the leader keeps (real Redis, the real controller driven by ``tick()``) and
the backtest that replays it: with the running checks it reproduces the leader's decisions; a
candidate says when it would have acted instead. Hostile records and candidate files: one line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from proxy.canary import history
from proxy.canary.analysis import Status
from proxy.canary.backtest import (
    ADVANCE,
    NOT_JUDGED,
    ROLLBACK,
    Candidate,
    CandidateFile,
    Outcome,
    outcome_judge,
    replay,
    summary,
)
from proxy.canary.history import BadRecord, Check, parse
from proxy.settings import CanarySettings, CanaryThresholds
from tests.canary.helpers import cli
from tests.canary.test_loop import Rig, run
from tests.support import ROOT

SCHEMA = json.loads((ROOT / "docs" / "schemas" / "backtest.json").read_text())


async def stored(rig: Rig) -> list[Check]:
    return (await history.read(rig.redis, rig.keys, "default", 0)).checks


async def scenario(rig: Rig) -> None:
    """A rollout that advances once, then v2 fails until the leader rolls it back."""
    rig.clock.now = time.time() - 600  # recent enough for `--since 1h`
    await rig.rollouts.start("default", [10, 50, 100], 8, "test")
    for _ in range(14):
        await rig.second()
    for _ in range(12):
        await rig.second(v2_errors=3)  # 6% errors: above the absolute 5%
        if await rig.split() == "0":
            break
    assert await rig.split() == "0"


def test_each_check_is_kept_capped_newest_first_with_its_windows(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        for n in range(8):
            await rig.second(v1=40, v2=20 + n, v2_errors=1)
        raw = await rig.redis.lrange("strangler:canary:checks:default", 0, -1)
        assert len(raw) == 5  # history_checks
        newest = json.loads(raw[0])
        verdict = await rig.verdict()
        assert newest["at"] == verdict["at"] and newest["status"] == verdict["status"]
        # the summed window the leader judged (4 flushed seconds: 24..27 v2 requests, 1 error each)
        assert newest["v2"]["r"] == verdict["v2"]["requests"] == sum(range(24, 28))
        assert newest["v2"]["e"] == verdict["v2"]["errors"] == 4
        assert newest["v1"]["r"] == 160 and sum(newest["v1"]["b"]) == 160
        assert len(raw[0]) < 400  # compact: trailing empty buckets are not stored
        checks = await stored(rig)
        assert [c.at for c in checks] == sorted(c.at for c in checks)

    run(redis_url, body, history_checks=5)


def test_no_history_when_the_length_is_zero(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        await rig.second()
        assert await rig.redis.exists("strangler:canary:checks:default") == 0
        assert (await rig.verdict())["status"] == "pass"

    run(redis_url, body, history_checks=0)


def test_replay_with_the_running_checks_reproduces_the_leader(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        await scenario(rig)
        checks = await stored(rig)
        result = replay("default", checks, Candidate.of(rig.settings.canary))
        judged = [s for s in result.steps if s.action != NOT_JUDGED]
        assert [s.status for s in judged] == [c.status for c in checks[: len(judged)]]
        assert result.count(ADVANCE, False) == result.count(ADVANCE, True) == 1
        mine, theirs = result.first(ROLLBACK, False), result.first(ROLLBACK, True)
        assert mine is not None and theirs is not None and mine.at == theirs.at
        assert mine.failed_check == "error_rate" and mine.streak == 3
        assert "as the actual rollback did" in summary(result)

    run(redis_url, body)


def test_a_stricter_candidate_rolls_back_earlier_a_looser_one_never(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        await scenario(rig)
        checks = await stored(rig)
        base = Candidate.of(rig.settings.canary)
        strict = Candidate.of(rig.settings.canary, CandidateFile(consecutive_failures=1))
        result = replay("default", checks, strict)
        mine, theirs = result.first(ROLLBACK, False), result.first(ROLLBACK, True)
        assert mine is not None and theirs is not None and theirs.at - mine.at == pytest.approx(2.0)
        assert "2 s earlier than the actual rollback" in summary(result)
        loose = CandidateFile(thresholds=CanaryThresholds(min_requests=20, max_error_rate=0.5,
                                                           max_error_rate_ratio=50))  # fmt: skip
        result = replay("default", checks, Candidate.of(rig.settings.canary, loose))
        assert result.first(ROLLBACK, False) is None
        assert "candidate would not have rolled back" in summary(result)
        # a failing extra check (the seam for gates and judges) fails a check the built-ins pass
        gate = Outcome(Status.FAIL, "orders per minute 3 below 10", "orders")
        result = replay("default", checks, base, [outcome_judge(lambda group, check: gate)])
        first = result.first(ROLLBACK, False)
        assert first is not None and first.failed_check == "orders" and first.at < theirs.at
        # an inconclusive one holds: no advance, never a rollback by itself
        unsure = Outcome(Status.ERROR, "prometheus unreachable", "orders")
        result = replay("default", checks, base, [outcome_judge(lambda group, check: unsure)])
        assert result.count(ADVANCE, False) == 0
        assert result.first(ROLLBACK, False) == replay("default", checks, base).first(ROLLBACK, False)

    run(redis_url, body)


def test_backtest_command_prints_a_timeline_and_a_json_view(redis_url: str, tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await scenario(rig)

    run(redis_url, body)
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text("consecutive_failures: 1\nthresholds:\n  min_requests: 20\n")
    result = cli("canary", "backtest", "--since", "1h", "--gates", str(candidate), "--redis-url", redis_url)
    assert result.exit_code == 0, result.output
    assert "candidate rollback (error_rate" in result.output and "actual rollback" in result.output
    assert "default: candidate would have rolled back at" in result.output and "earlier" in result.output
    result = cli("canary", "backtest", "--since", "1h", "--gates", str(candidate), "--redis-url", redis_url,
                 "--json", "--group", "default")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    jsonschema.validate(doc, SCHEMA, cls=jsonschema.Draft202012Validator)
    group = doc["groups"][0]
    assert group["candidate"]["consecutive_failures"] == 1
    assert group["first_rollback"]["candidate"] < group["first_rollback"]["actual"]
    assert group["advances"] == {"candidate": 1, "actual": 1}
    # nothing stored that recently
    result = cli("canary", "backtest", "--since", "1s", "--redis-url", redis_url)
    assert result.exit_code == 0 and "no stored checks in that time" in result.output


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\xff\xfe garbage", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"status": "pass", "at": NaN, "v1": {"r": 1, "e": 0}, "v2": {"r": 1}}', "at is not a finite"),
        (b'{"status": "pass", "at": 1, "v1": {"r": -1, "e": 0}, "v2": {"r": 1}}', "v1.r is not a count"),
        (b'{"status": "pass", "at": 1, "v1": {"r": 1, "e": 2}, "v2": {"r": 1}}', "more errors"),
        (b'{"status": "pass", "at": 1, "v1": {"r": "1", "e": 0}, "v2": {"r": 1}}', "v1.r is not"),
        (b'{"status": "pass", "at": 1, "v1": {"r": 1, "e": 0, "b": [1e999]}, "v2": {}}', "v1.b"),
        (b'{"status": "pass", "at": 1, "v1": {"r": 1, "e": 0, "b": [' + b"1," * 99 + b"1]}}",
         "v1.b is not a list of at most"),
        (b'{"status": "maybe", "at": 1}', "unknown status"),
        (b'{"status": "pass", "at": true, "v1": {}, "v2": {}}', "at is not a finite"),
        (b'{"status": "pass", "at": 1, "v1": {"r": 1, "e": 0}, "v2": {"r": 1, "e": 0}, "rollout": 3}',
         "rollout is not"),
        (b"[" * 100_000, "above"),
        (b'{"a": "' + b"x" * 70_000 + b'"}', "above"),
    ],
)  # fmt: skip
def test_a_hostile_stored_record_is_one_line_never_a_crash(raw: bytes, problem: str) -> None:
    with pytest.raises(BadRecord) as caught:
        parse(raw)
    assert problem in str(caught.value) and "\n" not in str(caught.value)


def test_hostile_records_in_redis_are_skipped_and_counted(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        rig.clock.now = time.time() - 60
        for _ in range(3):
            await rig.second()
        key = "strangler:canary:checks:default"
        await rig.redis.lpush(key, b"garbage", b'{"status": "pass", "at": NaN}', b"[" * 50_000)
        loaded = await history.read(rig.redis, rig.keys, "default", 0)
        assert len(loaded.checks) == 3 and loaded.skipped == 3 and loaded.first_problem

    run(redis_url, body)
    result = cli("canary", "backtest", "--since", "1h", "--redis-url", redis_url)
    assert result.exit_code == 0, result.output
    assert "3 stored records skipped" in result.output


HTTP_GATE = "{kind: http, name: a, url: 'http://x/', json_path: '$.v', condition: 'result < 1'}"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("thresholds: [1, 2\n", "not valid YAML"),
        ("- 1\n- 2\n", "the top level must be a mapping"),
        ("thresholds:\n  max_error_rat: 0.1\n", "unknown key; did you mean 'max_error_rate'?"),
        ("thresholds:\n  max_error_rate: .nan\n", "thresholds.max_error_rate"),
        ("thresholds:\n  min_requests: many\n", "thresholds.min_requests"),
        ("consecutive_failures: 0\n", "consecutive_failures"),
        ("consecutive_failures: [3]\n", "consecutive_failures"),
        ("group_thresholds: 5\n", "group_thresholds"),
        ("surprise: 1\n", "unknown key"),
        ("thresholds:\n  x: " + "y" * 3_000_000 + "\n", "unknown key"),
        ("\xff", "config file"),
        ("gates:\n  default:\n    - {kind: statsd, name: a}\n", "gates"),
        ("gates:\n  default:\n    - " + HTTP_GATE.replace("< 1", "<<") + "\n", "gates.default[0]"),
        ("gates:\n  default:\n    - " + HTTP_GATE + "\n    - " + HTTP_GATE + "\n", "unique"),
        ("gates: [1]\n", "gates"),
    ],
)  # fmt: skip
def test_a_hostile_candidate_file_is_one_line_exit_2(
    content: str, problem: str, tmp_path: Path, redis_url: str
) -> None:
    path = tmp_path / "candidate.yaml"
    if content == "\xff":
        path.write_bytes(b"\xff\xfe\x00")
    else:
        path.write_text(content)
    from tests.clirun import strangler

    ran = strangler("canary", "backtest", "--gates", str(path), "--redis-url", redis_url)
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert ran.returncode == 2 and len(lines) == 1, ran.stderr
    assert problem in lines[0] and "--gates" in lines[0] and "Traceback" not in ran.stderr


def test_bad_since_and_unknown_group_are_usage_errors(redis_url: str) -> None:
    for args in (["--since", "soon"], ["--since", "-5m"], ["--group", "nope"]):
        result = cli("canary", "backtest", *args, "--redis-url", redis_url)
        assert result.exit_code == 2, result.output


def test_the_documented_candidate_file_loads(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "canary.md").read_text()
    example = text.split("# candidate.yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "candidate.yaml"
    path.write_text(example)
    from proxy.settings import CanarySettings, load_section_file

    given = load_section_file(path, CandidateFile, ("canary",))
    candidate = Candidate.of(CanarySettings(), given)
    assert candidate.consecutive_failures == 2 and candidate.for_group("checkout").max_error_rate == 0.01
    assert candidate.for_group("default").min_requests == 50


def test_judging_parts_other_checks_add_are_kept_and_a_fresh_history_is_marked(redis_url: str) -> None:
    from proxy.canary.analysis import Window

    gates = [{"name": "orders", "status": "pass"}]
    record = {"at": 5.0, "split": 10, "status": "pass", "consecutive_failures": 0,
              "gates": gates, "statistics": {"p": 0.4}, "other": 1}  # fmt: skip
    item = history.entry(record, {"v1": Window.of(1, 0), "v2": Window.of(1, 0)}, None, fresh=True,
                         advance_due=False)  # fmt: skip
    assert item["gates"] == record["gates"] and item["statistics"] == {"p": 0.4} and "other" not in item
    check = parse(json.dumps(item))
    assert check.extras["gates"] == record["gates"] and check.fresh

    async def body(rig: Rig) -> None:
        for _ in range(3):
            await rig.second()
        await rig.rollouts.start("default", [10, 100], 60, "test")
        for _ in range(2):
            await rig.second()
        checks = await stored(rig)
        assert [c.fresh for c in checks] == [True, False, False, True, False]
        assert checks[-1].rollout is not None and checks[-1].rollout.percentage == 10
        assert checks[0].rollout is None

    run(redis_url, body)


def test_increments_cover_each_second_once_for_a_sequential_judge(redis_url: str) -> None:
    async def body(rig: Rig) -> None:
        first = int(rig.clock())
        per_second = {}
        for n in range(12):
            per_second[int(rig.clock())] = n + 1
            await rig.second(v1=10, v2=n + 1)
        checks = await stored(rig)
        incs = [c.increment for c in checks]
        assert all(inc is not None for inc in incs)
        for a, b in zip(incs, incs[1:], strict=False):
            assert a is not None and b is not None and b.start == a.until  # contiguous, no overlap
        start, until = incs[0].start, incs[-1].until  # type: ignore[union-attr]
        assert until == int(rig.clock()) - 2 and start <= first
        counted = sum(inc.v2.requests for inc in incs)  # type: ignore[union-attr]
        assert counted == sum(v for s, v in per_second.items() if start < s <= until)

    run(redis_url, body)


def test_an_advance_the_leader_was_due_but_did_not_make_is_a_hold() -> None:
    from proxy.canary.analysis import Window

    def stored_check(at: float, hold: int, action: str | None) -> Check:
        item = history.entry(
            {"at": at, "split": 10, "status": "pass", "consecutive_failures": 0, "action": action},
            {"v1": Window.of(200, 0, [0.01] * 200), "v2": Window.of(200, 0, [0.01] * 200)},
            {"state": "progressing", "percentage": 10, "interval_seconds": 20, "started_at": 1.0,
             "hold_id": hold, "step_started_at": 0.0},
            fresh=False, advance_due=False,
        )  # fmt: skip
        return parse(json.dumps(item))

    made = [stored_check(10, 1, None), stored_check(20, 1, "advance_due"), stored_check(30, 2, None)]
    refused = [stored_check(10, 1, None), stored_check(20, 1, "advance_due"), stored_check(30, 1, None)]
    candidate = Candidate.of(CanarySettings(check_interval_seconds=10))
    assert replay("default", made, candidate).count(ADVANCE, True) == 1
    assert replay("default", refused, candidate).count(ADVANCE, True) == 0
    assert replay("default", made, candidate).first(ADVANCE, False) is not None


class PastPrometheus:
    """A Prometheus instant-query API on 127.0.0.1 whose answer depends on the ``time`` asked:
    ``value(t)``; it keeps the times it was asked about."""

    def __init__(self, value: Any) -> None:
        import threading
        import urllib.parse
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.asked: list[float] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                at = float(query["time"][0])
                outer.asked.append(at)
                sample = [{"metric": {}, "value": [at, str(value(at))]}]
                answer = {"status": "success", "data": {"resultType": "vector", "result": sample}}
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_candidate_prometheus_gate_is_asked_at_each_past_check_and_rolls_back(
    redis_url: str, tmp_path: Path
) -> None:
    times: list[float] = []

    async def body(rig: Rig) -> None:
        rig.clock.now = time.time() - 600
        await rig.rollouts.start("default", [10, 50, 100], 30, "test")
        for _ in range(12):
            await rig.second()
        times.extend(c.at for c in await stored(rig))

    run(redis_url, body)
    assert len(times) >= 10
    bad_from = times[5]  # the business metric drops from the sixth check on
    prometheus = PastPrometheus(lambda at: 0.5 if at >= bad_from - 0.001 else 0.99)
    try:
        candidate = tmp_path / "gates.yaml"
        gates = [
            {"kind": "prometheus", "name": "checkout", "address": prometheus.url,
             "query": 'checkout_ok{group="{{group}}"}', "condition": "result >= 0.9", "failure_limit": 2},
            # an http gate has no past and nothing was recorded: inconclusive, and dry-run anyway
            {"kind": "http", "name": "fraud", "url": "http://127.0.0.1:9/x", "json_path": "$.v",
             "condition": "result < 1", "dry_run": True},
        ]  # fmt: skip
        candidate.write_text(yaml.safe_dump({"gates": {"default": gates}}))
        ran = cli("canary", "backtest", "--since", "1h", "--gates", str(candidate), "--redis-url", redis_url,
                  "--json")  # fmt: skip
        assert ran.exit_code == 0, ran.output
    finally:
        prometheus.close()
    doc = json.loads(ran.output)
    jsonschema.validate(doc, SCHEMA, cls=jsonschema.Draft202012Validator)
    group = doc["groups"][0]
    assert group["candidate"]["gates"] == ["checkout", "fraud"]
    assert sorted(round(t, 3) for t in prometheus.asked) == sorted(
        round(t, 3) for t in times
    )  # each past check
    assert group["first_rollback"]["actual"] is None
    assert group["first_rollback"]["candidate"] == pytest.approx(times[6])  # the second failure in a row
    step = [s for s in group["timeline"] if s["candidate"]["action"] == "rollback"][0]
    assert step["candidate"]["failed_check"] == "gate:checkout" and "0.5" in step["candidate"]["reason"]


def test_an_unreachable_prometheus_in_a_replay_holds_never_rolls_back(redis_url: str, tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        rig.clock.now = time.time() - 600
        await rig.rollouts.start("default", [10, 50, 100], 3, "test")
        for _ in range(10):
            await rig.second()

    run(redis_url, body)
    from tests.canary.helpers import refused_url

    gate = {"kind": "prometheus", "name": "down", "address": refused_url().rsplit("/", 1)[0],
            "query": "up", "condition": "result > 0", "timeout_seconds": 0.5}  # fmt: skip
    candidate = tmp_path / "gates.yaml"
    candidate.write_text(yaml.safe_dump({"gates": {"*": [gate]}}))
    ran = cli(
        "canary", "backtest", "--since", "1h", "--gates", str(candidate), "--redis-url", redis_url, "--json"
    )
    assert ran.exit_code == 0, ran.output
    group = json.loads(ran.output)["groups"][0]
    assert group["first_rollback"]["candidate"] is None and group["advances"]["candidate"] == 0
    assert group["advances"]["actual"] >= 1  # the leader (no gates) did advance
    assert group["verdicts"]["candidate"].get("error", 0) >= 1


STATISTICAL = {"default": {"judge": "statistical", "min_requests": 20, "max_error_rate": 0.9}}


def test_the_statistical_judge_is_replayed_from_the_stored_increments(redis_url: str, tmp_path: Path) -> None:
    from proxy.canary import replay_judges

    async def body(rig: Rig) -> None:
        rig.clock.now = time.time() - 600
        await rig.rollouts.start("default", [10, 100], 3600, "test")
        for _ in range(4):
            await rig.second()
        for _ in range(10):
            await rig.second(v2_errors=10)  # 20% against v1's 0%: error evidence
            if await rig.split() == "0":
                break
        assert await rig.split() == "0"
        checks = await stored(rig)
        actual = [c for c in checks if c.action == "rolled_back"]
        assert len(actual) == 1 and actual[0].failed_check == "error_evidence"
        assert all(c.extras.get("tally") for c in checks if c.action != "rolled_back")
        # the running configuration, replayed with the judge: the same rollback at the same check
        same = replay("default", checks, Candidate.of(rig.settings.canary), [replay_judges.statistical()])
        mine = same.first(ROLLBACK, False)
        assert mine is not None and mine.at == actual[0].at and mine.failed_check == "error_evidence"
        # the same checks judged by thresholds only (a candidate without the judge): no error_evidence
        plain = Candidate.of(rig.settings.canary, CandidateFile(group_thresholds={}))
        other = replay("default", checks, plain, [replay_judges.statistical()]).first(ROLLBACK, False)
        assert other is None or other.failed_check != "error_evidence"

    run(redis_url, body, group_thresholds=STATISTICAL)
    candidate = tmp_path / "stats.yaml"
    candidate.write_text(yaml.safe_dump({"group_thresholds": STATISTICAL}))
    ran = cli("canary", "backtest", "--since", "1h", "--gates", str(candidate), "--redis-url", redis_url)
    assert ran.exit_code == 0 and "as the actual rollback did" in " ".join(ran.output.split()), ran.output


def test_a_step_held_for_approval_is_not_advanced_by_the_candidate_either() -> None:
    from proxy.canary.analysis import Window

    def stored_check(at: float, held: bool) -> Check:
        record: dict[str, Any] = {"at": at, "split": 10, "status": "pass", "consecutive_failures": 0}
        if held:
            record["step_hold"] = "awaiting approval of the hold at 10%"
        item = history.entry(
            record, {"v1": Window.of(200, 0, [0.01] * 200), "v2": Window.of(200, 0, [0.01] * 200)},
            {"state": "progressing", "percentage": 10, "interval_seconds": 20, "started_at": 1.0,
             "hold_id": 1, "step_started_at": 0.0},
            fresh=False, advance_due=False,
        )  # fmt: skip
        return parse(json.dumps(item))

    candidate = Candidate.of(CanarySettings(check_interval_seconds=10))
    held = [stored_check(at, True) for at in (10, 20, 30, 40)]
    assert replay("default", held, candidate).count(ADVANCE, False) == 0
    free = [stored_check(at, False) for at in (10, 20, 30, 40)]
    assert replay("default", free, candidate).count(ADVANCE, False) == 2
