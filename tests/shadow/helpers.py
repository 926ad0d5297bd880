"""Shared bits for the shadow end-to-end tests (real proxy, real backends, real Redis)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner

from tests.support import Backend, ProxyProcess, wait_until

# every backend answer names its version; that is not a difference we care about
BASE_SHADOW: dict[str, Any] = {
    "enabled": True,
    "sample_percentage": 100,
    "calibration_percentage": 0,
    "calibration_warmup": 0,
    "exclude_paths": ["root['version']"],
    "flush_interval_seconds": 0.1,
}


def start_shadow_proxy(
    proxy_factory: Callable[..., ProxyProcess],
    v1: Backend | str,
    v2: Backend | str,
    redis_url: str,
    routes: list[dict[str, Any]] | None = None,
    process: bool = False,
    **shadow: Any,
) -> ProxyProcess:
    return proxy_factory(
        process=process,
        v1_url=v1 if isinstance(v1, str) else v1.url,
        v2_url=v2 if isinstance(v2, str) else v2.url,
        redis_url=redis_url,
        routes=routes or [],
        shadow={**BASE_SHADOW, **shadow},
    )


def config_path(proxy: ProxyProcess) -> Path:
    return proxy.workdir / f"strangler-{proxy.port}.yaml"


def cli(proxy: ProxyProcess, *args: str) -> str:
    """Run a ``strangler`` command in-process against the proxy's config (and so its Redis)."""
    from proxy.cli import app

    result = CliRunner().invoke(app, [*args, "--config", str(config_path(proxy))])
    assert result.exit_code == 0, f"strangler {' '.join(args)} -> {result.exit_code}\n{result.output}"
    return result.output


def summary(proxy: ProxyProcess) -> dict[str, Any]:
    return dict(httpx.get(proxy.admin + "/diffs", timeout=5).json())


def row(proxy: ProxyProcess, endpoint: str) -> dict[str, Any] | None:
    for item in summary(proxy)["endpoints"]:
        if item["endpoint"] == endpoint:
            return dict(item)
    return None


def detail(proxy: ProxyProcess, endpoint: str) -> dict[str, Any]:
    response = httpx.get(proxy.admin + "/diffs", params={"endpoint": endpoint}, timeout=5)
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_row(proxy: ProxyProcess, endpoint: str, timeout: float = 15, **at_least: int) -> dict[str, Any]:
    """Poll the report until the endpoint's counters reach at least the given values."""

    def ready() -> dict[str, Any] | None:
        found = row(proxy, endpoint)
        if found and all(found[k] >= v for k, v in at_least.items()):
            return found
        return None

    return dict(wait_until(ready, timeout=timeout, interval=0.1, message=f"report for {endpoint} {at_least}"))


def in_force(proxy: ProxyProcess, group: str = "default") -> dict[str, Any]:
    return dict(httpx.get(proxy.admin + "/shadow", timeout=5).json()["in_force"][group])


def shadow_entries(backend: Backend) -> list[dict[str, Any]]:
    """Requests the backend logged that carried X-Strangler-Shadow."""
    return [
        e for e in backend.log() if any(k.lower() == "x-strangler-shadow" for k, _ in e.get("headers", []))
    ]


def header(entry: dict[str, Any], name: str) -> str | None:
    for key, value in entry.get("headers", []):
        if key.lower() == name.lower():
            return str(value)
    return None
