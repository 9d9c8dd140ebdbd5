#!/usr/bin/env python3
"""Git over SSH against Git over HTTP on the same GitStratum server, same run.

    python benchmarks/bench_ssh.py [--files 3000 --commits 400] [--clones 10]
                                   [--stream-mb 512] [--out results.json]

Every figure is labelled, and measured twice: on a server with the pack
cache OFF and no pre-warm (``--pack-cache-bytes 0 --prewarm-refs none``:
"cold (cache off)", every request builds its pack) and on one with the
cache on after a warm-up ("warm (cache hit)", checked against the cache's
own hit counter).

1. Depth-1 clones of the generated repository with the real git client,
   one at a time, over HTTP and over SSH: server CPU per clone, from the
   server processes' own counters (/proc), so the client's work is not
   counted on either side.
2. One SSH connection streaming a large pack: a protocol-v2 fetch of a
   repository of random blobs, sent with the real ssh client to
   git-upload-pack and read to the end; MB/s of the response, the same
   request over HTTP, and the machine's limit for one connection (a static
   file of the same size from nginx with sendfile; needs ``apt-get install
   -y nginx fcgiwrap``).
3. The cipher, MAC and key exchange the server negotiated (from its log).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from baseline import Baseline
from clone_storm import server_cpu_seconds
from harness import (
    CACHE_OFF,
    COLD,
    ENV,
    WARM,
    BenchOptions,
    GitStratum,
    cache_counts,
    free_port,
    http_fetch,
    make_repo,
    pkt,
    ratio,
    report,
    sendfile_limit,
    sh,
)


class Options(BenchOptions):
    optParameters: list[list[Any]] = [
        ["files", None, 3000, "Files in the generated repository.", int],
        ["commits", None, 400, "Commits on its main branch.", int],
        ["clones", None, 10, "Depth-1 clones per transport and server.", int],
        ["stream-mb", None, 512, "MiB of random blobs in the streamed pack.", int],
    ]


class Server(GitStratum):
    """GitStratum with SSH on, and 'bench' able to log in with a fresh ed25519 key."""

    def __init__(self, work: Path, name: str, extra: tuple[str, ...] = ()):
        self.ssh_port = free_port()
        # One process: the figures are one process's CPU, for either transport.
        ssh = ("--ssh", f"tcp:{self.ssh_port}:interface=127.0.0.1", "--workers", "1", *extra)
        super().__init__(work, name, ssh)
        key = work / f"id_ed25519_{name}"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        self.cli("key", "add", "bench", str(key) + ".pub")
        self.ssh = (
            f"ssh -i {key} -o IdentitiesOnly=yes -o UserKnownHostsFile={work}/known_hosts "
            f"-o StrictHostKeyChecking=accept-new -o LogLevel=ERROR -p {self.ssh_port}"
        )

    def repo(self, name: str) -> tuple[str, str]:
        return self.new_repo(name), f"ssh://git@127.0.0.1:{self.ssh_port}/{name}.git"


def clone_cpu(server: Server, url: str, n: int, env: dict, label: str) -> dict:
    """*n* depth-1 clones with the real git, one at a time: server CPU and latency."""
    times, cpu = [], 0.0
    before = server.metrics() if server.cache_on else {}
    for i in range(n):
        dst = server.work / f"clone-{i}"
        c0, t0 = server_cpu_seconds(server.pids), time.perf_counter()
        sh("git", "clone", "-q", "--depth", "1", "--no-checkout", url, str(dst), env=env)
        times.append(time.perf_counter() - t0)
        cpu += server_cpu_seconds(server.pids) - c0
        shutil.rmtree(dst)
    times.sort()
    result = {
        "label": label,
        "server_cpu_s_per_clone": round(cpu / n, 4),
        "latency_p50_s": round(times[n // 2], 4),
    }
    if server.cache_on:
        result.update(cache_counts(server, before, n, label))
    return result


def stream(server: Server, name: str, want: str, over_ssh: bool) -> dict:
    body = (
        pkt("command=fetch\n")
        + pkt("object-format=sha1\n")
        + b"0001"
        + pkt("ofs-delta\n")
        + pkt("no-progress\n")
        + pkt(f"want {want}\n")
        + pkt("done\n")
        + b"0000"
    )
    if over_ssh:
        args = server.ssh.split() + [
            "-o",
            "SetEnv=GIT_PROTOCOL=version=2",
            "git@127.0.0.1",
            f"git-upload-pack '{name}.git'",
        ]
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV)
        assert proc.stdin is not None and proc.stdout is not None
        # the v2 capability advertisement ends in a flush; then send the request
        advert = b""
        while not advert.endswith(b"0000"):
            advert += proc.stdout.read1(65536)
        t0 = time.perf_counter()
        proc.stdin.write(body + b"0000")  # the request, then a flush to end the session
        proc.stdin.flush()
        total = 0
        while chunk := proc.stdout.read1(1 << 20):
            total += len(chunk)
        wall = time.perf_counter() - t0
        proc.wait()
    else:
        wall, total = http_fetch(server, name, body)
    return {"bytes": total, "seconds": round(wall, 3), "mb_per_s": round(total / wall / 1e6, 1)}


def main() -> int:
    a = Options()
    a.run()
    work = Path(tempfile.mkdtemp(prefix="gs-bench-ssh-"))
    results: dict = {
        "method": "cold = --pack-cache-bytes 0 --prewarm-refs none; warm = cache on, after a "
        "warm-up, label checked against the cache's hit counter; server CPU = the server "
        "processes' own utime+stime (/proc)",
    }
    servers = {COLD: Server(work, "cold", CACHE_OFF), WARM: Server(work, "warm")}
    base = Baseline(work)
    try:
        src = make_repo(work / "src.git", files=a["files"], commits=a["commits"])
        big = make_repo(
            work / "big.git",
            files=10,
            commits=1,
            branches=0,
            tags=0,
            big_blobs_mb=a["stream-mb"],
            big_blob_mb=32,
        )
        want = sh("git", "rev-parse", "main", cwd=big).strip()
        limit: dict | None = None
        for label, server in servers.items():
            http_url, ssh_url = server.repo("acme/app")
            sh("git", "push", "-q", http_url, "--all", cwd=src)
            ssh_env = {**ENV, "GIT_SSH_COMMAND": server.ssh}
            # one warm-up each, so neither side pays first-use costs in the figures
            # (on the warm server, it also fills the cache)
            clone_cpu(server, http_url, 1, ENV, "warm-up")
            clone_cpu(server, ssh_url, 1, ssh_env, "warm-up")
            h = clone_cpu(server, http_url, a["clones"], ENV, label)
            s = clone_cpu(server, ssh_url, a["clones"], ssh_env, label)
            results[f"depth1 {label}"] = {
                "http": h,
                "ssh": s,
                "ssh_over_http_cpu": ratio(
                    s["server_cpu_s_per_clone"], h["server_cpu_s_per_clone"]
                ),
            }
            big_http, _ = server.repo("acme/big")
            sh("git", "-c", "core.bigFileThreshold=16m", "push", "-q", big_http, "main", cwd=big)
            stream(server, "acme/big", want, over_ssh=True)  # warm the page cache (and pack cache)
            before = server.metrics() if server.cache_on else {}
            ssh_stream = stream(server, "acme/big", want, over_ssh=True)
            http_stream = stream(server, "acme/big", want, over_ssh=False)
            stream_label = f"{label}, one connection"
            if server.cache_on:
                stream_label = cache_counts(server, before, 2, label)["label"] + ", one connection"
            if limit is None:
                like = {"response_bytes_median": http_stream["bytes"]}
                limit = sendfile_limit(base, like, 3, 1)
            for figure in (ssh_stream, http_stream):
                figure["label"] = stream_label
                figure["fraction_of_sendfile_limit"] = ratio(figure["mb_per_s"], limit["mb_per_s"])
            results[f"stream {label}"] = {"ssh": ssh_stream, "http": http_stream}
        results["stream_sendfile_limit"] = limit
        log = servers[COLD].log.read_text(errors="replace")
        found = re.findall(r"(?:cipher|mac|kex)[^\n]{0,200}", log)
        results["negotiated"] = found[-1] if found else "not logged"
    finally:
        for server in servers.values():
            server.stop()
        base.stop()
    return report(results, a["out"], work)


if __name__ == "__main__":
    sys.exit(main())
