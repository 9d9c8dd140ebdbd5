#!/usr/bin/env python3
"""The pack cache against stock git http-backend: CI clone storms, same run.

    python benchmarks/bench_cache.py [--files 12000 --commits 3000]
        [--storm 300 --concurrency 8] [--git-storm 300] [--full-storm 100]
        [--server-args "..."] [--ci-delay 3] [--out results.json]

On a large generated repository (``gitstratum.testing.repogen``), against
git http-backend behind nginx+fcgiwrap (``baseline.py``), with the
project's storm driver (``clone_storm.py``), every figure labelled:

1. Warm depth-1 storm: after one clone has warmed each server, N clones, C
   at a time: clones/s, server CPU per clone (the server processes' own),
   p50/p90/p99 latency.  GitStratum's figures are labelled "warm (cache
   hit)" only if its cache counted a hit for every request of the storm;
   otherwise the label says how many were hits.
2. Warm full-clone storm: the same for full clones.
   Beside both, the machine's limit: the same storm of a static file of the
   same size from nginx with sendfile, and each server's
   ``fraction_of_sendfile_limit``.
3. Streaming from the cache: MB/s of a warm full-clone response read by
   one client (the median of 7 fetches, and the slowest and fastest).
4. The cold-then-warm curve: latency of each of the first 10 depth-1 clones
   after a push to main, on a server with pre-warm and on one without
   (``--prewarm-refs none``; both with the cache on): once starting right
   after the push, once after ``--ci-delay`` seconds (the time a CI job
   takes to start).

git gets the same requests (``--git-storm`` can shorten its storm: its
rate is per clone and it costs seconds per clone).
"""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from baseline import Baseline
from harness import (
    GIT,
    WARM,
    BenchOptions,
    GitStratum,
    fetch_body,
    http_fetch,
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
        ["files", None, 12000, "Files in the generated repository.", int],
        ["commits", None, 3000, "Commits on its main branch.", int],
        ["storm", None, 300, "Depth-1 clones in GitStratum's storm.", int],
        ["git-storm", None, 300, "Clones in git's storms (it costs seconds a clone).", int],
        ["full-storm", None, 100, "Full clones in GitStratum's storm.", int],
        ["concurrency", None, 8, "Clones at once.", int],
        ["server-args", None, "", "Extra gitstratum-standalone options."],
        ["ci-delay", None, 3.0, "Seconds between a push and the first CI clone (curve 2).", float],
    ]


def fetch_once(server: GitStratum, repo: str, want: str, depth: int) -> tuple[float, int]:
    """One v2 fetch read to the end: (seconds, bytes)."""
    return http_fetch(server, repo, fetch_body(want, depth))


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
    a = Options()
    a.run()
    work = Path(tempfile.mkdtemp(prefix="gs-bench-cache-"))
    extra = shlex.split(a["server-args"])
    t0 = time.perf_counter()
    src = make_repo(work / "src.git", files=a["files"], commits=a["commits"])
    results: dict = {
        "repo": {
            "generator": "gitstratum.testing.repogen",
            "files": a["files"],
            "commits": a["commits"],
            "made_in_s": round(time.perf_counter() - t0, 1),
        },
        "method": "warm = GitStratum with the cache on (defaults), after one warm-up clone; "
        "the label says 'warm (cache hit)' only if the cache counted a hit per request; "
        "server CPU = server processes' own utime+stime (/proc), not the machine's",
        "server_args": extra,
    }
    gs = GitStratum(work, "gs", extra)
    cold = GitStratum(work, "gs-noprewarm", [*extra, "--prewarm-refs", "none"])
    base = Baseline(work)
    try:
        url = gs.new_repo("acme/app")
        t0 = time.perf_counter()
        sh("git", "push", "-q", url, "--all", cwd=src)
        results["push_s"] = {
            "label": "push of every branch, wall time",
            "gitstratum": round(time.perf_counter() - t0, 2),
        }
        cold_url = cold.new_repo("acme/app")
        sh("git", "push", "-q", cold_url, "main", cwd=src)
        git_url = base.new_repo("acme/app", from_repo=src)
        gs_url = gs.base + "/acme/app.git"
        c = a["concurrency"]
        for depth, name, n, gn in (
            (1, "depth1", a["storm"], a["git-storm"]),
            (0, "full", a["full-storm"], min(a["full-storm"], a["git-storm"])),
        ):
            git_storm: dict[str, Any] = {"pids": base.git_pids, "cpu_logs": base.cpu_logs}
            run_storm(git_url, label="warm-up", depth=depth, n=1, c=1, **git_storm)
            run_storm(gs_url, label="warm-up", depth=depth, n=1, c=1, pids=gs.pids, token=gs.token)
            g = run_storm(git_url, label=GIT, depth=depth, n=gn, c=c, **git_storm)
            s = run_storm(
                gs_url, label=WARM, depth=depth, n=n, c=c, pids=gs.pids, token=gs.token, server=gs
            )
            limit = sendfile_limit(base, s, n, c)
            results[name] = {
                "git": with_limit(g, limit),
                "gitstratum": with_limit(s, limit),
                "sendfile_limit": limit,
                "clones_per_s_ratio": ratio(s["clones_per_s"], g["clones_per_s"]),
                "cpu_per_clone_ratio": ratio(
                    s["server_cpu_s_per_clone"], g["server_cpu_s_per_clone"]
                ),
            }
        tip = sh("git", "rev-parse", "main", cwd=src).strip()
        before = gs.metrics()
        fetch_once(gs, "acme/app", tip, 0)
        # One 50 MB fetch takes ~30 ms, so one sample is at the mercy of the
        # scheduler: report the median of several, and the spread.
        samples = sorted(fetch_once(gs, "acme/app", tip, 0) for _ in range(7))
        hits = gs.metrics().get("gitstratum_pack_cache_hits_total", 0) - before.get(
            "gitstratum_pack_cache_hits_total", 0
        )
        seconds, size = samples[len(samples) // 2]
        results["stream_from_cache"] = {
            "label": f"{WARM if hits >= 8 else f'mixed ({int(hits)} hits of 8)'}, one client",
            "bytes": size,
            "seconds": round(seconds, 3),
            "mb_per_s": round(size / seconds / 1e6, 1),
            "mb_per_s_min_max": [
                round(samples[-1][1] / samples[-1][0] / 1e6, 1),
                round(samples[0][1] / samples[0][0] / 1e6, 1),
            ],
        }
        delay = a["ci-delay"]
        results["first_10_after_push_s"] = {
            "label": "seconds of each of the first 10 depth-1 fetches after a push to main, "
            "cache on; pre-warm on (default) or off (--prewarm-refs none)",
            "prewarm": curve(gs, "acme/app", url, work),
            "no_prewarm": curve(cold, "acme/app", cold_url, work),
            f"prewarm_after_{delay}s": curve(gs, "acme/app", url, work, delay),
            f"no_prewarm_after_{delay}s": curve(cold, "acme/app", cold_url, work, delay),
        }
    finally:
        gs.stop()
        cold.stop()
        base.stop()
    return report(results, a["out"], work)


if __name__ == "__main__":
    sys.exit(main())
