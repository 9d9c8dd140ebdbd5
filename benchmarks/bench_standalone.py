#!/usr/bin/env python3
"""Standalone GitStratum against stock git http-backend, measured in the same run.

    python benchmarks/bench_standalone.py [--files 3000 --commits 400] [--clones 20]
                                          [--big-gb 1.1] [--skip-big] [--out results.json]

What it measures (issue 2's figures):

1. Push of the whole make_repo.py repository (all branches, then tags), wall
   time, into an empty repository on each server.
2. Cold depth-1 clones: server CPU per clone, with clone_storm.py, one clone
   at a time (there is no pack cache yet, so every clone builds its pack).
   The same for a full clone, for context.
3. Peak server RSS while one client clones a repository whose pack is over
   1 GB (make_repo.py plus large random blobs).

Everything runs on loopback; both servers see the same requests. Needs
nginx and fcgiwrap (``apt-get install -y nginx fcgiwrap``) for the
baseline, and ../shared/bench beside the checkout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import BENCH, Baseline, GitStratum, report, sh, storm


def timed_push(src: Path, url: str) -> float:
    t = time.perf_counter()
    sh("git", "push", "-q", url, "--all", cwd=src)
    sh("git", "push", "-q", url, "--tags", cwd=src)
    return time.perf_counter() - t


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def big_repo(work: Path, gb: float) -> Path:
    """make_repo.py's small repository plus large random blobs, repacked."""
    path = work / "big.git"
    sh(sys.executable, str(BENCH / "make_repo.py"), str(path), "--files", "300", "--commits", "40")
    tree = work / "big-wt"
    sh("git", "clone", "-q", str(path), str(tree))
    blob_mb = 64
    for i in range(int(gb * 1024 / blob_mb) + 1):
        with open(tree / f"blob{i}.bin", "wb") as f:
            f.write(os.urandom(blob_mb << 20))
    sh("git", "add", ".", cwd=tree)
    sh("git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "big blobs", cwd=tree)
    sh("git", "-c", "core.bigFileThreshold=16m", "push", "-q", "origin", "main", cwd=tree)
    shutil.rmtree(tree)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--commits", type=int, default=400)
    ap.add_argument("--clones", type=int, default=20)
    ap.add_argument("--big-gb", type=float, default=1.1)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gs-bench-"))
    results: dict = {"repo": {"files": a.files, "commits": a.commits}}
    src = work / "src.git"
    sh(
        sys.executable,
        str(BENCH / "make_repo.py"),
        str(src),
        "--files",
        str(a.files),
        "--commits",
        str(a.commits),
    )
    # One process: the RSS figure reads that process.
    gs, base = GitStratum(work, extra=("--workers", "1")), Baseline(work)
    try:
        # 1. push wall time, into empty repositories
        results["push_s"] = {
            "git": timed_push(src, base.new_repo("acme/pushed")),
            "gitstratum": timed_push(src, gs.new_repo("acme/pushed")),
        }
        results["push_ratio"] = results["push_s"]["gitstratum"] / results["push_s"]["git"]
        # 2. cold clones, one at a time; the baseline serves the repack'd original
        base_url = base.new_repo("acme/app", from_repo=src)
        gs_url = gs.base + "/acme/pushed.git"
        for depth, name in ((1, "depth1"), (0, "full")):
            n = a.clones if depth else max(3, a.clones // 4)
            g = storm(base_url, depth, n, 1, f"git-{name}")
            s = storm(gs_url, depth, n, 1, f"gitstratum-{name}", token=gs.token)
            results[name] = {
                "git": g,
                "gitstratum": s,
                "cpu_ratio": s["server_cpu_s_per_clone"] / g["server_cpu_s_per_clone"],
                "latency_ratio": s["latency_p50_s"] / g["latency_p50_s"],
            }
        # 3. RSS while streaming a pack over 1 GB
        if not a.skip_big:
            big = big_repo(work, a.big_gb)
            url = gs.new_repo("acme/big")
            # random blobs never delta; without this the client spends minutes searching
            sh("git", "-c", "core.bigFileThreshold=16m", "push", "-q", url, "main", cwd=big)
            peak, stop = [rss_of(gs.proc.pid)], threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak.append(rss_of(gs.proc.pid))
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
                "pack_bytes": size,
                "seconds": time.perf_counter() - started,
                "peak_rss_mb": max(peak) / 2**20,
            }
    finally:
        gs.stop()
        base.stop()
    return report(results, a.out, work)


if __name__ == "__main__":
    sys.exit(main())
