"""The shipped deployment files, checked with the real tools where they exist.

promtool (Prometheus config, alert rules and their unit tests, a live proxy's /metrics) and
``docker compose config`` run when installed and are skipped with a printed reason otherwise;
the dashboard test needs nothing but the proxy's own metric definitions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import generate_latest
from pydantic import BaseModel

from proxy.metrics import Metrics
from proxy.settings import Settings, load_settings
from tests.support import ROOT, Backend, ProxyProcess

CONFIG = ROOT / "config"
DASHBOARD = CONFIG / "grafana" / "dashboards" / "strangler.json"
PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "inf", "nan", "le",
}  # fmt: skip


def promtool() -> str:
    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if found is None:
        reason = "promtool not installed (scripts/test installs it in CI as root: apt-get install prometheus)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return found


def run(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT,
        env=None if env is None else {**os.environ, **env},
    )  # fmt: skip


def exported_names(exposition: str) -> set[str]:
    """Every series name a scrape can contain: sample names plus each TYPE's suffixed forms."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
            if kind == "counter" and name.endswith("_total"):
                names.add(name.removesuffix("_total") + "_created")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names used by a PromQL expression (strings, matchers, ranges, label lists removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        word = match.group(0)
        if expr[match.end() :].lstrip().startswith("(") or word.lower() in PROMQL_WORDS:
            continue  # a function call or a keyword
        names.add(word)
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> Iterator[None]:
        if isinstance(node, dict):
            title = node.get("title", where)
            if isinstance(node.get("expr"), str):
                found.append((title, node["expr"]))
            for value in node.values():
                yield from walk(value, title)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item, where)

    for _ in walk(dashboard, "dashboard"):
        pass
    return found


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((CONFIG / "prometheus" / "alerts.yml").read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


# --- Prometheus -----------------------------------------------------------------------------------


def test_promtool_checks_config_rules_and_rule_unit_tests() -> None:
    tool = promtool()
    checked = run(tool, "check", "config", str(CONFIG / "prometheus" / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = run(tool, "check", "rules", str(CONFIG / "prometheus" / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "6 rules found" in rules.stdout
    unit = run(tool, "test", "rules", str(CONFIG / "prometheus" / "alerts_test.yml"))
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_alerts_cover_the_required_cases_with_real_metric_names() -> None:
    exported = exported_names(generate_latest(Metrics().registry).decode()) | {"up"}
    alerts = dict(alert_exprs())
    for name in (
        "StranglerV2ErrorRateHigh",
        "StranglerP95AboveTarget",
        "StranglerRollback",
        "StranglerSnapshotStale",
    ):
        assert name in alerts, name
    for alert, expr in alerts.items():
        unknown = metric_names(expr) - exported
        assert not unknown, f"alert {alert} names metrics the proxy does not export: {unknown}"


@pytest.fixture()
def busy_proxy(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> ProxyProcess:
    """A proxy that has served v1, v2, a deprecated and a gone endpoint, so most series exist."""
    v1, v2 = v1v2
    proxy = proxy_factory(
        v1_url=v1.url,
        v2_url=v2.url,
        redis_url=redis_url,
        deprecations=[
            {"name": "old", "pattern": "/old", "deprecated_at": "2025-01-01", "sunset_at": "2099-01-01"},
            {"name": "gone", "pattern": "/gone", "deprecated_at": "2024-01-01", "sunset_at": "2025-01-01"},
        ],
    )
    for version in ("v1", "v2"):
        httpx.get(proxy.url + "/echo", headers={"X-Strangler-Version": version})
        httpx.get(proxy.url + "/status/503", headers={"X-Strangler-Version": version})
    httpx.get(proxy.url + "/old")
    httpx.get(proxy.url + "/gone")
    return proxy


def test_promtool_check_metrics_on_live_output(busy_proxy: ProxyProcess) -> None:
    tool = promtool()
    text = busy_proxy.metrics()
    assert "strangler_deprecated_requests_total" in text
    checked = run(tool, "check", "metrics", stdin=text)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_queries_name_only_metrics_the_proxy_exports(busy_proxy: ProxyProcess) -> None:
    live = exported_names(busy_proxy.metrics())
    defined = exported_names(generate_latest(Metrics().registry).decode())
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    used: set[str] = set()
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        unknown = names - live - defined
        assert not unknown, f"panel {title!r} queries metrics the proxy does not export: {unknown}"
        used |= names
    for needed in (
        "http_requests_total",
        "http_errors_total",
        "http_request_duration_seconds_bucket",
        "strangler_split_percentage",
        "strangler_shadow_comparisons_total",
        "strangler_rollout_step",
        "strangler_rollbacks_total",
        "strangler_canary_gate_checks_total",
        "strangler_canary_evidence",
        "strangler_rollout_awaiting_approval",
        "strangler_grpc_requests_total",
        "strangler_grpc_request_duration_seconds_bucket",
    ):
        assert needed in used, f"the dashboard shows nothing from {needed}"
    latency = " ".join(expr for _, expr in exprs if "http_request_duration_seconds_bucket" in expr)
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}," in latency
    for version in ("v1", "v2"):
        assert f'version="{version}"' in latency


def test_metric_name_parser() -> None:
    expr = (
        'sum by (version) (rate(http_requests_total{version=~"v1|v2", code!="5.."}[$__rate_interval])) '
        "/ ignoring(version) group_left sum(rate(http_errors_total[5m])) > 1e-9 and up offset 5m"
    )
    assert metric_names(expr) == {"http_requests_total", "http_errors_total", "up"}


# --- Grafana --------------------------------------------------------------------------------------


def test_grafana_provisioning_points_at_the_dashboard_and_datasource() -> None:
    datasource = yaml.safe_load((CONFIG / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    uids = set(re.findall(r'"uid":\s*"([^"]+)"', DASHBOARD.read_text()))
    assert uids == {source["uid"], "strangler-migration"}
    provider = yaml.safe_load((CONFIG / "grafana/provisioning/dashboards/strangler.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./config/grafana/dashboards:{path}:ro" in mounts


# --- Docker ---------------------------------------------------------------------------------------


def test_dockerfile_is_slim_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM docker\.io/library/python:3\.11-slim", text, re.M)  # fully qualified
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*_strangler.*/health", text, re.M)
    assert "STRANGLER_" in text  # configured by environment


def test_compose_file_wires_every_service() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "v1", "v2", "proxy", "prometheus", "grafana"} <= set(services)
    env = services["proxy"]["environment"]
    assert env["STRANGLER_REDIS_URL"].startswith("redis://redis:")
    assert env["STRANGLER_V1_URL"] == "http://v1:8001" and env["STRANGLER_V2_URL"] == "http://v2:8002"
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
    scrape = yaml.safe_load((CONFIG / "prometheus/prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == Settings().admin_prefix + "/metrics"
    assert scrape["static_configs"][0]["targets"] == ["proxy:8080"]


def test_docker_compose_config_validates() -> None:
    docker = shutil.which("docker")
    probe = run(docker, "compose", "version") if docker else None
    if probe is None or probe.returncode != 0:
        reason = "docker compose is not available here" + (
            f" ({(probe.stderr or probe.stdout).strip().splitlines()[0]})" if probe is not None else ""
        )
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    assert docker is not None
    secrets = {"STRANGLER_ADMIN_TOKEN": "t" * 32, "GRAFANA_ADMIN_PASSWORD": "p" * 24}
    checked = run(docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet", env=secrets)
    assert checked.returncode == 0, checked.stderr
    bare = {k: "" for k in secrets}  # unset: compose must refuse rather than fall back to a weak default
    refused = run(docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet", env=bare)
    assert refused.returncode != 0 and "STRANGLER_ADMIN_TOKEN" in refused.stderr


def test_compose_ships_no_secrets_and_publishes_on_loopback_only() -> None:
    """Safe defaults: no change-me / admin defaults, no port reachable from other machines."""
    text = (ROOT / "docker-compose.yml").read_text()
    assert "change-me" not in text and ":-admin" not in text
    services = yaml.safe_load(text)["services"]
    assert services["proxy"]["environment"]["STRANGLER_ADMIN_TOKEN"].startswith("${STRANGLER_ADMIN_TOKEN:?")
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GRAFANA_ADMIN_PASSWORD:?"
    )
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert published and all(str(port).startswith("127.0.0.1:") for port in published)


# --- example configuration ------------------------------------------------------------------------


def field_names(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        names.add(name)
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                names |= field_names(candidate)
    return names


def test_example_config_loads_and_documents_every_setting() -> None:
    path = CONFIG / "strangler.example.yaml"
    settings = load_settings(path)
    assert settings.deprecations and settings.deprecations[0].name == "users-v0"
    text = path.read_text()
    from proxy.settings import DeprecationRule, NotifierTarget, RouteGroup, ShadowGroupPolicy

    everything = field_names(Settings) | set().union(
        *(field_names(m) for m in (DeprecationRule, NotifierTarget, RouteGroup, ShadowGroupPolicy))
    )
    missing = sorted(name for name in everything if not re.search(rf"^\s*#?\s*-?\s*{name}:", text, re.M))
    assert not missing, f"config/strangler.example.yaml does not document: {missing}"
