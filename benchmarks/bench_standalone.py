#!/usr/bin/env python3
"""Standalone GitStratum against stock git http-backend, measured in the same run.

    python benchmarks/bench_standalone.py [--files 3000 --commits 400] [--clones 20]
                                          [--big-gb 1.1] [--skip-big] [--out results.json]

What it measures, each figure labelled:

1. Push of the whole generated repository (every branch, then every tag),
   wall time, into an empty repository on each server.
2. Cold depth-1 clones, and cold full clones: one at a time, server CPU per
   clone (the server processes' own CPU time) and latency.  "Cold" is
   honest: GitStratum runs with the pack cache OFF and no pre-warm
   (``--pack-cache-bytes 0 --prewarm-refs none``), so every clone builds
   its pack however often the benchmark is re-run.  Beside them, the
   machine's limit for a response of that size: the same storm of a static
   file sent by nginx with sendfile; ``fraction_of_sendfile_limit`` reads
   each server's rate against it.
3. Peak RSS of the (cache-off) server's processes while one client clones
   a repository whose pack is over 1 GB (the generated repository plus
   ``--big-gb`` of random blobs).

Everything runs on loopback; both servers see the same requests.  Needs
nginx and fcgiwrap (``apt-get install -y nginx fcgiwrap``) for the
baseline.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from baseline import Baseline
from clone_storm import server_tree
from harness import (
    CACHE_OFF,
    COLD,
    GIT,
    BenchOptions,
    GitStratum,
    make_repo,
    ratio,
    report,
    run_storm,
    sendfile_limit,
    sh,
    with_limit,
)


class Options(BenchOptions):
    optParameters: list[list[Any]] = [
        ["files", None, 3000, "Files in the generated repository.", int],
        ["commits", None, 400, "Commits on its main branch.", int],
        ["clones", None, 20, "Cold depth-1 clones per server (full clones: a quarter).", int],
        ["big-gb", None, 1.1, "GB of random blobs for the large-pack RSS figure.", float],
    ]
    optFlags = [["skip-big", None, "Leave out the large-pack RSS figure."]]


def timed_push(src: Path, url: str) -> float:
    t = time.perf_counter()
    sh("git", "push", "-q", url, "--all", cwd=src)
    sh("git", "push", "-q", url, "--tags", cwd=src)
    return round(time.perf_counter() - t, 3)


def tree_rss(server: GitStratum) -> int:
    """Resident bytes of the server's processes (the root and its descendants)."""
    total = 0
    for pid in server_tree(server.pids):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def main() -> int:
    a = Options()
    a.run()
    work = Path(tempfile.mkdtemp(prefix="gs-bench-"))
    src = make_repo(work / "src.git", files=a["files"], commits=a["commits"])
    results: dict = {
        "repo": {
            "generator": "gitstratum.testing.repogen",
            "files": a["files"],
            "commits": a["commits"],
        },
        "method": "cold = GitStratum with --pack-cache-bytes 0 --prewarm-refs none; "
        "server CPU = server processes' own utime+stime (/proc), not the machine's",
    }
    # One process: the RSS figure reads that process.
    gs = GitStratum(work, extra=("--workers", "1", *CACHE_OFF))
    base = Baseline(work)
    try:
        # 1. push wall time, into empty repositories
        push = {
            "label": "push of every branch then every tag, wall time",
            "git": timed_push(src, base.new_repo("acme/pushed")),
            "gitstratum": timed_push(src, gs.new_repo("acme/pushed")),
        }
        push["ratio"] = ratio(push["gitstratum"], push["git"])
        results["push_s"] = push
        # 2. cold clones, one at a time; the baseline serves the repacked original
        base_url = base.new_repo("acme/app", from_repo=src)
        gs_url = gs.base + "/acme/pushed.git"
        for depth, name in ((1, "depth1"), (0, "full")):
            n = a["clones"] if depth else max(3, a["clones"] // 4)
            g = run_storm(
                base_url,
                label=GIT,
                depth=depth,
                n=n,
                c=1,
                pids=base.git_pids,
                cpu_logs=base.cpu_logs,
            )
            s = run_storm(gs_url, label=COLD, depth=depth, n=n, c=1, pids=gs.pids, token=gs.token)
            limit = sendfile_limit(base, s, n, 1)
            results[name] = {
                "git": with_limit(g, limit),
                "gitstratum": with_limit(s, limit),
                "sendfile_limit": limit,
                "cpu_ratio": ratio(s["server_cpu_s_per_clone"], g["server_cpu_s_per_clone"]),
                "latency_ratio": ratio(s["latency_p50_s"], g["latency_p50_s"]),
            }
        # 3. RSS while streaming a pack over 1 GB, from the cache-off server
        if not a["skip-big"]:
            big = make_repo(
                work / "big.git", files=300, commits=40, big_blobs_mb=int(a["big-gb"] * 1024)
            )
            url = gs.new_repo("acme/big")
            # random blobs never delta; without this the client spends minutes searching
            sh("git", "-c", "core.bigFileThreshold=16m", "push", "-q", url, "main", cwd=big)
            peak, stop = [tree_rss(gs)], threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak.append(tree_rss(gs))
                    time.sleep(0.05)

            t = threading.Thread(target=sample)
            t.start()
            started = time.perf_counter()
            sh("git", "clone", "-q", "--bare", url, str(work / "big-clone.git"))
            stop.set()
            t.join()
            size = sum(
                p.stat().st_size for p in (work / "big-clone.git" / "objects" / "pack").iterdir()
            )
            results["big_clone"] = {
                "label": f"{COLD}, one full clone, peak RSS of the server's processes",
                "pack_bytes": size,
                "seconds": round(time.perf_counter() - started, 2),
                "peak_rss_mb": round(max(peak) / 2**20, 1),
            }
    finally:
        gs.stop()
        base.stop()
    return report(results, a["out"], work)


if __name__ == "__main__":
    sys.exit(main())
