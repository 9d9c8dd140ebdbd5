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
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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


def sh(*args: str, cwd: str | Path | None = None, quiet: bool = True) -> str:
    p = subprocess.run(args, cwd=cwd, env=ENV, capture_output=quiet, check=False)
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, args))} failed: {p.stderr.decode() if quiet else ''}")
    return p.stdout.decode() if quiet else ""


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


class GitStratum:
    def __init__(self, work: Path):
        self.data = work / "gs-data"
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
            ],
            stdout=open(work / "gs.log", "wb"),
            stderr=subprocess.STDOUT,
            cwd=work,
        )
        wait_http(self.base + "/healthz")
        self.cli_env = {
            **ENV,
            "GITSTRATUM_URL": self.base,
            "GITSTRATUM_TOKEN": (self.data / "admin-token").read_text().strip(),
        }
        self.cli("user", "create", "bench")
        self.token = self.cli("token", "create", "bench").strip()

    def cli(self, *args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "gitstratum.cli", *args],
            env=self.cli_env,
            capture_output=True,
            check=True,
        ).stdout.decode()

    def new_repo(self, name: str) -> str:
        self.cli("repo", "create", name)
        self.cli("grant", "bench", name, "write")
        return f"http://bench:{self.token}@127.0.0.1:{self.port}/{name}.git"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


class Baseline:
    def __init__(self, work: Path):
        self.root = work / "baseline-root"
        self.root.mkdir()
        self.state = work / "baseline-state"
        self.port = free_port()
        self.base = sh(
            str(BENCH / "baseline-http-backend"),
            "start",
            str(self.root),
            str(self.port),
            str(self.state),
        ).strip()

    def new_repo(self, name: str, from_repo: Path | None = None) -> str:
        dst = self.root / f"{name}.git"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if from_repo is not None:
            shutil.copytree(from_repo, dst)
        else:
            sh("git", "init", "-q", "--bare", "--initial-branch=main", str(dst))
        sh("git", "-C", str(dst), "config", "http.receivepack", "true")
        sh("chmod", "-R", "a+rwX", str(self.root))
        return f"{self.base}/{name}.git"

    def stop(self) -> None:
        sh(str(BENCH / "baseline-http-backend"), "stop", str(self.state))


def timed_push(src: Path, url: str) -> float:
    t = time.perf_counter()
    sh("git", "push", "-q", url, "--all", cwd=src)
    sh("git", "push", "-q", url, "--tags", cwd=src)
    return time.perf_counter() - t


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
    work.chmod(0o755)  # nginx workers run unprivileged and must reach the baseline root
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
    gs, base = GitStratum(work), Baseline(work)
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
    print(json.dumps(results, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
