"""Running podman from tests: skip with a reason when it cannot work here, clean up by name.

Everything a test creates carries one random name prefix, so teardown removes exactly what it made
(never another run's containers) and a leftover is visible by name.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import ROOT

BASE_IMAGES = ("docker.io/library/python:3.11-slim", "docker.io/library/redis:7-alpine")
HOW = (
    "scripts/test installs podman and runs ../shared/tools/local-base-images when root on Debian; "
    "elsewhere: apt-get install podman, then pull or build the base images"
)


def podman_or_skip() -> str:
    """The podman binary, or a skip saying why containers cannot be tested on this machine."""
    found = shutil.which("podman")
    if found is None:
        reason = f"podman not installed ({HOW})"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    for image in BASE_IMAGES:
        if subprocess.run([found, "image", "exists", image], capture_output=True).returncode != 0:
            pulled = subprocess.run([found, "pull", "-q", image], capture_output=True, text=True, timeout=120)
            if pulled.returncode != 0:
                reason = f"base image {image} is not present and cannot be pulled ({HOW})"
                print(f"SKIP: {reason}")
                pytest.skip(reason)
    return found


def run(
    *args: str, timeout: float = 300, check: bool = True, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def build_image(podman: str, tag: str) -> float:
    """``podman build --format docker`` (the docker format keeps HEALTHCHECK); returns seconds taken."""
    started = time.monotonic()
    run(podman, "build", "--format", "docker", "-t", tag, ".", timeout=900)
    return time.monotonic() - started


@contextmanager
def named(podman: str) -> Iterator[str]:
    """A unique name prefix; on exit every pod, container and network with it is removed."""
    prefix = f"strangler-test-{uuid.uuid4().hex[:8]}"
    try:
        yield prefix
    finally:
        for kind, listing in (
            ("pod", [podman, "pod", "ls", "-q", "--filter", f"name={prefix}"]),
            ("container", [podman, "ps", "-aq", "--filter", f"name={prefix}"]),
        ):
            ids = run(*listing, check=False).stdout.split()
            if ids:
                run(podman, kind, "rm", "-f", "-t", "0", *ids, check=False)
