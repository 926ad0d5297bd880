"""`strangler demo` for real: a few seconds of traffic, both versions serve, the seeded diff shows."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.support import ROOT, free_port, metric_value, wait_until


def renamed_field_reported(admin: str) -> dict[str, Any] | None:
    """The shadow report's entry for the task detail endpoint once it shows owner -> assignee."""
    for entry in httpx.get(admin + "/diffs", timeout=5).json().get("endpoints", []):
        fields = {field for field, _ in entry.get("top_fields", [])}
        if (
            entry["endpoint"].startswith("GET /api/tasks/")
            and {"root['owner']", "root['assignee']"} <= fields
        ):
            return dict(entry)
    return None


def test_demo_runs_serves_both_versions_and_reports_the_seeded_difference(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "demo", "--port", str(port), "--v1-port", "0",
             "--v2-port", "0", "--rate", "40", "--duration", "60"],
            cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        admin = f"http://127.0.0.1:{port}/_strangler"
        wait_until(
            lambda: httpx.get(admin + "/health", timeout=1).status_code == 200, timeout=30, message="demo up"
        )

        # the banner is printed once the proxy is up, a moment after /health first answers
        def banner() -> str:
            text = log.read_text()
            return text if "strangler rollout start" in text else ""

        text = wait_until(banner, timeout=10, message="demo banner")
        assert "strangler status" in text and "strangler set 25" in text and "strangler rollout start" in text
        redis_url = re.search(r"redis\s+(redis://\S+)", text)
        assert redis_url is not None, text

        def both_versions_served() -> bool:
            metrics = httpx.get(admin + "/metrics", timeout=5).text
            return all(metric_value(metrics, "http_requests_total", version=v) > 0 for v in ("v1", "v2"))

        wait_until(both_versions_served, timeout=30, message="v1 and v2 both served demo traffic")
        entry = wait_until(
            lambda: renamed_field_reported(admin), timeout=30, message="owner -> assignee diff"
        )
        assert entry["mismatched"] > 0
        assert httpx.get(f"http://127.0.0.1:{port}/api/v0/export").status_code == 410
        assert "deprecation" in httpx.get(f"http://127.0.0.1:{port}/api/v0/tasks").headers

        process.send_signal(signal.SIGINT)  # Ctrl-C stops everything cleanly
        assert process.wait(timeout=30) == 0, log.read_text()
        assert "demo stopped" in log.read_text()
        gone = redis.Redis.from_url(redis_url.group(1), socket_connect_timeout=0.5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                gone.ping()
            except redis.ConnectionError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the demo's Redis still answers after Ctrl-C")
    finally:
        if process.poll() is None:  # a failed assertion above: stop it the way a user would first,
            process.send_signal(signal.SIGINT)  # so its embedded Redis is not left behind
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
