#!/usr/bin/env python3
"""Git over SSH against Git over HTTP on the same GitStratum server, same run.

    python benchmarks/bench_ssh.py [--files 3000 --commits 400] [--clones 10]
                                   [--stream-mb 512] [--out results.json]

1. Cold depth-1 clones of the default make_repo.py repository with the real
   git client, one at a time, over HTTP and over SSH: server CPU per clone,
   read from the server process's own counters (/proc/PID/stat), so the
   client's work is not counted on either side.
2. One SSH connection streaming a large pack: a protocol-v2 fetch of a
   repository of random blobs, sent with the real ssh client to
   git-upload-pack and read to the end; MB/s of the response, and the same
   request over HTTP for comparison.
3. The cipher, MAC and key exchange the server negotiated (from its log).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import BENCH, ENV, GitStratum, free_port, http_fetch, pkt, report, sh

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


class Server(GitStratum):
    """GitStratum with SSH on, and 'bench' able to log in with a fresh ed25519 key."""

    def __init__(self, work: Path):
        self.ssh_port = free_port()
        # One process: the figures read that process's own CPU counters.
        ssh = ("--ssh", f"tcp:{self.ssh_port}:interface=127.0.0.1", "--workers", "1")
        super().__init__(work, "gs", ssh)
        key = work / "id_ed25519"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        self.cli("key", "add", "bench", str(key) + ".pub")
        self.ssh = (
            f"ssh -i {key} -o IdentitiesOnly=yes -o UserKnownHostsFile={work}/known_hosts "
            f"-o StrictHostKeyChecking=accept-new -o LogLevel=ERROR -p {self.ssh_port}"
        )

    def repo(self, name: str) -> tuple[str, str]:
        return self.new_repo(name), f"ssh://git@127.0.0.1:{self.ssh_port}/{name}.git"


def clone_cpu(server: Server, url: str, n: int, env: dict) -> dict:
    times, cpu = [], 0.0
    for i in range(n):
        dst = server.work / f"clone-{i}"
        c0, t0 = process_cpu(server.proc.pid), time.perf_counter()
        sh("git", "clone", "-q", "--depth", "1", "--no-checkout", url, str(dst), env=env)
        times.append(time.perf_counter() - t0)
        cpu += process_cpu(server.proc.pid) - c0
        shutil.rmtree(dst)
    times.sort()
    return {"server_cpu_s_per_clone": round(cpu / n, 4), "latency_p50_s": round(times[n // 2], 4)}


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
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--commits", type=int, default=400)
    ap.add_argument("--clones", type=int, default=10)
    ap.add_argument("--stream-mb", type=int, default=512)
    ap.add_argument("--out")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gs-bench-ssh-"))
    results: dict = {}
    server = Server(work)
    try:
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
        http_url, ssh_url = server.repo("acme/app")
        sh("git", "push", "-q", http_url, "--all", cwd=src)
        ssh_env = {**ENV, "GIT_SSH_COMMAND": server.ssh}
        # one warm-up each, so neither side pays first-use costs in the figures
        clone_cpu(server, http_url, 1, ENV)
        clone_cpu(server, ssh_url, 1, ssh_env)
        h = clone_cpu(server, http_url, a.clones, ENV)
        s = clone_cpu(server, ssh_url, a.clones, ssh_env)
        results["depth1"] = {
            "http": h,
            "ssh": s,
            "ssh_over_http_cpu": round(
                s["server_cpu_s_per_clone"] / h["server_cpu_s_per_clone"], 3
            ),
        }
        big = work / "big"
        sh("git", "init", "-q", "-b", "main", str(big))
        for i in range(max(1, a.stream_mb // 32)):
            (big / f"blob{i}.bin").write_bytes(os.urandom(32 << 20))
        sh("git", "add", ".", cwd=big)
        sh("git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "blobs", cwd=big)
        big_http, _ = server.repo("acme/big")
        sh("git", "-c", "core.bigFileThreshold=16m", "push", "-q", big_http, "main", cwd=big)
        want = sh("git", "rev-parse", "HEAD", cwd=big).strip()
        stream(server, "acme/big", want, over_ssh=True)  # warm the page cache
        results["stream"] = {
            "ssh": stream(server, "acme/big", want, over_ssh=True),
            "http": stream(server, "acme/big", want, over_ssh=False),
        }
        log = server.log.read_text(errors="replace")
        found = re.findall(r"(?:cipher|mac|kex)[^\n]{0,200}", log)
        results["negotiated"] = found[-1] if found else "not logged"
    finally:
        server.stop()
    return report(results, a.out, work)


if __name__ == "__main__":
    sys.exit(main())
