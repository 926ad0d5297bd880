"""`strangler soak` end to end for two seconds: the command starts its stack, reports, cleans up.
The real soak (10 minutes at 1,000 req/s) is run by hand; its figures go in the issue note."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.soak


def test_soak_command_reports_rate_errors_latency_and_rss() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "soak",
            "--seconds",
            "2",
            "--rate",
            "50",
            "--interval",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()  # with --json, the interval lines go to stderr
    assert sum(line.startswith("t=") for line in lines) >= 2, "one line per interval"
    summary = json.loads(result.stdout)  # and stdout is one document
    assert summary["errors"] == 0 and summary["error_rate_percent"] == 0
    assert summary["verdict"] == "pass" and summary["failures"] == []
    assert summary["sent"] >= 90
    assert summary["rss_start_mb"] > 0 and summary["rss_end_mb"] > 0
    assert summary["p99_ms"] >= summary["p50_ms"] > 0
