"""What every benchmark here needs: repositories, a GitStratum server, storms, labels, reports.

Imported by the ``bench_*.py`` scripts (run them from anywhere: their own
directory is on ``sys.path``).  Everything runs on loopback.  Servers run
this checkout's code (it is put first on their ``PYTHONPATH``).

Every figure a benchmark reports carries a label saying what it measured;
the labels are the constants below.  A "cold" figure comes from a server
with the pack cache OFF (``--pack-cache-bytes 0 --prewarm-refs none``), so
it measures building the pack, however often it is re-run; a "warm" figure
from a server with the cache on, after a request has filled it, and the
cache's own metrics say whether every request was a hit.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from twisted.python import usage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clone_storm import fetch_body, pkt, storm  # noqa: E402

from gitstratum.cmdline import InterspersedOptions  # noqa: E402
from gitstratum.testing import repogen  # noqa: E402

__all__ = [
    "ROOT",
    "ENV",
    "COLD",
    "WARM",
    "GIT",
    "SENDFILE",
    "CACHE_OFF",
    "BenchOptions",
    "GitStratum",
    "fetch_body",
    "pkt",
    "free_port",
    "sh",
    "make_repo",
    "run_storm",
    "cache_counts",
    "sendfile_limit",
    "with_limit",
    "ratio",
    "http_fetch",
    "measured_at",
    "report",
]

ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
}

#: labels carried by every reported figure
COLD = "cold (cache off)"
WARM = "warm (cache hit)"
GIT = "git http-backend (stock, nginx+fcgiwrap, no cache)"
SENDFILE = "sendfile limit (nginx static file, same size)"

#: gitstratum-standalone options for cold measurements: no cache, no pre-warm
CACHE_OFF = ("--pack-cache-bytes", "0", "--prewarm-refs", "none")


class BenchOptions(InterspersedOptions):
    """Options every benchmark takes: where to write the JSON report."""

    optParameters: list[list[Any]] = [["out", None, None, "Also write the JSON report here."]]

    def run(self) -> None:
        """Parse sys.argv (on a usage error print the usage and exit 2); make SIGTERM
        unwind like Ctrl-C, so the servers a benchmark started are stopped."""
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            self.parseOptions()
        except usage.UsageError as e:
            raise SystemExit(f"{self}\nerror: {e}") from None


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


def make_repo(out: Path, **shape: int) -> Path:
    """A ``gitstratum.testing.repogen`` repository of *shape* (files=, commits=, ...)."""
    return repogen.make_repo(out, **shape)


class GitStratum:
    """A gitstratum-standalone process with a user 'bench' and its token."""

    def __init__(self, work: Path, name: str = "gs", extra: tuple[str, ...] | list[str] = ()):
        self.work = work
        self.name = name
        self.extra = tuple(extra)
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
            env=ENV,
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

    @property
    def pids(self) -> list[int]:
        """The server's root process; its workers are its descendants."""
        return [self.proc.pid]

    @property
    def cache_on(self) -> bool:
        return "--pack-cache-bytes" not in self.extra or (
            self.extra[self.extra.index("--pack-cache-bytes") + 1] != "0"
        )

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
                name = name.split("{", 1)[0]
                out[name] = out.get(name, 0.0) + float(value)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def run_storm(
    url: str,
    *,
    label: str,
    depth: int,
    n: int,
    c: int,
    pids: list[int],
    cpu_logs: list[Path] | tuple[()] = (),
    token: str | None = None,
    static: bool = False,
    server: GitStratum | None = None,
) -> dict:
    """One storm, labelled; exits on any failed request.

    With *server* (a GitStratum with the cache on) the cache's hit and miss
    counters are read around the storm, and a "warm (cache hit)" label that
    they contradict is rewritten to say what happened.
    """
    before = server.metrics() if server is not None else {}
    result = storm(
        url,
        depth=depth,
        requests=n,
        concurrency=c,
        server_pids=pids,
        cpu_logs=cpu_logs,
        token=token,
        label=label,
        static=static,
    )
    if result["errors"]:
        raise SystemExit(f"storm {label!r} failed: {result['error_samples']}")
    if server is not None:
        result.update(cache_counts(server, before, n, label))
    return result


def cache_counts(server: GitStratum, before: dict[str, float], n: int, label: str) -> dict:
    """The cache's hits and misses since *before*; *label*, or what really happened
    when it claims "warm (cache hit)" and fewer than *n* requests were hits."""
    after = server.metrics()
    hits, misses = (
        int(
            after.get(f"gitstratum_pack_cache_{k}_total", 0)
            - before.get(f"gitstratum_pack_cache_{k}_total", 0)
        )
        for k in ("hits", "misses")
    )
    if label == WARM and hits < n:
        label = f"mixed ({hits} hits of {n}, cache on)"
    return {"label": label, "cache_hits": hits, "cache_misses": misses}


def sendfile_limit(baseline: Any, like: dict, n: int, c: int) -> dict:
    """The same storm of a static file as large as *like*'s responses, from nginx's sendfile."""
    size = like["response_bytes_median"]
    url = baseline.static_file(f"same-size-{size}.bin", size)
    return run_storm(url, label=SENDFILE, depth=0, n=n, c=c, pids=baseline.static_pids, static=True)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None where either is missing or b is 0 (too little CPU to read)."""
    return round(a / b, 4) if a is not None and b else None


def with_limit(result: dict, limit: dict) -> dict:
    """*result* with the fraction of the sendfile limit it reached (same sizes, so by rate)."""
    result["fraction_of_sendfile_limit"] = round(result["clones_per_s"] / limit["clones_per_s"], 4)
    return result


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


def measured_at() -> dict:
    """The code and machine a report was measured on."""
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return {
        "commit": commit or "unknown",
        "dirty": bool(status.strip()),
        "utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpus": os.cpu_count(),
        "git": sh("git", "--version").strip(),
        "python": platform.python_version(),
    }


def report(results: dict, out: str | None, work: Path) -> int:
    """Print the results with where they were measured (and write them to *out*); clean up."""
    text = json.dumps({"measured_at": measured_at(), **results}, indent=2)
    print(text)
    if out:
        Path(out).write_text(text)
    shutil.rmtree(work, ignore_errors=True)
    return 0
