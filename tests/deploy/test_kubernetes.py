"""deploy/kubernetes: rendered (our small renderer, and ``kubectl kustomize`` when installed, which
must agree), validated offline with ``kubernetes-validate --strict``, and read for the properties
the fleet depends on: probes, drain timing, non-root, the settings the pods will load.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy import __version__
from proxy.settings import load_settings
from tests.deploy.kustomize import render
from tests.support import ROOT, ProxyProcess

KUBE = ROOT / "deploy" / "kubernetes"
TREES = {"base": KUBE / "base", "sentinel": KUBE / "overlays" / "sentinel"}


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {obj["kind"]: obj for obj in objects}


@pytest.mark.parametrize("tree", TREES)
def test_manifests_pass_kubernetes_validate_strict(tree: str, tmp_path: Path) -> None:
    rendered = tmp_path / f"{tree}.yaml"
    objects = render(TREES[tree])
    rendered.write_text(yaml.safe_dump_all(objects))
    tool = Path(sys.executable).with_name("kubernetes-validate")
    if not tool.exists():
        pytest.skip("kubernetes-validate not installed (it is in the test extra)")
    done = subprocess.run([str(tool), "--strict", str(rendered)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = [line for line in done.stdout.splitlines() if " passed for resource " in line]
    core = [o for o in objects if o["kind"] != "ServiceMonitor"]  # a CRD: no schema offline
    assert len(passed) == len(core), done.stdout


@pytest.mark.parametrize("tree", TREES)
def test_python_render_agrees_with_kubectl_kustomize(tree: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        reason = "kubectl not installed: the manifests are rendered by tests/deploy/kustomize.py only"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    args = [kubectl, "kustomize", str(TREES[tree])]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    theirs = sorted((d for d in yaml.safe_load_all(done.stdout) if d), key=json.dumps)
    ours = sorted(render(TREES[tree]), key=json.dumps)
    assert ours == theirs


def test_deployment_is_a_safe_fleet_member() -> None:
    objects = by_kind(render(TREES["base"]))
    deployment = objects["Deployment"]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert spec["replicas"] >= 2 and pod["topologySpreadConstraints"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/_strangler/health"  # never Redis
    assert container["readinessProbe"]["httpGet"]["path"] == "/_strangler/ready"  # snapshot present
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain = float(env["STRANGLER_DRAIN_TIMEOUT_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    assert objects["PodDisruptionBudget"]["spec"]["minAvailable"] >= 1
    assert objects["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2
    assert "ServiceMonitor" not in objects  # optional component, not in the base
    selector = objects["Service"]["spec"]["selector"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("tree", TREES)
def test_the_pods_settings_load(tree: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ConfigMap's file plus the Deployment's env and the Secret's keys are valid settings."""
    objects = by_kind(render(TREES[tree]))
    config = tmp_path / "strangler.yaml"
    config.write_text(objects["ConfigMap"]["data"]["strangler.yaml"])
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    for name, value in objects["Secret"]["stringData"].items():
        monkeypatch.setenv(name, value)
    for item in container["env"]:
        monkeypatch.setenv(item["name"], item["value"])
    settings = load_settings(config)
    assert settings.port == int(container["ports"][0]["containerPort"])
    if tree == "sentinel":
        assert settings.redis_url is not None and settings.redis_url.startswith("redis+sentinel://")
        monitor = by_kind(render(TREES[tree]))["ServiceMonitor"]
        assert monitor["spec"]["endpoints"][0]["path"] == settings.admin_prefix + "/metrics"


def test_health_answers_status_and_version_without_a_token(proxy: ProxyProcess) -> None:
    """The probes' contract: liveness is open and names the running version."""
    answer = httpx.get(proxy.admin + "/health", timeout=5)
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "version": __version__}
