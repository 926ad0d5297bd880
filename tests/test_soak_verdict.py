"""`strangler soak` gives a verdict: a line per interval (requests, errors, error rate, RSS), then PASS
or FAIL against ``--max-error-rate`` and ``--max-rss-growth``, and the exit code by it.

Two seconds each against a real proxy whose v1 answers 500 to about a third of the requests: a
tight error-rate threshold fails, a loose one passes. (The whole stack the command starts by
itself is covered by tests/faults/test_soak_smoke.py, in the soak suite.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from tests.clirun import strangler
from tests.support import Backend, ProxyProcess

SOAK = ("soak", "--seconds", "2", "--rate", "60", "--interval", "1")


@pytest.fixture()
def failing_third(start_proxy: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend]) -> Any:
    v1, _ = v1v2
    proxy = start_proxy()
    v1.control(error_rate=0.33)
    yield proxy
    v1.control(error_rate=0)


def test_a_tight_error_rate_fails_with_exit_1(failing_third: ProxyProcess) -> None:
    result = strangler(*SOAK, "--target", failing_third.url, "--max-error-rate", "5")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    intervals = [line for line in lines if line.startswith("t=")]
    assert len(intervals) >= 2
    assert all(
        re.search(r"sent=\s*\d+ .*errors=\s*\d+\s+error_rate=\s*[\d.]+% .*rss=", line) for line in intervals
    )
    rate = float(re.search(r"error_rate_percent: ([\d.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    assert 10 < rate < 60
    assert re.fullmatch(r"soak: FAIL: error rate [\d.]+% > 5%", lines[-1]), lines[-1]


def test_a_loose_error_rate_passes_and_json_is_one_document(failing_third: ProxyProcess) -> None:
    result = strangler(*SOAK, "--target", failing_third.url, "--max-error-rate", "90", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)  # the interval lines went to stderr
    assert document["verdict"] == "pass" and document["failures"] == []
    assert document["max_error_rate_percent"] == 90 and document["max_rss_growth_mb"] == 50
    assert 10 < document["error_rate_percent"] < 60
    assert document["sent"] >= 100 and document["errors"] > 0
    assert sum(line.startswith("t=") for line in result.stderr.splitlines()) >= 2


def test_the_verdict_lines_from_the_figures() -> None:
    """PASS and an RSS failure, from a report's figures alone (no server)."""
    from proxy.soak import Interval, SoakReport

    mb = 2**20
    intervals = [
        Interval(t_end=1, sent=1000, errors=1, rss=100 * mb),
        Interval(t_end=2, sent=1000, rss=180 * mb),
    ]
    report = SoakReport(2, 1000, intervals, 90 * mb, 100 * mb, 180 * mb, {"status 500": 1})
    assert report.verdict_line(0.1, 100) == (
        "soak: PASS: error rate 0.05% <= 0.1%, RSS growth after warm-up 80.0 MB <= 100 MB"
    )
    assert report.verdict_line(0.01, 50) == (
        "soak: FAIL: error rate 0.05% > 0.01%; RSS grew 80.0 MB after warm-up > 50 MB"
    )


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("--rate", "-5"), "error: --rate must be above 0 requests per second (got -5)"),
        (("--seconds", "0"), "error: --seconds must be above 0 (got 0)"),
        (("--split", "101"), "error: --split must be between 0 and 100 (got 101)"),
        (("--max-error-rate", "-1"), "error: --max-error-rate must be 0 or more percent (got -1)"),
        (
            ("--target", "localhost:8080"),
            "error: --target must be an http:// or https:// URL (got 'localhost:8080')",
        ),
    ],
)
def test_an_option_that_cannot_run_is_one_line_before_anything_starts(
    args: tuple[str, ...], line: str
) -> None:
    """Checked before a stack starts: exit 2 and the one line, nothing on stdout."""
    result = strangler("soak", *args)
    assert (result.returncode, result.stderr.strip(), result.stdout) == (2, line, "")
