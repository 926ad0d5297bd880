"""The embedded Redis across an upgrade: owned by whoever holds its keeper's pipe, so the old parent
can hand it to the new one (over the hand-over socket) and exit without stopping it, and a SIGKILLed
owner still takes it down (the pipe closes with the process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import redis

from proxy.control.embedded import URL_FILE, EmbeddedRedis
from proxy.supervisor import handover
from tests.support import ROOT, stop_process, wait_until

OLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from proxy.control.embedded import EmbeddedRedis
    from proxy.supervisor import handover

    embedded = EmbeddedRedis(Path(sys.argv[1]))
    print(embedded.start(), flush=True)
    if sys.argv[2] == "sleep":
        time.sleep(60)
    with handover.Offer(Path(sys.argv[2])) as offer:
        print("offered", flush=True)
        deadline = time.monotonic() + 10
        offer.accept(deadline)
        offer.give([], {"embedded_redis": embedded.handover_state()}, deadline, fds=embedded.handover_fds())
        offer.wait_ready(deadline)
        offer.draining(1.0)
    embedded.release()
    """
)


def answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def start_owner(*args: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", OLD, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def test_the_new_generation_adopts_the_embedded_redis_and_the_old_one_leaves_it_running(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "redis"
    path = tmp_path / "handover.sock"
    old, url = start_owner(str(directory), str(path))
    adopted: EmbeddedRedis | None = None
    try:
        assert url.startswith("redis://") and answers(url)
        assert old.stdout is not None and old.stdout.readline().strip() == "offered"
        taker = handover.Taker(path)
        received = taker.take({})
        adopted = EmbeddedRedis.adopt(received.state["embedded_redis"], received.fds)
        taker.ready(0, 0.0)
        taker.wait_draining()
        taker.close()
        assert old.wait(10) == 0
        assert answers(url)  # the old parent is gone; its Redis is not
        # the URL file names the new owner: a second `serve` reuses this Redis while it lives
        assert (directory / URL_FILE).read_text().split() == [url, str(os.getpid())]
    finally:
        stop_process(old)
        if adopted is not None:
            adopted.stop()
    wait_until(lambda: not answers(url), timeout=10, message="the adopted Redis stops with its owner")
    assert not (directory / URL_FILE).exists()


def test_a_killed_owner_still_takes_its_embedded_redis_down(tmp_path: Path) -> None:
    owner, url = start_owner(str(tmp_path / "redis"), "sleep")
    try:
        assert answers(url)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        wait_until(lambda: not answers(url), timeout=10, message="Redis stops when its owner dies")
    finally:
        stop_process(owner)
