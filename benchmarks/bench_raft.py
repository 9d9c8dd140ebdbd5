#!/usr/bin/env python3
"""Raft over AMP on loopback: commit throughput and latency, and failover time.

    python benchmarks/bench_raft.py [--ops 5000] [--windows 1,16,64,256] [--runs 20]
                                    [--out results.json]

What it measures (issue 5's figures), with three ``gitstratum.testing.raft_process``
members on loopback and the default (LAN) timeouts:

1. Commits per second through the leader with batching: for each of
   ``--windows``, that many puts in flight at once on one pipelined client
   connection, so the proposals that arrive in one reactor turn share one
   Ready, one fsync and one APPEND per follower. The latency of each put
   (sent to answered) gives p50 and p99. Window 1 (one put at a time) shows
   what batching buys.
2. Failover, ``--runs`` times: ``kill -9`` the leader, then retry a put
   against the survivors until one commits; the time from the kill to that
   answer. The killed member is restarted and caught up before the next
   run. Target: p99 < 1.5 s.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import BenchOptions, measured_at
from twisted.python import usage

from gitstratum.testing.raft_process import KVPut, RaftCluster


class Options(BenchOptions):
    optParameters: list[list[Any]] = [
        ["ops", None, 5000, "Puts per window size (1,000 at most for window 1).", int],
        ["windows", None, "1,16,64,256", "Puts in flight, comma-separated."],
        ["runs", None, 20, "Failover runs.", int],
    ]

    def postOptions(self) -> None:
        try:
            self["windows"] = [int(w) for w in self["windows"].split(",")]
        except ValueError:
            raise usage.UsageError("--windows: comma-separated integers") from None


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def throughput(cluster: RaftCluster, ops: int, window: int) -> dict:
    """``ops`` puts with ``window`` in flight on one connection to the leader."""
    leader = cluster.leader()
    latencies: list[float] = []
    sent_at: dict[int, float] = {}
    errors = 0
    with cluster.client(leader, timeout=30) as client:
        started = time.perf_counter()
        issued = 0
        while issued < ops or client.outstanding:
            while issued < ops and client.outstanding < window:
                ask = client.send(KVPut, key=b"k%d" % (issued % 1000), value=b"x" * 64)
                sent_at[ask] = time.perf_counter()
                issued += 1
            ask, result = client.receive()
            latencies.append(time.perf_counter() - sent_at.pop(ask))
            if isinstance(result, Exception):
                errors += 1
        elapsed = time.perf_counter() - started
    return {
        "window": window,
        "ops": ops,
        "errors": errors,
        "commits_per_s": round((ops - errors) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
    }


def caught_up(cluster: RaftCluster, node: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leader = cluster.leader()
        mine, theirs = cluster.status(node), cluster.status(leader)
        if mine and theirs and mine["applied"] >= theirs["commit"]:
            return
        time.sleep(0.05)
    raise SystemExit(f"node {node} did not catch up; see {cluster.members[node].log_path}")


def failover(cluster: RaftCluster, runs: int) -> dict:
    """Kill the leader ``runs`` times; seconds from each kill to the next commit."""
    times: list[float] = []
    for run in range(runs):
        leader = cluster.leader()
        cluster.request(KVPut, key=b"before", value=b"%d" % run)
        time.sleep(0.3)  # followers heard a few heartbeats: an ordinary steady state
        killed_at = time.perf_counter()
        cluster.kill(leader)
        cluster.request(KVPut, key=b"after", value=b"%d" % run, timeout=30)
        times.append(time.perf_counter() - killed_at)
        print(f"  failover run {run + 1}/{runs}: {times[-1] * 1000:.0f} ms", file=sys.stderr)
        cluster.start(leader)
        caught_up(cluster, leader)
    return {
        "runs": runs,
        "p50_ms": round(percentile(times, 50) * 1000),
        "p99_ms": round(percentile(times, 99) * 1000),
        "max_ms": round(max(times) * 1000),
        "mean_ms": round(statistics.mean(times) * 1000),
    }


def table(results: dict) -> str:
    lines = [
        "commit throughput (3 nodes, loopback, one client connection)",
        f"  {'window':>6}  {'ops':>6}  {'commits/s':>10}  {'p50 ms':>8}  {'p99 ms':>8}  {'errors':>6}",
    ]
    for row in results["throughput"]:
        lines.append(
            f"  {row['window']:>6}  {row['ops']:>6}  {row['commits_per_s']:>10}"
            f"  {row['p50_ms']:>8}  {row['p99_ms']:>8}  {row['errors']:>6}"
        )
    f = results["failover"]
    lines += [
        f"failover: kill -9 leader -> first new commit, {f['runs']} runs",
        f"  p50 {f['p50_ms']} ms   p99 {f['p99_ms']} ms   max {f['max_ms']} ms"
        f"   mean {f['mean_ms']} ms   (target p99 < 1500 ms)",
    ]
    return "\n".join(lines)


def main() -> int:
    a = Options()
    a.run()
    work = Path(tempfile.mkdtemp(prefix="gs-bench-raft-"))
    cluster = RaftCluster(work)
    results: dict = {"measured_at": measured_at()}
    try:
        cluster.start()
        cluster.leader()
        throughput(cluster, 200, 16)  # warm up: connections, LMDB maps
        results["throughput"] = [
            throughput(cluster, a["ops"] if window > 1 else min(a["ops"], 1000), window)
            for window in a["windows"]
        ]
        results["failover"] = failover(cluster, a["runs"])
    finally:
        cluster.stop()
    print(table(results))
    if a["out"]:
        Path(a["out"]).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
