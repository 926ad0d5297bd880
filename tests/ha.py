"""Real highly available Redis setups for tests, from the same redis-server binary as the rest.

- :class:`SentinelSetup`: 1 master, 1 replica, 3 sentinels (quorum 2, master down after 1 s).
- :class:`ClusterSetup`: 3 masters, all 16384 slots assigned (``redis-server --cluster-enabled``;
  slots given with CLUSTER ADDSLOTSRANGE/ADDSLOTS and nodes joined with CLUSTER MEET, so no
  ``redis-cli --cluster`` is needed).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from proxy.control.embedded import find_redis_server, free_port
from tests.support import stop_process, wait_until

MASTER_NAME = "strangler"


class Node:
    """One redis-server (or sentinel) process with its own directory and config file."""

    def __init__(self, workdir: Path, name: str, lines: list[str], sentinel: bool = False) -> None:
        self.dir = workdir / name
        self.port = free_port()
        self.name = name
        self.lines = lines
        self.sentinel = sentinel
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "redis.conf"
        base = [f"port {self.port}", "bind 127.0.0.1", f'dir "{self.dir}"', 'save ""', "appendonly no"]
        if self.sentinel:
            base = [f"port {self.port}", "bind 127.0.0.1", f'dir "{self.dir}"']
        conf.write_text("\n".join(base + self.lines) + "\n")
        args = [find_redis_server(), str(conf)] + (["--sentinel"] if self.sentinel else [])
        log = open(self.dir / "log", "ab")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = self.client()
        wait_until(lambda: client.ping(), timeout=10, message=f"{self.name} start")
        client.close()
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.alive:
            assert self.process is not None
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


class SentinelSetup:
    def __init__(self, workdir: Path, down_after_ms: int = 1000) -> None:
        self.workdir = workdir
        self.master = Node(workdir, "master", [])
        self.replica = Node(workdir, "replica", [])
        self.down_after_ms = down_after_ms
        self.sentinels: list[Node] = []

    def start(self) -> SentinelSetup:
        try:
            return self._start()
        except BaseException:
            self.stop()  # never leave half a setup running
            raise

    def _start(self) -> SentinelSetup:
        self.master.start()
        self.replica.lines = [f"replicaof 127.0.0.1 {self.master.port}"]
        self.replica.start()
        client = self.replica.client()
        wait_until(lambda: client.info("replication")["master_link_status"] == "up", timeout=10)
        client.close()
        for i in range(3):
            node = Node(self.workdir, f"sentinel-{i}", [
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2",
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
                f"sentinel failover-timeout {MASTER_NAME} 4000",
                f"sentinel parallel-syncs {MASTER_NAME} 1",
            ], sentinel=True)  # fmt: skip
            self.sentinels.append(node.start())

        # every sentinel knows the replica and the other sentinels before a test kills anything
        def ready() -> bool:
            for s in self.sentinels:
                fields = s.client().sentinel_master(MASTER_NAME)  # parsed into a dict by redis-py
                if int(fields["num-slaves"]) < 1 or int(fields["num-other-sentinels"]) < 2:
                    return False
            return True

        wait_until(ready, timeout=20, interval=0.2, message="sentinels never saw each other")
        return self

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/0/{MASTER_NAME}"

    def master_port(self) -> int:
        """Where the sentinels say the master is now."""
        for sentinel in self.sentinels:  # one of them may be the one a test just killed
            try:
                reply = sentinel.client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
            except redis.ConnectionError:
                continue
            return int(reply[1])
        raise AssertionError("no sentinel answers")

    def current_master(self) -> Node:
        port = self.master_port()
        return self.master if self.master.port == port else self.replica

    def wait_failover(self, old_port: int, timeout: float = 30) -> float:
        """Block until every live sentinel names another master, flags it healthy (no s_down or
        o_down: what clients require) and that node accepts writes; returns when (monotonic)."""

        def elected() -> bool:
            ports = set()
            for sentinel in self.sentinels:
                if not sentinel.alive:
                    continue
                state = sentinel.client().sentinel_master(MASTER_NAME)
                if not state["is_master"] or state["is_sdown"] or state["is_odown"]:
                    return False
                ports.add(int(state["port"]))
            if len(ports) != 1 or old_port in ports:
                return False
            node = self.master if self.master.port in ports else self.replica
            return bool(node.client().info("replication")["role"] == "master")

        wait_until(elected, timeout=timeout, interval=0.05, message="no failover")
        return time.monotonic()

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.master]:
            node.stop()


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, fixed in Redis 6.2) is free too."""
    import socket

    for _ in range(200):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair for a cluster node")


class ClusterSetup:
    def __init__(self, workdir: Path) -> None:
        self.nodes = [
            Node(workdir, f"cluster-{i}", ["cluster-enabled yes", "cluster-node-timeout 2000",
                                           f"cluster-config-file nodes-{i}.conf"])
            for i in range(3)
        ]  # fmt: skip
        for node in self.nodes:
            node.port = cluster_port()

    def start(self) -> ClusterSetup:
        try:
            return self._start()
        except BaseException:
            self.stop()  # never leave half a cluster running
            raise

    def _start(self) -> ClusterSetup:
        for node in self.nodes:
            node.start()
        per = 16384 // len(self.nodes)
        for i, node in enumerate(self.nodes):
            first, last = i * per, (16383 if i == len(self.nodes) - 1 else (i + 1) * per - 1)
            node.client().execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
        for node in self.nodes[1:]:
            self.nodes[0].client().execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)

        def ok() -> bool:
            return all(n.client().cluster("info")["cluster_state"] == "ok" for n in self.nodes)

        wait_until(ok, timeout=30, interval=0.2, message="cluster never became ok")
        return self

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
