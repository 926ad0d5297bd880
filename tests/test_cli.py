"""The CLI for people: clear messages and non-zero exits when Redis is unreachable or a value is bad."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clirun import strangler
from tests.support import ROOT, RedisServer, free_port


def test_the_console_script_runs_the_same_app(redis_url: str) -> None:
    """The one real process here: the installed ``strangler`` script parses, exits 2 and prints one
    error line; every other test runs the same app in-process (tests/clirun.py)."""
    script = Path(sys.executable).with_name("strangler")  # [project.scripts], installed by scripts/test
    assert script.exists(), script
    result = subprocess.run(
        [str(script), "set", "abc", "--redis-url", redis_url],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: 'abc' is not a percentage between 0 and 100"]


def test_set_status_rollback_against_redis(redis_server: RedisServer, redis_url: str) -> None:
    assert strangler("set", "12.5", "--redis-url", redis_url).returncode == 0
    assert redis_server.client().get("feature:v2_traffic_percentage") == "12.5"
    status = strangler("status", "--json", "--redis-url", redis_url)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["redis_ok"] is True
    assert data["groups"][0]["group"] == "default"
    assert data["groups"][0]["percentage"] == 12.5
    table = strangler("status", "--redis-url", redis_url)
    assert "default" in table.stdout and "12.5" in table.stdout
    assert strangler("rollback", "--redis-url", redis_url).returncode == 0
    assert redis_server.client().get("feature:v2_traffic_percentage") == "0"


def test_invalid_percentage_is_refused_and_nothing_written(redis_server: RedisServer, redis_url: str) -> None:
    for bad in ("abc", "150", "nan"):
        result = strangler("set", bad, "--redis-url", redis_url)
        assert result.returncode == 2
        assert "not a percentage between 0 and 100" in result.stderr
    assert redis_server.client().get("feature:v2_traffic_percentage") is None


def test_unknown_group_is_refused(redis_url: str) -> None:
    result = strangler("set", "5", "--group", "nope", "--redis-url", redis_url)
    assert result.returncode == 2
    assert "unknown group 'nope'" in result.stderr


def test_unreachable_redis_is_a_clear_error(redis_url: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    for args in (("status",), ("set", "5"), ("rollback",)):
        result = strangler(*args, "--redis-url", dead)
        assert result.returncode == 1, result
        assert f"Redis at {dead} is unreachable" in result.stderr


def test_bad_config_file_is_a_clear_error(tmp_path: object) -> None:
    result = strangler("status", "--config", "/nonexistent/strangler.yaml")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: /nonexistent/strangler.yaml: config file does not exist"]


def test_status_shows_the_running_proxys_snapshot_age(proxy: object, redis_url: str) -> None:
    """With a config naming the proxy's address, status adds the proxy's own view of Redis."""
    import yaml

    from tests.support import ProxyProcess

    assert isinstance(proxy, ProxyProcess)
    config = proxy.workdir / "status-check.yaml"
    config.write_text(yaml.safe_dump({"port": proxy.port, "redis_url": redis_url}))
    result = strangler("status", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)["proxy"]
    assert view["redis_ok"] is True
    assert 0 <= view["snapshot_age_seconds"] < 5
    table = strangler("status", "--config", str(config))
    assert "Redis reachable, snapshot age" in table.stdout


def test_deprecation_overrides_through_redis(
    redis_server: RedisServer, redis_url: str, tmp_path: Path
) -> None:
    """Without --url, `deprecations phase` checks the value against the config, then writes Redis."""
    import yaml

    rule = {"name": "old-orders", "pattern": "/orders/**", "deprecated_at": "2025-01-01",
            "sunset_at": "2099-01-01"}  # fmt: skip
    config = tmp_path / "deprecations.yaml"
    config.write_text(yaml.safe_dump({"redis_url": redis_url, "deprecations": [rule]}))
    r = redis_server.client()
    bad = strangler("deprecations", "phase", "old-orders", "sideways", "--config", str(config))
    assert bad.returncode == 2 and "error:" in bad.stderr
    assert r.hget("strangler:deprecations", "old-orders") is None
    done = strangler("deprecations", "phase", "old-orders", "gone", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "deprecation rule old-orders: phase gone" in done.stdout
    assert r.hget("strangler:deprecations", "old-orders") == "gone"
    cleared = strangler("deprecations", "clear", "old-orders", "--config", str(config))
    assert cleared.returncode == 0 and "live override removed" in cleared.stdout
    assert r.hget("strangler:deprecations", "old-orders") is None


def test_demo_without_the_tools_extra_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pip install .` is the proxy alone; demo (and soak) need the tools extra (aiohttp, psutil)."""
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # what find_spec reports when it is not installed
    result = strangler("demo", "--duration", "1")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        "error: strangler demo needs aiohttp (the 'tools' extra): "
        "pip install '.[tools]' in the strangler checkout"
    ]


def test_soak_without_the_tools_extra_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for soak (its backends and load are aiohttp, its RSS psutil): one line before
    anything starts, not a stack that waits 20 s for backends that cannot start."""
    monkeypatch.setitem(sys.modules, "psutil", None)
    result = strangler("soak", "--seconds", "1")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        "error: strangler soak needs psutil (the 'tools' extra): "
        "pip install '.[tools]' in the strangler checkout"
    ]
