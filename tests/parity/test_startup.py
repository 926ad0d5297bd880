"""`strangler parity` loads what it needs and nothing of the proxy (it runs offline, often on
another machine, and starts fast): no Redis client, no settings, no server, no other capability,
unless a result is stored in Redis."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.parity.conftest import execute, write_config
from tests.support import ROOT

PROBE = """
import json, sys
sys.argv = ["strangler", *sys.argv[1:]]
from proxy.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
modules = sorted(name for name, module in sys.modules.items() if module is not None)  # None: blocked
print(json.dumps({"code": code, "modules": modules}), file=sys.stderr)
"""
NOT_FOR_PARITY = (
    "proxy.server", "proxy.edge", "proxy.app", "proxy.admin", "proxy.canary", "proxy.shadow",
    "proxy.control", "proxy.cliutil", "proxy.settings", "proxy.demo", "proxy.soak", "proxy.bench",
    "redis", "starlette", "httpx", "uvloop", "httptools", "prometheus_client", "deepdiff",
)  # fmt: skip


def loaded(*args: str, cwd: Path = ROOT) -> tuple[int, list[str]]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
    )  # fmt: skip
    probe = json.loads(result.stderr.strip().splitlines()[-1])
    return probe["code"], probe["modules"]


def _proxy_parts(modules: list[str]) -> list[str]:
    return [m for m in modules if m.startswith(NOT_FOR_PARITY)]


def test_parity_help_and_a_run_import_nothing_of_the_proxy(tmp_path: Path) -> None:
    code, modules = loaded("parity", "sql", "--help")
    assert code == 0 and _proxy_parts(modules) == []
    assert "sqlalchemy" not in modules  # not even the database layer, for --help

    src, dst = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    for url in (src, dst):
        execute(url, "CREATE TABLE t (id integer PRIMARY KEY, v text)", "INSERT INTO t VALUES (1, 'a')")
    config = write_config(tmp_path / "p.yaml", src, dst, [{"source_table": "t", "key": ["id"]}])
    code, modules = loaded("parity", "sql", "-c", str(config), "--no-store", cwd=tmp_path)
    assert code == 0 and _proxy_parts(modules) == []


def test_the_other_commands_still_load_what_they_need() -> None:
    code, modules = loaded("set", "--help")
    assert code == 0 and "proxy.cliopts" in modules and "proxy.parity.commands" not in modules
    code, modules = loaded("shadow", "--help")
    assert code == 0 and "proxy.shadow.commands" in modules and "proxy.parity.commands" not in modules
