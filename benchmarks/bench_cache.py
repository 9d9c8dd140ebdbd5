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
3. Streaming from the cache: MB/s of one warm full-clone response read by
   one client.
4. The cold-then-warm curve: latency of each of the first 10 depth-1 clones
   after a push to main, on a server with pre-warm and on one without
   (``--prewarm-refs none``): once starting right after the push, once after
   ``--ci-delay`` seconds (the time a CI job takes to start).

git gets the same requests (``--git-storm`` can shorten its storm: its
rate is per clone and it costs seconds per clone).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "bench"
ENV = {
    **os.environ,
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*args: str, cwd: str | Path | None = None, env: dict | None = None) -> str:
    p = subprocess.run(args, cwd=cwd, env=env or ENV, capture_output=True, check=False)
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, args))} failed: {p.stderr.decode()[-2000:]}")
    return p.stdout.decode()


def pkt(s: str) -> bytes:
    b = s.encode()
    return b"%04x" % (len(b) + 4) + b


class GitStratum:
    def __init__(self, work: Path, name: str, extra: list[str]):
        self.data = work / f"{name}-data"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "--pidfile=",
                "-n",
                "gitstratum-standalone",
                "--data-dir",
                str(self.data),
                "--http",
                f"tcp:{self.port}:interface=127.0.0.1",
                "--ssh",
                "none",
                *extra,
            ],
            stdout=open(work / f"{name}.log", "wb"),
            stderr=subprocess.STDOUT,
            cwd=work,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.base + "/healthz", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name} did not start") from None
                time.sleep(0.1)
        self.cli_env = {
            **ENV,
            "GITSTRATUM_URL": self.base,
            "GITSTRATUM_TOKEN": (self.data / "admin-token").read_text().strip(),
        }
        self.cli("user", "create", "bench")
        self.token = self.cli("token", "create", "bench").strip()

    def cli(self, *args: str) -> str:
        return sh(sys.executable, "-m", "gitstratum.cli", *args, env=self.cli_env)

    def new_repo(self, name: str) -> str:
        self.cli("repo", "create", name)
        self.cli("grant", "bench", name, "write")
        return f"http://bench:{self.token}@127.0.0.1:{self.port}/{name}.git"

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(self.base + "/metrics", timeout=10).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("gitstratum_pack_cache") and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = out.get(name, 0.0) + float(value)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Baseline:
    def __init__(self, work: Path):
        self.root = work / "baseline-root"
        self.root.mkdir()
        self.state = work / "baseline-state"
        self.base = sh(
            str(BENCH / "baseline-http-backend"),
            "start",
            str(self.root),
            str(free_port()),
            str(self.state),
        ).strip()

    def serve(self, name: str, src: Path) -> str:
        dst = self.root / f"{name}.git"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst)
        sh("chmod", "-R", "a+rwX", str(self.root))
        return f"{self.base}/{name}.git"

    def stop(self) -> None:
        sh(str(BENCH / "baseline-http-backend"), "stop", str(self.state))


def storm(url: str, depth: int, n: int, c: int, label: str, token: str | None = None) -> dict:
    args = [
        sys.executable,
        str(BENCH / "clone_storm.py"),
        url,
        "--depth",
        str(depth),
        "-n",
        str(n),
        "-c",
        str(c),
        "--label",
        label,
    ]
    if token:
        args += ["--user", "bench", "--token", token]
    out = subprocess.run(args, capture_output=True, env=ENV, check=False)
    if out.returncode:
        raise SystemExit(f"clone_storm {label} failed: {out.stderr.decode()[-2000:]}")
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def fetch_once(server: GitStratum, repo: str, want: str, depth: int) -> tuple[float, int]:
    """One v2 fetch read to the end: (seconds, bytes)."""
    body = (
        pkt("command=fetch\n") + pkt("agent=git/2.45.0\n") + pkt("object-format=sha1\n") + b"0001"
    )
    body += pkt("thin-pack\n") + pkt("ofs-delta\n") + pkt("no-progress\n")
    if depth:
        body += pkt(f"deepen {depth}\n")
    body += pkt(f"want {want}\n") + pkt("done\n") + b"0000"
    cred = base64.b64encode(f"bench:{server.token}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    t0 = time.perf_counter()
    conn.request(
        "POST",
        f"/{repo}.git/git-upload-pack",
        body=body,
        headers={
            "Git-Protocol": "version=2",
            "Authorization": "Basic " + cred,
            "Content-Type": "application/x-git-upload-pack-request",
        },
    )
    resp = conn.getresponse()
    total = 0
    while chunk := resp.read(1 << 20):
        total += len(chunk)
    conn.close()
    return time.perf_counter() - t0, total


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
    work.chmod(0o755)  # nginx workers run unprivileged and must reach the baseline root
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
        git_url = base.serve("acme/app", src)
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
        seconds, size = fetch_once(gs, "acme/app", tip, 0)
        results["stream_from_cache"] = {
            "bytes": size,
            "seconds": round(seconds, 3),
            "mb_per_s": round(size / seconds / 1e6, 1),
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
    print(json.dumps(results, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
