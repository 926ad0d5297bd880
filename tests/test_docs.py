"""The README's configuration table is generated from the example config, which must match the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from proxy.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from config_table import EXAMPLE, rows, table  # noqa: E402


def flatten(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> default, descending into nested settings sections (not into lists/dicts)."""
    out: dict[str, Any] = {}
    instance = model.model_construct() if prefix else Settings.model_construct()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        default = getattr(instance, name, None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.update(flatten(annotation, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = default
    return out


def test_readme_holds_the_generated_configuration_table() -> None:
    readme = (ROOT / "README.md").read_text()
    assert table(EXAMPLE.read_text()) in readme, "run scripts/config_table.py --write"


def test_example_names_every_setting_with_the_code_default_and_a_meaning() -> None:
    documented = {key: (default, meaning) for key, _, default, meaning in rows(EXAMPLE.read_text())}
    expected = flatten(Settings)
    plain = {key for key in documented if "[]" not in key}
    assert plain == set(expected), (
        f"missing: {sorted(set(expected) - plain)}, unknown: {sorted(plain - set(expected))}"
    )
    for key, (default_text, meaning) in documented.items():
        assert meaning, f"{key} has no meaning in the example config"
        if "[]" in key:
            continue
        code = expected[key]
        code = code.get_secret_value() if hasattr(code, "get_secret_value") else code
        code = str(code) if isinstance(code, Path) else code
        assert yaml.safe_load(default_text) == code, f"{key}: example says {default_text}, code says {code!r}"


def test_env_var_names_are_what_settings_read(tmp_path: Path) -> None:
    """A nested setting from the table, set through its env var, reaches the settings object."""
    env_rows = {key: env for key, env, _, _ in rows(EXAMPLE.read_text())}
    code = "from proxy.settings import load_settings as l; s = l(); print(s.limits.max_headers, s.port)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={env_rows["limits.max_headers"]: "77", env_rows["port"]: "9999", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    assert result.stdout.split() == ["77", "9999"]


def test_readme_metrics_table_matches_the_recorder() -> None:
    """Every metric the proxy exports is in the README's table, and the table names no other."""
    import re

    from proxy.metrics import Metrics
    from proxy.supervisor.counters import Counters, CountersCollector

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`((?:http|strangler)_[a-z0-9_]+)`", section))
    metrics = Metrics()
    metrics.add_collector(CountersCollector(Counters(1)))  # as each worker of strangler serve does
    exported = {metric.name for metric in metrics.registry.collect()}
    exported = {name + "_total" if f"{name}_total" in documented else name for name in exported}
    assert documented == exported, (
        f"undocumented: {sorted(exported - documented)}, not exported: {sorted(documented - exported)}"
    )


def test_readme_names_every_upstream_error_kind_the_proxy_counts() -> None:
    """The kinds of ``strangler_upstream_errors_total`` in the README are those the code can count:
    each ``UpstreamError`` class's ``kind`` (the one ``except`` counts ``exc.kind``) and the string
    literals passed to ``upstream_error`` or to a pool's ``dropped``."""
    import re

    import proxy.edge.client
    import proxy.edge.websocket  # noqa: F401 - defines WsHandshakeRefused
    from proxy.edge.errors import UpstreamError

    def subclasses(cls: type) -> set[type]:
        found = set(cls.__subclasses__())
        return found.union(*(subclasses(sub) for sub in found)) if found else found

    counted = {sub.kind for sub in subclasses(UpstreamError)}
    call = re.compile(r"(?:upstream_error\(|\.dropped\()[^\n]*")
    for path in sorted((ROOT / "proxy").rglob("*.py")):
        for line in call.findall(path.read_text()):
            counted.update(re.findall(r'"([a-z_]+)"', line))
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `strangler_upstream_errors_total`"))
    documented = {kind.strip() for kind in row.split("|")[3].split(",")}
    assert documented == counted, (
        f"undocumented: {sorted(counted - documented)}, unknown: {sorted(documented - counted)}"
    )


def _quick_start() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]


def test_quick_start_is_two_commands_and_says_how_long_the_install_takes() -> None:
    """One line installs and runs the demo, announcing the install's length before the quiet build
    (README states the measured figure beside it), with the tools extra the demo needs (aiohttp);
    the other is the test command CI runs."""
    import re

    blocks = re.findall(r"```bash\n(.*?)\n```", _quick_start(), re.S)
    install, serve, tests = blocks
    assert "\n" not in install and install.endswith("&& .venv/bin/strangler demo")
    said = install.index('echo "installing: 4 to 5 minutes')
    built = install.index(".venv/bin/pip install '.[tools]'")
    assert said < built
    assert serve.startswith(".venv/bin/strangler serve ")  # the same proxy in front of your backends
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert tests == "./scripts/test" and ci[-1] == f"exec {tests}"


def test_the_operate_commands_say_how_strangler_is_found() -> None:
    """Before the venv is mentioned as active, commands name .venv/bin/strangler; the Operate section
    says once to activate it, for itself and docs/."""
    import re

    readme = (ROOT / "README.md").read_text()
    before, operate = readme.split("\n## Operate\n", 1)
    assert not re.search(
        r"(?<![/\w])strangler (demo|serve|status|set)\b", before.split("## Quick start", 1)[1]
    )
    note = operate.split("\n|", 1)[0]
    assert (
        "`. .venv/bin/activate`" in note and "[docs/](docs/)" in note and "`.venv/bin/strangler ...`" in note
    )


def test_redis_is_reached_by_the_url_serve_records_never_a_fixed_port() -> None:
    """On a shared machine 6390 may be someone else's Redis: the README reaches the embedded one by
    the URL file ``serve`` writes (the path the code uses), and no doc says ``redis-cli -p``."""
    from proxy.control.embedded import URL_FILE

    url_file = f"{Settings().embedded_redis_dir}/{URL_FILE}"
    readme = (ROOT / "README.md").read_text()
    assert f'redis-cli -u "$(head -1 {url_file})" SET feature:v2_traffic_percentage 10' in readme
    # (not the generated configuration table: its text is config/strangler.example.yaml's)
    outside_table = (
        readme.split("<!-- config-table:start -->")[0] + readme.split("<!-- config-table:end -->")[-1]
    )
    assert "redis-cli -p" not in outside_table
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert "redis-cli -p" not in doc.read_text(), doc.name
