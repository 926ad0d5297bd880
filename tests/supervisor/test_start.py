"""A first-generation worker that cannot start ends the start: one line naming the worker and why,
never "ready"; settings that parse but cannot run are bad input (exit 2), as `config check` says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.clirun import strangler
from tests.support import ROOT, Backend, free_port


def test_settings_no_worker_can_run_end_the_start_in_one_line(
    tmp_path: Path, v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump({
        "v1_url": v1.url, "v2_url": v2.url, "port": free_port(), "redis_url": redis_url, "workers": 2,
        "control_socket": str(tmp_path / "c.sock"),
        # valid settings; the pin secret's file cannot be made there (a worker builds it)
        "session_pinning": {"groups": ["*"], "secret_file": "/proc/no-such-dir/secret"},
    }))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "-c", str(config)],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "error: worker 0 did not start: [Errno 2] No such file or directory: '/proc/no-such-dir'"
    ] or result.stderr.splitlines() == [
        "error: worker 1 did not start: [Errno 2] No such file or directory: '/proc/no-such-dir'"
    ]
    assert "strangler ready" not in result.stdout + result.stderr
    checked = strangler("config", "check", str(config))
    assert (checked.returncode, checked.stderr.splitlines()) == (
        2, [f"error: {config}: [Errno 2] No such file or directory: '/proc/no-such-dir'"]
    )  # fmt: skip
