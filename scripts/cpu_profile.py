#!/usr/bin/env python3
"""Where one proxy's CPU goes, in the bench layout: two backends (nginx when installed, as in
`strangler bench`) and the proxy on CPU 0, wrk on CPU 1, 64 connections.

Prints req/s, the proxy's user and system CPU time per request (from /proc), and the context
switches per request: the proxy's involuntary ones (preempted, mostly by a backend it woke) and
the backends' voluntary ones (each is a wake-up). Then optionally records one more run with a
profiler:

    scripts/cpu_profile.py                       # figures only
    scripts/cpu_profile.py --perf out.data       # perf record (then: perf report -i out.data --sort dso)
    scripts/cpu_profile.py --strace out.txt      # strace -c: syscalls per request
    scripts/cpu_profile.py --py-spy out.txt      # py-spy raw stacks
    scripts/cpu_profile.py --peer envoy          # the same for Envoy (figures, perf, strace)
    scripts/cpu_profile.py --backend python      # our small httptools backends instead of nginx
    scripts/cpu_profile.py -e STRANGLER_SHADOW__ENABLED=true -e STRANGLER_SHADOW__SAMPLE_PERCENTAGE=100

Needs wrk and taskset; Envoy comes from the bench extra. Run it from the repository's venv.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.bench import nginx_binary, run_wrk, start_backend, start_peer, start_strangler, stop  # noqa: E402
from proxy.control.embedded import EmbeddedRedis  # noqa: E402

WRK_PIN = ["taskset", "-c", "1"]


def cpu_times(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def switches(pid: int) -> tuple[int, int]:
    """Voluntary and involuntary context switches of every thread of ``pid``."""
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(line.split()[1])
    return voluntary, involuntary


def family(pid: int) -> list[int]:
    """``pid`` and its children (an nginx master and its worker)."""
    kids = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    return [pid, *kids]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--peer", help="profile a peer (envoy, asgiproxy) instead of Strangler")
    parser.add_argument("-e", "--env", action="append", default=[], help="KEY=VALUE for Strangler")
    parser.add_argument("--backend", choices=("nginx", "python"), default=None,
                        help="backends (default: nginx when installed, as strangler bench does)")  # fmt: skip
    parser.add_argument("--perf", help="record with perf into this file")
    parser.add_argument("--strace", help="count syscalls with strace -c into this file")
    parser.add_argument("--py-spy", dest="py_spy", help="record py-spy raw stacks into this file")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="strangler-profile-") as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis")
        redis_url = redis.start()
        kind = args.backend or ("nginx" if nginx_binary() else "python")
        b1, v1 = start_backend("v1", kind, Path(tmp))
        b2, v2 = start_backend("v2", kind, Path(tmp))
        if args.peer:
            proc, url = start_peer(args.peer, v1, v2, 10, Path(tmp))
        else:
            proc, url = start_strangler(v1, v2, redis_url, 10, Path(tmp), extra)
        try:
            backends = [pid for b in (b1, b2) for pid in family(b.pid)]  # type: ignore[arg-type]
            for pid in (*backends, proc.pid):
                os.sched_setaffinity(pid, {0})
            run_wrk(url + "/", 64, 2, 1, WRK_PIN)  # warm-up
            user0, sys0 = cpu_times(proc.pid)
            ours0, theirs0 = switches(proc.pid), [switches(pid) for pid in backends]
            result = run_wrk(url + "/", 64, args.seconds, 1, WRK_PIN)
            user1, sys1 = cpu_times(proc.pid)
            ours1, theirs1 = switches(proc.pid), [switches(pid) for pid in backends]
            n = result.requests or 1
            user, system = (user1 - user0) / n * 1e6, (sys1 - sys0) / n * 1e6
            print(f"req/s {result.rps:.0f}  CPU per request: user {user:.1f} us, system {system:.1f} us, "
                  f"total {user + system:.1f} us ({kind} backends)")  # fmt: skip
            woken = sum(after[0] - before[0] for before, after in zip(theirs0, theirs1, strict=True))
            print(f"context switches per request: proxy preempted {(ours1[1] - ours0[1]) / n:.2f}, "
                  f"proxy slept {(ours1[0] - ours0[0]) / n:.2f}, backends woken {woken / n:.2f}")  # fmt: skip
            tool = None
            if args.perf:
                tool = ["perf", "record", "-F", "999", "-p", str(proc.pid), "-o", args.perf,
                        "--", "sleep", str(int(args.seconds))]  # fmt: skip
            elif args.strace:
                tool = ["strace", "-c", "-f", "-p", str(proc.pid), "-o", args.strace]
            elif args.py_spy:
                spy = str(Path(sys.executable).with_name("py-spy"))
                tool = [spy, "record", "-p", str(proc.pid), "-d", str(int(args.seconds)), "-r", "300",
                        "-f", "raw", "-o", args.py_spy, "--nonblocking"]  # fmt: skip
            if tool:
                profiler = subprocess.Popen(tool, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
                profiled = run_wrk(url + "/", 64, args.seconds, 1, WRK_PIN)
                if args.strace:
                    profiler.send_signal(2)
                profiler.wait()
                print(f"profiled {profiled.requests} requests into {args.perf or args.strace or args.py_spy}")
        finally:
            for p in (proc, b1, b2):
                stop(p)
            redis.stop()


if __name__ == "__main__":
    main()
