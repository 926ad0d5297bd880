"""Ctrl-C in a terminal sends SIGINT to the whole foreground process group. Each worker is in a
process group of its own, so only the parent gets it and passes ONE signal on: a graceful drain,
in which the request in flight completes (two signals would force the drain and cut it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import yaml

from tests.support import ROOT, Backend, free_port, wait_until


def test_ctrl_c_drains_once_and_the_request_in_flight_completes(
    tmp_path: Path, v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    port = free_port()
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump({
        "v1_url": v1.url, "v2_url": v2.url, "port": port, "redis_url": redis_url, "workers": 2,
        "log_level": "warning", "control_socket": str(tmp_path / "c.sock"),
    }))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
    with open(tmp_path / "serve.log", "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
            cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's job: the parent leads the group
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/_strangler/health", timeout=1).status_code == 200, timeout=20)
        v1.log(clear=True)
        answer: list[httpx.Response | BaseException] = []

        def slow() -> None:
            try:
                answer.append(httpx.get(url + "/slow?ms=1500", timeout=10))
            except httpx.HTTPError as exc:
                answer.append(exc)

        thread = threading.Thread(target=slow)
        thread.start()
        wait_until(lambda: any(r["raw_path"].startswith("/slow") for r in v1.log()), timeout=5)
        os.killpg(process.pid, signal.SIGINT)  # what a terminal does
        thread.join(10)
        assert process.wait(15) == 0
        reply = answer[0]
        assert isinstance(reply, httpx.Response), reply
        assert (reply.status_code, reply.json()["slow"], reply.headers["connection"]) == (200, True, "close")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
