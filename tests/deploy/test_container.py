"""The image, built and run for real with podman: Redis, both demo backends and the proxy as
containers in one pod (they reach each other on localhost, the pod publishes the proxy on 127.0.0.1).

Skipped with a printed reason when podman or the base images are missing.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.deploy.podman import build_image, named, podman_or_skip, run
from tests.support import wait_until

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]
TAG = "localhost/strangler:test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def podman() -> str:
    return podman_or_skip()


@pytest.fixture(scope="module")
def image(podman: str) -> str:
    seconds = build_image(podman, TAG)
    print(f"image build: {seconds:.1f} s")
    return TAG


@pytest.fixture(scope="module")
def stack(podman: str, image: str) -> Iterator[dict[str, str]]:
    port = free_port()
    with named(podman) as prefix:
        pod = f"{prefix}-pod"
        run(podman, "pod", "create", "--name", pod, "-p", f"127.0.0.1:{port}:8080")
        common = ["run", "-d", "--pod", pod, "--health-interval", "disable"]
        run(podman, *common, "--name", f"{prefix}-redis", "docker.io/library/redis:7-alpine")
        for version, backend_port in (("v1", 8001), ("v2", 8002)):
            run(podman, *common, "--name", f"{prefix}-{version}", "--entrypoint", "python", image,
                "-m", "proxy.demo.tasks", "--version", version, "--port", str(backend_port),
                "--host", "127.0.0.1")  # fmt: skip
        token = "container-test-token-0123456789abcdef"
        run(podman, *common, "--name", f"{prefix}-proxy",
            "-e", "STRANGLER_V1_URL=http://127.0.0.1:8001", "-e", "STRANGLER_V2_URL=http://127.0.0.1:8002",
            "-e", "STRANGLER_REDIS_URL=redis://127.0.0.1:6379/0", "-e", f"STRANGLER_ADMIN_TOKEN={token}",
            "-e", "STRANGLER_DEFAULT_PERCENTAGE=0", "-e", "STRANGLER_DRAIN_TIMEOUT_SECONDS=1",
            image)  # fmt: skip
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/_strangler/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(healthy, timeout=60, message="the proxy container never answered /_strangler/health")
        except AssertionError:
            print(run(podman, "logs", f"{prefix}-proxy", check=False).stderr[-3000:])
            raise
        yield {"url": url, "proxy": f"{prefix}-proxy", "token": token, "podman": podman}


def test_health_answers_status_and_version(stack: dict[str, str]) -> None:
    answer = httpx.get(f"{stack['url']}/_strangler/health", timeout=5)
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "ok" and body["version"]


def test_a_request_is_proxied_to_v1_then_v2(stack: dict[str, str]) -> None:
    answer = httpx.get(f"{stack['url']}/api/tasks", timeout=5)
    assert answer.status_code == 200 and answer.headers["x-api-version"] == "v1"
    changed = httpx.put(
        f"{stack['url']}/_strangler/split", json={"percentage": 100},
        headers={"Authorization": f"Bearer {stack['token']}"}, timeout=5,
    )  # fmt: skip
    assert changed.status_code == 200, changed.text

    def on_v2() -> bool:
        return httpx.get(f"{stack['url']}/api/tasks", timeout=5).headers["x-api-version"] == "v2"

    wait_until(on_v2, timeout=10, message="the split change never reached the container")


def test_the_image_healthcheck_passes_and_runs_as_non_root(stack: dict[str, str]) -> None:
    podman, name = stack["podman"], stack["proxy"]
    inspected = json.loads(run(podman, "image", "inspect", TAG).stdout)[0]
    assert inspected["Healthcheck"]["Test"][0] == "CMD"  # kept by --format docker
    assert run(podman, "healthcheck", "run", name, check=False).returncode == 0
    uid = run(podman, "exec", name, "id", "-u").stdout.strip()
    assert uid == "10001"
    assert inspected["Config"]["User"] == "10001"
    leftovers = run(podman, "exec", name, "sh", "-c", "ls -d /app /tmp/src /tmp/deps 2>/dev/null || true")
    assert leftovers.stdout.strip() == ""  # no build tree, no egg-info in the image


def test_the_image_runs_the_compiled_request_path(stack: dict[str, str]) -> None:
    """The wheel stage compiles with mypyc (setup.py); the image has no compiler of its own."""
    podman, name = stack["podman"], stack["proxy"]
    build = run(podman, "exec", name, "python", "-c", "import proxy; print(proxy.build())").stdout.strip()
    assert build == "compiled (mypyc)"
    compiler = run(podman, "exec", name, "sh", "-c", "command -v gcc cc || true").stdout.strip()
    assert compiler == ""


def test_stop_is_clean_and_quick(stack: dict[str, str]) -> None:
    podman, name = stack["podman"], stack["proxy"]
    started = time.monotonic()
    run(podman, "stop", "-t", "10", name)
    took = time.monotonic() - started
    print(f"proxy container stop: {took:.2f} s")
    state = json.loads(run(podman, "inspect", name).stdout)[0]["State"]
    assert state["ExitCode"] == 0, state  # SIGTERM handled (a SIGKILL after -t would be 137)
    assert took < 2.0
