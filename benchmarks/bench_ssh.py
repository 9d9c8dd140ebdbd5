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
import json
import os
import re
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
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*args: str, cwd: str | Path | None = None, env: dict | None = None) -> str:
    p = subprocess.run(args, cwd=cwd, env=env or ENV, capture_output=True, check=False)
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, args))} failed: {p.stderr.decode()[-2000:]}")
    return p.stdout.decode()


def process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def pkt(s: str) -> bytes:
    b = s.encode()
    return b"%04x" % (len(b) + 4) + b


class Server:
    def __init__(self, work: Path):
        self.work = work
        self.data = work / "gs-data"
        self.port, self.ssh_port = free_port(), free_port()
        self.log = work / "gs.log"
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
                f"tcp:{self.ssh_port}:interface=127.0.0.1",
            ],
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
            cwd=work,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("server did not start") from None
                time.sleep(0.1)
        self.cli_env = {
            **ENV,
            "GITSTRATUM_URL": f"http://127.0.0.1:{self.port}",
            "GITSTRATUM_TOKEN": (self.data / "admin-token").read_text().strip(),
        }
        self.cli("user", "create", "bench")
        self.token = self.cli("token", "create", "bench").strip()
        key = work / "id_ed25519"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        self.cli("key", "add", "bench", str(key) + ".pub")
        self.ssh = (
            f"ssh -i {key} -o IdentitiesOnly=yes -o UserKnownHostsFile={work}/known_hosts "
            f"-o StrictHostKeyChecking=accept-new -o LogLevel=ERROR -p {self.ssh_port}"
        )

    def cli(self, *args: str) -> str:
        return sh(sys.executable, "-m", "gitstratum.cli", *args, env=self.cli_env)

    def repo(self, name: str) -> tuple[str, str]:
        self.cli("repo", "create", name)
        self.cli("grant", "bench", name, "write")
        return (
            f"http://bench:{self.token}@127.0.0.1:{self.port}/{name}.git",
            f"ssh://git@127.0.0.1:{self.ssh_port}/{name}.git",
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


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
        import base64
        import http.client

        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
        cred = base64.b64encode(f"bench:{server.token}".encode()).decode()
        t0 = time.perf_counter()
        c.request(
            "POST",
            f"/{name}.git/git-upload-pack",
            body=body,
            headers={
                "Git-Protocol": "version=2",
                "Authorization": "Basic " + cred,
                "Content-Type": "application/x-git-upload-pack-request",
            },
        )
        r = c.getresponse()
        total = 0
        while chunk := r.read(1 << 20):
            total += len(chunk)
        wall = time.perf_counter() - t0
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
    print(json.dumps(results, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
