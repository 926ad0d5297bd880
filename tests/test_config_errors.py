"""Every configuration error is one line on stderr and exit code 2: the source (the file with line
and column, the STRANGLER_* variable or the flag), the setting as a dotted path, what is wrong.

The same problem reads the same from the three sources but for the source. Unknown keys are
refused at every depth; keys starting with ``x-`` are the user's own and ignored. In-process
(tests/clirun.py) but for ``serve``, where the process itself is under test: nothing printed
before the error, no "ready".
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.settings import ConfigError, load_settings
from tests.clirun import strangler
from tests.support import ROOT

REDIS_FORMS = "redis://[user:pass@]host:port/db, rediss://..., unix:///path, redis+sentinel://... or redis+cluster://..."


def config(tmp_path: Path, text: str, name: str = "strangler.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def one_error(*args: str, env: dict[str, str] | None = None) -> str:
    """The command's one stderr line, after checking exit code 2 and nothing on stdout."""
    result = strangler(*args, env=env)
    assert result.returncode == 2, result
    assert result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_yaml_syntax_error_names_the_line_and_column(tmp_path: Path) -> None:
    path = config(tmp_path, "port: 8080\nroutes:\n  - name: api\n    patterns: [/api/**\n")
    assert one_error("status", "-c", str(path)) == (
        f"error: {path}:5:1: not valid YAML: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence started at line 4, column 15)"
    )
    path = config(tmp_path, "shadow:\n  enabled: true\n sample_percentage: 5\n")
    assert one_error("status", "-c", str(path)) == (
        f"error: {path}:3:2: not valid YAML: expected <block end>, but found '<block mapping start>' "
        "(while parsing a block mapping started at line 1, column 1)"
    )


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- port: 8080\n- host: 0.0.0.0\n", "a list"), ("8080\n", "a number"), ("hello\n", "a string")],
)
def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str, kind: str) -> None:
    path = config(tmp_path, text)
    assert one_error("status", "-c", str(path)) == (
        f"error: {path}: the top level must be a mapping of settings (key: value), not {kind}"
    )


def test_an_empty_file_is_the_defaults(tmp_path: Path) -> None:
    assert load_settings(config(tmp_path, "# nothing set yet\n")).port == 8080


@pytest.mark.parametrize(
    ("text", "where", "field", "problem"),
    [
        ("port: 8080\nshadw:\n  enabled: true\n", "2:1", "shadw", "unknown key; did you mean 'shadow'?"),
        ("shadow: {enabeld: true}\n", "1:10", "shadow.enabeld", "unknown key; did you mean 'enabled'?"),
        (
            "canary:\n  thresholds:\n    max_eror_rate: 0.1\n",
            "3:5",
            "canary.thresholds.max_eror_rate",
            "unknown key; did you mean 'max_error_rate'?",
        ),
        (
            "routes:\n  - name: api\n    patterns: [/api/**]\n  - name: web\n    patern: [/web/**]\n",
            "5:5",
            "routes[1].patern",
            "unknown key; did you mean 'patterns'?",
        ),
        (
            "canary:\n  notifiers:\n    - kind: slack\n      url: http://hooks.example/x\n"
            "      channel: ops\n",
            "5:7",
            "canary.notifiers[0].channel",
            "unknown key (a key of your own: start it with x-)",
        ),
        (
            "shadow:\n  groups:\n    api:\n      sample_percent: 5\n",
            "4:7",
            "shadow.groups.api.sample_percent",
            "unknown key; did you mean 'sample_percentage'?",
        ),
    ],
)
def test_unknown_keys_are_refused_at_every_depth(
    tmp_path: Path, text: str, where: str, field: str, problem: str
) -> None:
    """A misspelt key is told before the "required" error it may cause (routes[1].patterns)."""
    path = config(tmp_path, text)
    more = " (and 1 more problem)" if "patern" in text else ""
    assert one_error("status", "-c", str(path)) == f"error: {path}:{where}: {field}: {problem}{more}"


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    """YAML would keep the second silently: a second shadow section would drop the first."""
    path = config(tmp_path, "shadow:\n  enabled: true\nport: 8081\nshadow:\n  sample_percentage: 5\n")
    assert (
        one_error("status", "-c", str(path))
        == f"error: {path}:4:1: shadow: duplicate key (first given at line 1)"
    )
    path = config(tmp_path, "routes:\n  - name: a\n    patterns: [/a]\n    name: b\n")
    assert one_error("status", "-c", str(path)) == (
        f"error: {path}:4:5: routes[0].name: duplicate key (first given at line 2)"
    )


def test_unknown_nested_keys_in_the_environment_are_refused_too() -> None:
    line = one_error("status", env={"STRANGLER_SHADOW__ENABELD": "true"})
    assert line == "error: STRANGLER_SHADOW__ENABELD: shadow.enabeld: unknown key; did you mean 'enabled'?"
    line = one_error("status", env={"STRANGLER_CANARY__THRESHOLDS__MAX_EROR_RATE": "0.1"})
    assert line == (
        "error: STRANGLER_CANARY__THRESHOLDS__MAX_EROR_RATE: canary.thresholds.max_eror_rate: "
        "unknown key; did you mean 'max_error_rate'?"
    )


def test_x_keys_are_ignored_at_every_depth(tmp_path: Path) -> None:
    """The escape hatch: notes, YAML anchors to reuse, keys meant for a newer version."""
    path = config(
        tmp_path,
        "x-timeouts: &fast {window_seconds: 30}\n"
        "canary:\n  <<: *fast\n  x-owner: team-a\n  thresholds: {x-note: loose, max_error_rate: 0.1}\n"
        "routes:\n  - {name: api, patterns: [/api/**], x-ticket: OPS-1}\n",
    )
    settings = load_settings(path)
    assert settings.canary.window_seconds == 30
    assert settings.canary.thresholds.max_error_rate == 0.1
    assert [group.name for group in settings.routes] == ["api"]


def test_a_wrong_type_reads_the_same_from_file_and_environment(tmp_path: Path) -> None:
    problem = (
        "shadow.sample_percentage: Input should be a valid number, unable to parse string as a number "
        "(got 'lots')"
    )
    path = config(tmp_path, "shadow:\n  sample_percentage: lots\n")
    assert one_error("status", "-c", str(path)) == f"error: {path}:2:3: {problem}"
    env = {"STRANGLER_SHADOW__SAMPLE_PERCENTAGE": "lots"}
    assert one_error("status", env=env) == f"error: STRANGLER_SHADOW__SAMPLE_PERCENTAGE: {problem}"
    assert one_error("status", env={"STRANGLER_ROUTES": "api"}) == (
        "error: STRANGLER_ROUTES: routes: not valid JSON "
        "(lists and sections are given as JSON in the environment)"
    )


def test_a_bad_redis_url_reads_the_same_from_flag_environment_and_file(tmp_path: Path) -> None:
    problem = f"redis_url: 'notaurl' is not a Redis URL; expected {REDIS_FORMS}"
    assert one_error("status", "--redis-url", "notaurl") == f"error: --redis-url: {problem}"
    assert (
        one_error("status", env={"STRANGLER_REDIS_URL": "notaurl"})
        == f"error: STRANGLER_REDIS_URL: {problem}"
    )
    path = config(tmp_path, "port: 8080\nredis_url: notaurl\n")
    assert one_error("status", "-c", str(path)) == f"error: {path}:2:1: {problem}"
    # the flag wins over the environment, and its source is the one named
    assert one_error("set", "5", "--redis-url", "notaurl", env={"STRANGLER_REDIS_URL": "redis://h:1/0"}) == (
        f"error: --redis-url: {problem}"
    )
    # no password in the message
    assert one_error("status", "--redis-url", "redis://user:s3cret@h:99999/0") == (
        "error: --redis-url: redis_url: 'redis://***@h:99999/0': the port must be a number from 0 to 65535"
    )


def test_a_bad_backend_url_names_the_flag(tmp_path: Path) -> None:
    problem = "v1_url: upstream URL 'localhost:8001' must look like http://host:port[/base]"
    assert one_error("serve", "--v1", "localhost:8001") == f"error: --v1: {problem}"
    assert (
        one_error("serve", env={"STRANGLER_V1_URL": "localhost:8001"})
        == f"error: STRANGLER_V1_URL: {problem}"
    )
    path = config(tmp_path, "v1_url: localhost:8001\n")
    assert one_error("serve", "-c", str(path)) == f"error: {path}:1:1: {problem}"


def test_a_missing_or_unreadable_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert one_error("status", "-c", str(missing)) == f"error: {missing}: config file does not exist"
    assert (
        one_error("status", "-c", str(tmp_path))
        == f"error: {tmp_path}: config file is a directory, not a file"
    )
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"port: \xff\xfe\n")
    assert one_error("status", "-c", str(binary)) == (
        f"error: {binary}: config file is not UTF-8 text (invalid start byte at byte 6)"
    )


def test_several_problems_tell_the_first_and_count_the_rest(tmp_path: Path) -> None:
    """In the file's order, unknown keys first; the environment's problem is counted too."""
    path = config(tmp_path, "port: 99999\nworkers: 0\nshadow:\n  enabeld: true\n")
    line = one_error("status", "-c", str(path), env={"STRANGLER_WORKERS": "x"})
    unknown = "shadow.enabeld: unknown key; did you mean 'enabled'?"
    assert line == f"error: {path}:4:3: {unknown} (and 2 more problems)"
    path = config(tmp_path, "port: 99999\nworkers: 0\n")
    too_big = "port: Input should be less than or equal to 65535 (got 99999)"
    assert one_error("status", "-c", str(path)) == f"error: {path}:1:1: {too_big} (and 1 more problem)"


@pytest.mark.parametrize(
    "command",
    [
        ("serve",),
        ("status",),
        ("set", "5"),
        ("rollback",),
        ("deprecations",),
        ("deprecations", "phase", "old", "gone"),
        ("rollout", "status"),
        ("rollout", "start"),
        ("shadow", "status"),
        ("shadow", "on"),
        ("diffs",),
    ],
)
def test_every_command_that_loads_settings_says_the_same(tmp_path: Path, command: tuple[str, ...]) -> None:
    path = config(tmp_path, "shadow:\n  enabeld: true\n")
    expected = f"error: {path}:2:3: shadow.enabeld: unknown key; did you mean 'enabled'?"
    assert one_error(*command, "-c", str(path)) == expected


def test_parity_reads_its_settings_file_the_same_way(tmp_path: Path) -> None:
    path = config(tmp_path, "shadow:\n  enabeld: true\n")
    expected = f"error: {path}:2:3: shadow.enabeld: unknown key; did you mean 'enabled'?"
    assert one_error("parity", "last", "--settings", str(path)) == expected


def test_python_callers_get_the_same_words() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"port": "--port"}, port=70000, shadow={"enabeld": True})
    assert str(caught.value) == "shadow.enabeld: unknown key; did you mean 'enabled'? (and 1 more problem)"
    assert (caught.value.source, caught.value.field, caught.value.more) == (None, "shadow.enabeld", 1)


def test_serve_with_a_bad_config_says_one_line_and_never_ready(tmp_path: Path) -> None:
    """The real process: exit 2, nothing on stdout (no banner, no "ready"), one line on stderr."""
    path = config(tmp_path, "port: 8080\nshadow: {enabeld: true}\n")
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "-c", str(path), "--redis-url", "notaurl"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "COLUMNS": "80"},
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr.splitlines() == [
        f"error: {path}:2:10: shadow.enabeld: unknown key; did you mean 'enabled'? (and 1 more problem)"
    ]
    assert not (tmp_path / ".strangler").exists()  # nothing started: no embedded Redis, no token file
