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

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`((?:http|strangler)_[a-z0-9_]+)`", section))
    exported = {metric.name for metric in Metrics().registry.collect()}
    exported = {name + "_total" if f"{name}_total" in documented else name for name in exported}
    assert documented == exported, (
        f"undocumented: {sorted(exported - documented)}, not exported: {sorted(documented - exported)}"
    )
