#!/usr/bin/env python3
"""The pack cache against stock git http-backend: CI clone storms, same run.

    python benchmarks/bench_cache.py [--files 12000 --commits 3000]
        [--storm 300 --concurrency 8] [--git-storm 300] [--full-storm 100]
        [--server-args "..."] [--out results.json]

On make_repo.py's large repository, against git http-backend behind
nginx+fcgiwrap (../shared/bench/baseline-http-backend), with
../shared/bench/clone_storm.py:

1. Warm depth-1 storm: after one clone has warmed each server, N clones, C
   at a time: clones/s, server CPU per clone, p50/p99 latency.
2. Warm full-clone storm: the same for full clones.
3. Streaming from the cache: MB/s of a warm full-clone response read by
   one client (the median of 7 fetches, and the slowest and fastest).
4. The cold-then-warm curve: latency of each of the first 10 depth-1 clones
   after a push to main, on a server with pre-warm and on one without
   (``--prewarm-refs none``): once starting right after the push, once after
   ``--ci-delay`` seconds (the time a CI job takes to start).

git gets the same requests (``--git-storm`` can shorten its storm: its
rate is per clone and it costs seconds per clone).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from harness import BENCH, Baseline, GitStratum, http_fetch, pkt, report, sh, storm


def fetch_once(server: GitStratum, repo: str, want: str, depth: int) -> tuple[float, int]:
    """One v2 fetch read to the end: (seconds, bytes)."""
    body = (
        pkt("command=fetch\n") + pkt("agent=git/2.45.0\n") + pkt("object-format=sha1\n") + b"0001"
    )
    body += pkt("thin-pack\n") + pkt("ofs-delta\n") + pkt("no-progress\n")
    if depth:
        body += pkt(f"deepen {depth}\n")
    body += pkt(f"want {want}\n") + pkt("done\n") + b"0000"
    return http_fetch(server, repo, body)


def curve(server: GitStratum, repo: str, url: str, work: Path, delay: float = 0.0) -> list[float]:
    """Push one new commit to main, wait *delay* s (CI start-up), then time 10 depth-1 fetches."""
    wt = work / f"wt-{server.port}"
    if not wt.exists():
        sh("git", "clone", "-q", "--depth", "1", url, str(wt))
    (wt / "CHANGE.txt").write_text(f"change at {time.time()}\n")
    sh("git", "add", ".", cwd=wt)
    sh("git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "change", cwd=wt)
    sh("git", "push", "-q", url, "HEAD:main", cwd=wt)
    tip = sh("git", "rev-parse", "HEAD", cwd=wt).strip()
    time.sleep(delay)
    return [round(fetch_once(server, repo, tip, 1)[0], 4) for _ in range(10)]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--files", type=int, default=12000)
    ap.add_argument("--commits", type=int, default=3000)
    ap.add_argument("--storm", type=int, default=300)
    ap.add_argument("--git-storm", type=int, default=300)
    ap.add_argument("--full-storm", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--server-args", default="", help="extra gitstratum-standalone options")
    ap.add_argument(
        "--ci-delay",
        type=float,
        default=3.0,
        help="seconds between a push and the first CI clone, for the second curve",
    )
    ap.add_argument("--out")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gs-bench-cache-"))
    extra = shlex.split(a.server_args)
    src = work / "src.git"
    t0 = time.perf_counter()
    sh(
        sys.executable,
        str(BENCH / "make_repo.py"),
        str(src),
        "--files",
        str(a.files),
        "--commits",
        str(a.commits),
    )
    results: dict = {
        "repo": {
            "files": a.files,
            "commits": a.commits,
            "made_in_s": round(time.perf_counter() - t0, 1),
        }
    }
    gs = GitStratum(work, "gs", extra)
    cold = GitStratum(work, "gs-noprewarm", [*extra, "--prewarm-refs", "none"])
    base = Baseline(work)
    try:
        url = gs.new_repo("acme/app")
        t0 = time.perf_counter()
        sh("git", "push", "-q", url, "--all", cwd=src)
        results["push_s"] = round(time.perf_counter() - t0, 2)
        cold_url = cold.new_repo("acme/app")
        sh("git", "push", "-q", cold_url, "main", cwd=src)
        git_url = base.new_repo("acme/app", from_repo=src)
        gs_url = gs.base + "/acme/app.git"
        for depth, name, n, gn in (
            (1, "depth1", a.storm, a.git_storm),
            (0, "full", a.full_storm, min(a.full_storm, a.git_storm)),
        ):
            storm(git_url, depth, 1, 1, "git-warmup")
            storm(gs_url, depth, 1, 1, "gs-warmup", token=gs.token)
            before = gs.metrics()
            g = storm(git_url, depth, gn, a.concurrency, f"git-{name}")
            s = storm(gs_url, depth, n, a.concurrency, f"gitstratum-{name}", token=gs.token)
            after = gs.metrics()
            results[name] = {
                "git": g,
                "gitstratum": s,
                "clones_per_s_ratio": round(s["clones_per_s"] / g["clones_per_s"], 1),
                "cpu_per_clone_ratio": round(
                    s["server_cpu_s_per_clone"] / max(g["server_cpu_s_per_clone"], 1e-9), 4
                ),
                "cache_metrics_delta": {k: after.get(k, 0) - before.get(k, 0) for k in after},
            }
        tip = sh("git", "rev-parse", "main", cwd=src).strip()
        fetch_once(gs, "acme/app", tip, 0)
        # One 50 MB fetch takes ~30 ms, so one sample is at the mercy of the
        # scheduler: report the median of several, and the spread.
        samples = sorted(fetch_once(gs, "acme/app", tip, 0) for _ in range(7))
        seconds, size = samples[len(samples) // 2]
        results["stream_from_cache"] = {
            "bytes": size,
            "seconds": round(seconds, 3),
            "mb_per_s": round(size / seconds / 1e6, 1),
            "mb_per_s_min_max": [
                round(samples[-1][1] / samples[-1][0] / 1e6, 1),
                round(samples[0][1] / samples[0][0] / 1e6, 1),
            ],
        }
        results["first_10_after_push_s"] = {
            "prewarm": curve(gs, "acme/app", url, work),
            "no_prewarm": curve(cold, "acme/app", cold_url, work),
            f"prewarm_after_{a.ci_delay}s": curve(gs, "acme/app", url, work, a.ci_delay),
            f"no_prewarm_after_{a.ci_delay}s": curve(cold, "acme/app", cold_url, work, a.ci_delay),
        }
    finally:
        gs.stop()
        cold.stop()
        base.stop()
    return report(results, a.out, work)


if __name__ == "__main__":
    sys.exit(main())
