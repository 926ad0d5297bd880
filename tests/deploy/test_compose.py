"""docker-compose.yml brought up for real with podman-compose: redis, v1, v2, proxy and load (the
monitoring profile stays off: its images are not made here), traffic split, metrics exported, and
`down -v` leaves no container, pod, network or volume of the project behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.deploy.podman import build_image, podman_or_skip, run
from tests.deploy.test_container import free_port
from tests.support import ROOT, metric_value, wait_until

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]
TOKEN = "compose-test-token-0123456789abcdef"


def podman_compose() -> list[str]:
    found = shutil.which("podman-compose") or str(Path(sys.executable).with_name("podman-compose"))
    if not Path(found).exists():
        pytest.skip("podman-compose not installed (it is in the test extra: pip install -e '.[test]')")
    return [found]


def test_compose_stack_splits_traffic_exports_metrics_and_leaves_nothing() -> None:
    podman = podman_or_skip()
    compose = podman_compose()
    build_image(podman, "localhost/strangler:local")  # the name the compose file uses; cached layers
    name = f"stranglertest{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {**os.environ, "STRANGLER_ADMIN_TOKEN": TOKEN, "GRAFANA_ADMIN_PASSWORD": "unused-" + "p" * 20,
           "STRANGLER_HOST_PORT": str(port)}  # fmt: skip
    base = [*compose, "-p", name, "-f", str(ROOT / "docker-compose.yml")]

    def compose_run(*args: str) -> str:
        done = subprocess.run([*base, *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        said = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert done.returncode == 0, f"podman-compose {' '.join(args)}:\n{said}"
        return done.stdout

    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/_strangler/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def both_versions_served() -> bool:
        text = httpx.get(f"{url}/_strangler/metrics", headers=auth, timeout=5).text
        return (
            metric_value(text, "http_requests_total", version="v1") > 0
            and metric_value(text, "http_requests_total", version="v2") > 0
        )

    try:
        compose_run("up", "-d", "--no-build")
        wait_until(healthy, timeout=120, message="the compose proxy never became healthy")
        # the load service sends ~20 req/s through a 10% split
        wait_until(both_versions_served, timeout=90, interval=1, message="no split traffic in the metrics")
    finally:
        compose_run("down", "-v", "-t", "5")
    assert leftovers(podman, name) == {"containers": [], "pods": [], "networks": [], "volumes": []}


def leftovers(podman: str, name: str) -> dict[str, list[str]]:
    found = {}
    for kind, cmd in (
        ("containers", ["ps", "-a", "--format", "{{.Names}}"]),
        ("pods", ["pod", "ls", "--format", "{{.Name}}"]),
        ("networks", ["network", "ls", "--format", "{{.Name}}"]),
        ("volumes", ["volume", "ls", "--format", "{{.Name}}"]),
    ):
        found[kind] = [line for line in run(podman, *cmd).stdout.split() if name in line]
    return found
