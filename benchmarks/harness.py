"""What every benchmark here needs: a GitStratum server, the git baseline, clone storms.

Imported by the ``bench_*.py`` scripts (run them from anywhere: their own
directory is on ``sys.path``). Everything runs on loopback.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
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
    """Run a command; exit with its stderr when it fails."""
    p = subprocess.run(args, cwd=cwd, env=env or ENV, capture_output=True, check=False)
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, args))} failed: {p.stderr.decode()[-2000:]}")
    return p.stdout.decode()


def pkt(s: str) -> bytes:
    b = s.encode()
    return b"%04x" % (len(b) + 4) + b


def make_repo(out: Path, *args: str) -> Path:
    sh(sys.executable, str(BENCH / "make_repo.py"), str(out), *args)
    return out


class GitStratum:
    """A gitstratum-standalone process with a user 'bench' and its token."""

    def __init__(self, work: Path, name: str = "gs", extra: tuple[str, ...] | list[str] = ()):
        self.work = work
        self.data = work / f"{name}-data"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = work / f"{name}.log"
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
                *(() if "--ssh" in extra else ("--ssh", "none")),
                *extra,
            ],
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
            cwd=work,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.base + "/healthz", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit(f"{name} did not start; see {self.log}") from None
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
        """Create *name* writable by 'bench'; its HTTP URL with credentials."""
        self.cli("repo", "create", name)
        self.cli("grant", "bench", name, "write")
        return f"http://bench:{self.token}@127.0.0.1:{self.port}/{name}.git"

    def metrics(self) -> dict[str, float]:
        """The pack-cache samples of /metrics, summed over labels."""
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
    """Stock git http-backend behind nginx+fcgiwrap, serving a folder of bare repositories."""

    def __init__(self, work: Path):
        work.chmod(0o755)  # nginx workers run unprivileged and must reach the root
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

    def new_repo(self, name: str, from_repo: Path | None = None) -> str:
        """A repository (a copy of *from_repo*, or empty and pushable); its URL."""
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


def storm(url: str, depth: int, n: int, c: int, label: str, token: str | None = None) -> dict:
    """One clone_storm.py run; its JSON result."""
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


def http_fetch(server: GitStratum, repo: str, body: bytes) -> tuple[float, int]:
    """One protocol-v2 upload-pack POST read to the end: (seconds, response bytes)."""
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


def report(results: dict, out: str | None, work: Path) -> int:
    """Print the results (and write them to *out*), remove the work directory."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        Path(out).write_text(text)
    shutil.rmtree(work, ignore_errors=True)
    return 0
