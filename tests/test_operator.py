"""Operator trust: each control run as a user runs it (the real ``strangler`` app, in-process
through tests/clirun.py; ``serve``, ``demo`` and ``soak``, which start processes, as subprocesses)
against a real Redis and a real proxy, asserting what happened to traffic, to Redis, the exit code
and the one-line output."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.clirun import Ran, strangler
from tests.support import ROOT, Backend, ProxyProcess, RedisServer, free_port, versions_by_user, wait_until

TOKEN = "operator-test-token-0123456789"
TASKS = [{"name": "tasks", "patterns": ["/tasks", "/tasks/**"]}]


def strangler_process(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The console script in its own process, for commands that start processes themselves: no
    STRANGLER_* from the test runner's environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
    clean.update(env or {})
    clean["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        cwd=ROOT, env=clean, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def one_error_line(result: Ran | subprocess.CompletedProcess[str]) -> str:
    """The error output is exactly one line starting with 'error:', never a traceback."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture()
def tasks_proxy(start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    """A proxy with a ``tasks`` route group the CLI's own (empty) config knows nothing about."""
    return start_proxy(routes=TASKS, admin_token=TOKEN)


def admin_env(proxy: ProxyProcess) -> dict[str, str]:
    return {"STRANGLER_ADMIN_URL": proxy.admin, "STRANGLER_ADMIN_TOKEN": TOKEN}


# --- 1. rollback covers every group ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["redis", "admin"])
def test_rollback_without_group_sends_every_group_back_to_v1(
    path: str, tasks_proxy: ProxyProcess, redis_server: RedisServer, redis_url: str
) -> None:
    r = redis_server.client()
    via = ["--redis-url", redis_url] if path == "redis" else ["--url", tasks_proxy.url, "--token", TOKEN]
    assert strangler("set", "40", "--group", "tasks", *via).returncode == 0
    assert strangler("set", "40", *via).returncode == 0
    users = range(60)
    wait_until(lambda: "v2" in versions_by_user(tasks_proxy, users, "/tasks/1").values(), timeout=5)

    result = strangler("rollback", *via)

    assert result.returncode == 0, result.stderr
    assert r.get("feature:v2_traffic_percentage") == "0"
    assert r.get("feature:v2_traffic_percentage:tasks") == "0"
    assert "rolled back default: v2 share 40% -> 0%" in result.stdout
    assert "rolled back tasks: v2 share 40% -> 0%" in result.stdout
    wait_until(
        lambda: set(versions_by_user(tasks_proxy, users, "/tasks/1").values()) == {"v1"},
        timeout=5, message="every tasks user back on v1",
    )  # fmt: skip
    assert set(versions_by_user(tasks_proxy, users, "/").values()) == {"v1"}


# --- 3, 4. set --verify on both paths, and insufficient data is not "verified" --------------------


@pytest.mark.parametrize("path", ["redis", "admin"])
def test_verify_with_only_insufficient_data_is_not_verified(
    path: str, start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer, redis_url: str
) -> None:
    proxy = start_proxy(
        admin_token=TOKEN,
        canary={"check_interval_seconds": 0.3, "window_seconds": 5, "flush_interval_seconds": 0.2,
                "thresholds": {"min_requests": 100000}},
    )  # fmt: skip
    via = ["--redis-url", redis_url] if path == "redis" else ["--url", proxy.url, "--token", TOKEN]

    result = strangler("set", "10", "--verify", "2s", *via)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "check insufficient_data" in result.stdout  # the checks were watched, on both paths
    line = one_error_line(result)
    assert "not verified: insufficient data" in line and "default stays at 10%" in line
    assert redis_server.client().get("feature:v2_traffic_percentage") == "10"


def test_verify_through_the_admin_api_passes_with_enough_traffic(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    proxy = start_proxy(
        admin_token=TOKEN,
        canary={"check_interval_seconds": 0.3, "window_seconds": 5, "flush_interval_seconds": 0.2,
                "thresholds": {"min_requests": 5}},
    )  # fmt: skip
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            n = 0
            while not stop.is_set():
                client.get("/", headers={"X-User-ID": f"u{n % 500}"})
                n += 1

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        result = strangler("set", "50", "--verify", "3s", "--url", proxy.url, "--token", TOKEN)
    finally:
        stop.set()
        thread.join(10)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check pass" in result.stdout and "verified" in result.stdout
    assert redis_server.client().get("feature:v2_traffic_percentage") == "50"


# --- 5. soak never touches a Redis it was not given ------------------------------------------------


def test_soak_ignores_an_exported_redis_url(redis_server: RedisServer, redis_url: str) -> None:
    live = redis_server.client()
    live.set("feature:v2_traffic_percentage", "7")
    live.hset("strangler:shadow", "sample_percentage", "3")
    before = sorted(live.keys("*"))

    result = strangler_process(
        "soak",
        "--seconds",
        "2",
        "--rate",
        "20",
        "--json",
        env={"STRANGLER_REDIS_URL": redis_url},
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["sent"] > 0
    assert sorted(live.keys("*")) == before  # no diff report, no windows, no registration here
    assert live.get("feature:v2_traffic_percentage") == "7"


# --- 7, 12. every error path: one line, consistent exit codes ---------------------------------------


def test_error_paths_print_one_line_and_exit_with_consistent_codes(
    tasks_proxy: ProxyProcess, redis_url: str
) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    dead_api = f"http://127.0.0.1:{free_port()}"
    api = ["--url", tasks_proxy.url, "--token", TOKEN]
    cases: list[tuple[list[str], dict[str, str], int, str]] = [
        (["serve", "--v1", "localhost:8001"], {}, 2, "must look like http://host:port[/base]"),
        (["status", "--url", "foo"], {}, 2, "must look like http://host:port[/_strangler]"),
        (["status", "--url", "http://h:99999"], {}, 2, "[/_strangler]: Port out of range 0-65535"),
        (["status", "--url", "http://[::1"], {}, 2, "[/_strangler]: Invalid IPv6 URL"),
        (["rollback"], {"STRANGLER_ADMIN_URL": "localhost:8080"}, 2, "admin URL 'localhost:8080'"),
        (["status", "--config", "/nonexistent/s.yaml"], {}, 2, "does not exist"),
        (["set", "abc", "--redis-url", redis_url], {}, 2, "not a percentage between 0 and 100"),
        (["set", "nan", *api], {}, 2, "invalid percentage"),
        (["set", "inf", *api], {}, 2, "invalid percentage"),
        (["set", "5", "--group", "nope", "--redis-url", redis_url], {}, 2, "unknown group 'nope'"),
        (["set", "5", "--group", "nope", *api], {}, 2, "unknown group"),
        (["rollout", "pause", "--redis-url", redis_url], {}, 2, "no rollout"),
        (["rollout", "pause", *api], {}, 2, "rejected"),
        (["rollout", "watch", "--timeout", "soon", "--redis-url", redis_url], {}, 2, "soon"),
        (["shadow", "set", "--sample", "500", "--redis-url", redis_url], {}, 2, "500"),
        (["set", "5", "--redis-url", dead_redis], {}, 1, f"Redis at {dead_redis} is unreachable"),
        (["rollback", "--url", dead_api], {}, 1, "is unreachable"),
        (["diffs", "--url", dead_api], {}, 1, "is unreachable"),
        (["set", "5", "--url", tasks_proxy.url, "--token", "wrong"], {}, 2, "401"),
    ]
    missing_peer = _a_missing_bench_peer()
    if missing_peer is not None:  # with the bench extra installed, both peers are there
        bench = ["bench", "--peer", missing_peer, "--seconds", "1"]
        cases.append((bench, {}, 1, "pip install '.[bench]'"))
    for args, env, code, text in cases:
        result = strangler(*args, env=env)
        line = one_error_line(result)
        assert result.returncode == code, (args, result.returncode, line)
        assert text in line, (args, line)


def test_version_short_help_and_no_rst_markup_in_help() -> None:
    version = strangler("--version")
    assert version.returncode == 0 and re.fullmatch(r"strangler \S+\n", version.stdout)
    assert strangler("-h").returncode == 0
    commands = [
        [], ["status"], ["set"], ["rollback"], ["bench"], ["soak"], ["demo"], ["serve"], ["diffs"],
        ["rollout"], ["rollout", "start"], ["rollout", "promote"], ["rollout", "watch"],
        ["shadow"], ["shadow", "set"], ["shadow", "ignore", "add"],
        ["deprecations"], ["deprecations", "phase"],
    ]  # fmt: skip
    for command in commands:
        shown = strangler(*command, "-h")
        assert shown.returncode == 0, (command, shown.stderr)
        assert "``" not in shown.stdout and ":class:" not in shown.stdout, (command, shown.stdout)
    bench = strangler("bench", "-h").stdout
    assert "--connections" in bench and "-c," not in bench  # -c is --config everywhere else
    assert strangler("bench", "-c", "5").returncode == 2


# --- 8. route groups known from Redis, both paths, both views of status agree ----------------------


def test_groups_registered_by_the_proxy_work_with_every_command(
    tasks_proxy: ProxyProcess, redis_server: RedisServer, redis_url: str
) -> None:
    r = redis_server.client()
    registered = r.hgetall("strangler:groups")
    assert set(registered) == {"default", "tasks"}
    assert json.loads(registered["tasks"])["patterns"] == ["/tasks", "/tasks/**"]
    via_redis = ["--redis-url", redis_url]
    via_api = ["--url", tasks_proxy.url, "--token", TOKEN]

    assert strangler("set", "30", "--group", "tasks", *via_redis).returncode == 0
    assert r.get("feature:v2_traffic_percentage:tasks") == "30"
    wait_until(lambda: json.loads(r.hget("strangler:groups", "tasks") or "{}").get("serving") == 30.0)
    from_redis = json.loads(strangler("status", "--json", *via_redis).stdout)
    from_api = json.loads(strangler("status", "--json", *via_api).stdout)
    redis_view = {row["group"]: row["percentage"] for row in from_redis["groups"]}
    api_view = {row["group"]: row["percentage"] for row in from_api["groups"]}
    assert redis_view == api_view == {"default": 0.0, "tasks": 30.0}

    for via in (via_redis, via_api):
        started = strangler("rollout", "start", "--group", "tasks", "--steps", "5,100", "--interval", "1h",
                            "--json", *via)  # fmt: skip
        assert started.returncode == 0, started.stderr
        assert json.loads(started.stdout)["group"] == "tasks"
        assert r.get("feature:v2_traffic_percentage:tasks") == "5"
        status = strangler("rollout", "status", "--group", "tasks", "--json", *via)
        assert json.loads(status.stdout)["rollout"]["state"] == "progressing"
        assert strangler("rollout", "abort", "--group", "tasks", *via).returncode == 0
        assert r.get("feature:v2_traffic_percentage:tasks") == "0"

        on = strangler("shadow", "on", "--group", "tasks", *via)
        assert on.returncode == 0, on.stderr
        assert r.hget("strangler:shadow", "group:tasks:enabled") in ("true", "True", "1")
        assert "the global switch is off" in on.stdout  # said, since the proxy's config has shadow off
        shadow = json.loads(strangler("shadow", "status", "--json", *via).stdout)
        assert "tasks" in shadow["groups"]
        assert strangler("shadow", "off", "--group", "tasks", *via).returncode == 0
        assert r.hget("strangler:shadow", "group:tasks:enabled") in ("false", "False", "0")
        diffs = strangler("diffs", "--json", *via)
        assert diffs.returncode == 0 and "endpoints" in json.loads(diffs.stdout)


# --- 9. rollout watch: readable at 80 columns, non-zero on timeout ---------------------------------


def test_rollout_watch_fits_80_columns_and_fails_on_timeout(redis_url: str) -> None:
    via = ["--redis-url", redis_url]
    assert (
        strangler("rollout", "start", "--steps", "1,5,10,25,50,100", "--interval", "1h", *via).returncode == 0
    )

    timed_out = strangler("rollout", "watch", "--timeout", "1s", *via, columns=80)

    assert timed_out.returncode == 1
    line = one_error_line(timed_out)
    assert "timed out after 1s, still progressing at 1%" in line
    for text in timed_out.stdout.splitlines():
        assert len(text) <= 80 and "…" not in text, text
    assert re.search(r"\[#?\.{19,20}\]\s+1% progressing, step 1/6", timed_out.stdout), timed_out.stdout

    assert strangler("rollout", "promote", "--full", *via).returncode == 0
    done = strangler("rollout", "watch", "--timeout", "5s", *via, columns=80)
    assert done.returncode == 0, done.stderr
    assert "[####################]   100% completed, step 6/6" in done.stdout
    assert "completed at 100%" in done.stdout


# --- 10, 12. invalid Redis value: status shows it and what proxies serve; counted once ------------


def test_status_after_an_invalid_value_shows_it_and_what_the_proxies_serve(
    proxy: ProxyProcess, redis_server: RedisServer, redis_url: str
) -> None:
    r = redis_server.client()
    assert strangler("set", "40", "--redis-url", redis_url).returncode == 0
    wait_until(lambda: json.loads(r.hget("strangler:groups", "default") or "{}").get("serving") == 40.0)
    r.set("feature:v2_traffic_percentage", "abc")
    wait_until(lambda: proxy.metric("strangler_invalid_control_values_total") >= 1, timeout=5)
    time.sleep(1.0)  # several polls (0.2 s) with the same bad value

    assert proxy.metric("strangler_invalid_control_values_total") == 1  # once per bad value, not per poll
    data = json.loads(strangler("status", "--json", "--redis-url", redis_url).stdout)
    row = data["groups"][0]
    assert row["raw"] == "abc" and row["valid"] is False
    assert row["percentage"] == 40.0 and row["serving"] == 40.0
    table = strangler("status", "--redis-url", redis_url)
    assert "abc (INVALID)" in table.stdout
    assert (
        "invalid value in Redis for default: 'abc' ignored; proxies keep serving their last good value: 40%"
        in (" ".join(table.stdout.split()))
    )
    r.set("feature:v2_traffic_percentage", "150")  # a second, different bad value counts again
    wait_until(lambda: proxy.metric("strangler_invalid_control_values_total") == 2, timeout=5)


# --- 11. quick start: stable embedded Redis port, demo on busy ports ------------------------------


@pytest.fixture()
def held_port() -> Iterator[int]:
    """A port something else is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_embedded_redis_uses_its_port_or_says_which_one_it_took(
    tmp_path: Path, v1v2: tuple[Backend, Backend], held_port: int
) -> None:
    v1, v2 = v1v2
    wanted = free_port()
    proxy = ProxyProcess(
        tmp_path / "a", {"v1_url": v1.url, "v2_url": v2.url, "embedded_redis_port": wanted}
    ).start()
    try:
        assert re.search(rf"embedded Redis at redis://127\.0\.0\.1:{wanted}/0", proxy.output())
        assert strangler("set", "5", "--redis-url", f"redis://127.0.0.1:{wanted}/0").returncode == 0
    finally:
        proxy.stop()
    busy = ProxyProcess(
        tmp_path / "b", {"v1_url": v1.url, "v2_url": v2.url, "embedded_redis_port": held_port}
    )
    busy.start()
    try:
        url = re.search(r"embedded Redis at (redis://\S+)", busy.output())
        assert url is not None and f":{held_port}/" not in url.group(1)
        redis.Redis.from_url(url.group(1)).ping()
    finally:
        busy.stop()


def test_demo_on_busy_ports_takes_free_ones_and_says_so(tmp_path: Path, held_port: int) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        proxy_port = int(other.getsockname()[1])
        result = strangler_process(
            "demo", "--port", str(proxy_port), "--v1-port", str(held_port), "--v2-port", "0",
            "--rate", "5", "--duration", "3", timeout=90,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert f"demo: port {held_port} is in use; the v1 backend takes a free port" in result.stdout
    assert f"demo: port {proxy_port} is in use; the proxy takes a free port" in result.stdout
    assert "demo stopped" in result.stdout


# --- 12. admin API with Redis down, orphaned embedded Redis, Ctrl-C --------------------------------


def test_admin_api_answers_503_json_when_redis_is_down(
    proxy_factory: Callable[..., ProxyProcess],
    v1v2: tuple[Backend, Backend],
    redis_factory: Callable[[], RedisServer],
) -> None:
    v1, v2 = v1v2
    own = redis_factory()
    proxy = proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=own.url, admin_token=TOKEN)
    own.kill()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    answer = httpx.put(proxy.admin + "/split", json={"percentage": 5}, headers=headers, timeout=10)
    assert answer.status_code == 503
    assert answer.json()["error"] == "redis unavailable"
    assert "Traceback" not in proxy.output()
    result = strangler("set", "5", "--url", proxy.url, "--token", TOKEN)
    assert result.returncode == 1 and "503" in one_error_line(result)


def _serve_in_own_session(workdir: Path, v1: Backend, v2: Backend) -> tuple[subprocess.Popen[bytes], Path]:
    """``strangler serve`` with an embedded Redis, in its own process group (a terminal's job)."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "s.yaml"
    port = free_port()
    config.write_text(yaml.safe_dump({
        "v1_url": v1.url, "v2_url": v2.url, "port": port, "embedded_redis_port": 0, "log_level": "info",
    }))  # fmt: skip
    log = workdir / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
            cwd=workdir, env={**env, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    health = f"http://127.0.0.1:{port}/_strangler/health"
    wait_until(lambda: httpx.get(health, timeout=1).status_code == 200, timeout=20, message="serve up")
    return process, log


def _redis_url_in(log: Path) -> str:
    found = re.search(r"strangler: embedded Redis at (redis://\S+)", log.read_text())
    assert found is not None, log.read_text()
    return found.group(1)


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.3).ping())
    except (redis.RedisError, OSError):
        return False


def test_sigkill_of_serve_takes_its_embedded_redis_down(
    tmp_path: Path, v1v2: tuple[Backend, Backend]
) -> None:
    process, log = _serve_in_own_session(tmp_path, *v1v2)
    url = _redis_url_in(log)
    assert _answers(url)
    process.kill()  # SIGKILL to serve alone: nothing of ours runs to stop Redis
    process.wait()
    wait_until(lambda: not _answers(url), timeout=10, message="embedded Redis gone with its serve")


def test_an_orphaned_embedded_redis_is_replaced_not_silently_reused(
    tmp_path: Path, v1v2: tuple[Backend, Backend], redis_factory: Callable[[], RedisServer]
) -> None:
    orphan = redis_factory()  # stands for a redis-server left behind by a serve that was killed
    directory = tmp_path / ".strangler" / "redis"
    directory.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (directory / "redis.url").write_text(f"{orphan.url}\n{dead.pid}\n")
    process, log = _serve_in_own_session(tmp_path, *v1v2)
    try:
        url = _redis_url_in(log)
        assert "stopping an orphaned embedded Redis" in log.read_text()
        assert orphan.process is not None
        wait_until(lambda: orphan.process.poll() is not None, timeout=10, message="orphan shut down")
        assert _answers(url)  # and a fresh instance of ours serves instead
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(20)


def test_ctrl_c_stops_serve_without_a_false_redis_warning(
    tmp_path: Path, v1v2: tuple[Backend, Backend]
) -> None:
    process, log = _serve_in_own_session(tmp_path, *v1v2)
    url = _redis_url_in(log)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
    assert process.wait(20) == 0
    text = log.read_text()
    assert "redis unreachable" not in text, text
    wait_until(lambda: not _answers(url), timeout=10)


# --- 12. the demo's suggested rollout advances at its default rate --------------------------------


@pytest.mark.soak  # waits for the demo's real default step interval (~30 s): the long run
def test_demo_suggested_rollout_advances_at_the_default_rate(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "demo", "--port", str(port), "--v1-port", "0",
             "--v2-port", "0", "--duration", "120"],
            cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        hint = wait_until(
            lambda: re.search(r"^\s+(strangler rollout start .*)$", log.read_text(), re.M), timeout=30
        ).group(1)
        admin = f"http://127.0.0.1:{port}/_strangler"
        token = (tmp_path / ".strangler" / "admin-token").read_text().strip()  # the banner's export
        assert token not in log.read_text()  # the banner names the file, never the token
        env = {"STRANGLER_ADMIN_URL": admin, "STRANGLER_ADMIN_TOKEN": token}
        started = strangler(*hint.split()[1:], env=env)
        assert started.returncode == 0, started.stderr

        def step() -> float:
            state: dict[str, Any] = httpx.get(admin + "/rollout", params={"group": "tasks"}, timeout=5).json()
            return float(state["percentage"])

        wait_until(lambda: step() >= 25, timeout=70, interval=1, message="the rollout advanced a step")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _a_missing_bench_peer() -> str | None:
    import importlib.util

    from proxy.bench import envoy_binary

    if importlib.util.find_spec("asgiproxy") is None:
        return "asgiproxy"
    return "envoy" if envoy_binary() is None else None
