"""Validated live reload (issue 26, item 1): ``strangler reload`` and SIGHUP re-read the sources
serve started from, validate everything, and put a new generation of workers on the same sockets;
an invalid file, or one that changes what only a restart can, changes nothing.

Real ``strangler serve`` processes; ``strangler reload`` and ``config check`` run in-process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from proxy.settings import ConfigError, load_settings
from tests.clirun import strangler
from tests.supervisor.conftest import Load, Supervised
from tests.support import Backend, free_port, metric_value, wait_until

RELOADED = re.compile(r"reloaded: generation (\d+), (\d+) workers? ready in \d+\.\d\d s")


def versions_on_new_connections(url: str, count: int = 20) -> set[str]:
    """The versions answering ``count`` new connections (spread by the kernel over every worker);
    raw sockets, so a round takes milliseconds."""
    port = int(url.rsplit(":", 1)[1])
    seen = set()
    for i in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            sock.sendall(f"GET /probe/{i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        seen.add(json.loads(data.split(b"\r\n\r\n", 1)[1])["version"])
    return seen


def test_a_changed_backend_url_under_keep_alive_load_loses_nothing(
    supervised: Callable[..., Supervised],
    load: Callable[..., Load],
    backend_factory: Callable[[str], Backend],
) -> None:
    v3 = backend_factory("v3")
    sup = supervised(workers=2)
    proxy = sup.proxy
    traffic = load(proxy.url, {"v1", "v3"})
    wait_until(lambda: len(traffic.answers) > 50, timeout=10)
    sup.rewrite(v1_url=v3.url)
    ran = strangler("reload", "--socket", str(sup.socket))
    done = time.monotonic()
    assert ran.returncode == 0, ran.stderr
    said = RELOADED.fullmatch(ran.stdout.strip())
    assert said is not None and said.groups() == ("2", "2"), ran.stdout
    wait_until(lambda: versions_on_new_connections(proxy.url) == {"v3"}, timeout=1.0)
    wait_until(lambda: any(t > done and v == "v3" for t, v in traffic.answers), timeout=5)
    wait_until(lambda: all(w["generation"] == 2 for w in sup.status()["workers"]), timeout=15)  # old drained
    traffic.__exit__()
    assert traffic.failures == []
    assert traffic.wrong == []
    assert metric_value(proxy.metrics(), "strangler_config_reloads_total", result="ok") == 1
    assert metric_value(proxy.metrics(), "strangler_generation") == 2


def test_an_invalid_file_changes_nothing(supervised: Callable[..., Supervised]) -> None:
    sup = supervised(workers=2)
    proxy = sup.proxy
    before = wait_until(lambda: len(sup.workers()) == 2 and sup.workers(), timeout=10)
    sup.rewrite(drain_timeout_seconds=-1)
    try:
        load_settings(sup.config)
    except ConfigError as exc:
        expected = f"error: {exc}"
    assert expected.startswith(f"error: {sup.config}:"), expected
    ran = strangler(
        "reload", "-c", str(sup.config), cwd=Path(sup.config).parent
    )  # finds the socket in the file
    assert (ran.returncode, ran.stdout, ran.stderr.splitlines()) == (2, "", [expected])
    assert sup.workers() == before and sup.status()["generation"] == 1
    assert versions_on_new_connections(proxy.url) == {"v1"}
    assert metric_value(proxy.metrics(), "strangler_config_reloads_total", result="invalid") == 1
    assert (
        f"ERROR strangler: reload refused, nothing changed: {expected.removeprefix('error: ')}"
        in proxy.output()
    )


def test_what_cannot_change_live_is_named_in_the_refusal(supervised: Callable[..., Supervised]) -> None:
    sup = supervised()
    port, other = sup.proxy.port, free_port()
    sup.rewrite(port=other)
    ran = strangler("reload", "--socket", str(sup.socket))
    assert (ran.returncode, ran.stderr.splitlines()) == (
        2, [f"error: reload: port: cannot change live ({port} -> {other}); restart"]
    )  # fmt: skip
    assert sup.status()["generation"] == 1
    assert metric_value(sup.proxy.metrics(), "strangler_config_reloads_total", result="invalid") == 1


def test_a_file_that_parses_but_cannot_run_keeps_the_old_generation(
    supervised: Callable[..., Supervised], tmp_path: Path
) -> None:
    sup = supervised()
    missing = tmp_path / "missing.pem"
    sup.rewrite(tls_cert_file=str(missing), tls_key_file=str(missing))
    ran = strangler("reload", "--socket", str(sup.socket), "--json")
    assert ran.returncode == 2
    answer = json.loads(ran.stdout)
    assert answer["result"] == "invalid"
    assert (
        answer["error"] == f"tls_cert_file: cannot load {missing} with {missing}: No such file or directory"
    )
    assert sup.status()["generation"] == 1
    assert versions_on_new_connections(sup.proxy.url, 3) == {"v1"}


def test_sighup_reloads(
    supervised: Callable[..., Supervised], backend_factory: Callable[[str], Backend]
) -> None:
    v3 = backend_factory("v3")
    sup = supervised(workers=2, log_level="info")
    assert sup.proxy.process is not None
    sup.rewrite(v1_url=v3.url)
    os.kill(sup.proxy.process.pid, signal.SIGHUP)
    wait_until(lambda: versions_on_new_connections(sup.proxy.url) == {"v3"}, timeout=5)
    assert sup.status()["generation"] == 2
    logged = r"INFO strangler: reloaded: generation 2, 2 workers ready in \d+\.\d\d s; generation 1 drains"
    assert re.search(logged, sup.proxy.output()), sup.proxy.output()
    assert metric_value(sup.proxy.metrics(), "strangler_config_reloads_total", result="ok") == 1


def test_reload_where_no_proxy_answers_says_where_it_looked(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    ran = strangler("reload", "--socket", str(path))
    assert (ran.returncode, ran.stderr.splitlines()) == (
        1, [f"error: no proxy answers at {path} (no such socket; is strangler serve running here?)"]
    )  # fmt: skip


def test_config_check(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "workers: 2\nroutes:\n  - {name: users, patterns: [/users/*]}\n"
        "deprecations:\n  - {name: old, pattern: /old, deprecated_at: '2026-01-01'}\n"
    )
    ran = strangler("config", "check", str(good))
    assert (ran.returncode, ran.stdout.splitlines()) == (
        0,
        [f"ok: {good} (1 route group, 1 deprecation rule, workers 2)"],
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: 2\nport: many\n")
    ran = strangler("config", "check", str(bad))
    problem = "Input should be a valid integer, unable to parse string as an integer (got 'many')"
    assert (ran.returncode, ran.stderr.splitlines()) == (2, [f"error: {bad}:2:1: port: {problem}"])
    cannot_run = tmp_path / "tls.yaml"  # valid settings, but no worker could load the certificate
    missing = tmp_path / "missing.pem"
    cannot_run.write_text(f"tls_cert_file: {missing}\ntls_key_file: {missing}\n")
    ran = strangler("config", "check", str(cannot_run))
    assert (ran.returncode, ran.stderr.splitlines()) == (
        2, [f"error: tls_cert_file: cannot load {missing} with {missing}: No such file or directory"]
    )  # fmt: skip


def test_a_new_worker_that_dies_before_it_is_ready_fails_the_reload_and_the_old_one_serves(
    supervised: Callable[..., Supervised],
) -> None:
    """The new generation starts slowly here (its Redis never answers: the first read waits out
    ``redis_timeout_seconds``), and its worker is killed meanwhile."""
    import threading

    from proxy.supervisor.control import request

    sup = supervised()
    with socket.socket() as blackhole:  # accepts connections (the kernel does) and never answers
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)
        sup.rewrite(redis_url=f"redis://127.0.0.1:{blackhole.getsockname()[1]}/0", redis_timeout_seconds=3)
        answers: list[dict[str, object]] = []
        asked = threading.Thread(target=lambda: answers.append(request(sup.socket, {"command": "reload"})))
        asked.start()
        new = wait_until(
            lambda: [w["pid"] for w in sup.status()["workers"] if w["generation"] == 2], timeout=5
        )
        os.kill(new[0], signal.SIGKILL)
        asked.join(10)
    assert answers == [{
        "ok": False, "result": "failed", "generation": 1,
        "error": "worker 0 did not start: killed by signal 9 (SIGKILL) before it was ready",
    }]  # fmt: skip
    assert sup.status()["generation"] == 1
    assert versions_on_new_connections(sup.proxy.url, 3) == {"v1"}
    assert metric_value(sup.proxy.metrics(), "strangler_config_reloads_total", result="failed") == 1
