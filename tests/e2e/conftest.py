"""A real standalone server on loopback, and helpers that drive it like a user would."""

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
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from gitstratum.testing.repogen import make_repo

ROOT = Path(__file__).resolve().parents[2]


def checkout_env(**extra: str) -> dict[str, str]:
    """The environment for a server process: this checkout's code first on its path.

    A server started from ``cwd`` elsewhere would otherwise import whatever
    ``gitstratum`` is installed, which need not be the code under test.
    """
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT), **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(
    *args: str,
    cwd: str | Path | None = None,
    check: bool = True,
    env: dict | None = None,
    input: bytes | None = None,
) -> subprocess.CompletedProcess:
    """Run the real git; on failure show its stderr in the assertion."""
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        capture_output=True,
        input=input,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"git {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr.decode()}"
        )
    return proc


def refs_of(git_dir: str | Path) -> dict[str, str]:
    out = git("for-each-ref", "--format=%(objectname) %(refname)", cwd=git_dir).stdout.decode()
    return {name: sha for sha, name in (line.split() for line in out.splitlines())}


def remote_refs(url: str, *extra: str) -> dict[str, str]:
    out = git("ls-remote", *extra, url).stdout.decode()
    refs = {}
    for line in out.splitlines():
        sha, name = line.split("\t")
        if not name.endswith("^{}") and name != "HEAD":
            refs[name] = sha
    return refs


@attrs.define
class Server:
    """A twistd gitstratum-standalone process with its own data dir."""

    data_dir: Path
    port: int
    proc: subprocess.Popen | None = None
    # -- issue 3 (h9): SSH and git:// listeners, on their own loopback ports --
    ssh_port: int = attrs.field(factory=free_port)
    git_port: int = attrs.field(factory=free_port)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *extra: str) -> None:
        log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "--pidfile=",
                "-n",
                "gitstratum-standalone",
                "--data-dir",
                str(self.data_dir),
                "--http",
                f"tcp:{self.port}:interface=127.0.0.1",
                # issue 3 (h9)
                "--ssh",
                f"tcp:{self.ssh_port}:interface=127.0.0.1",
                "--git",
                f"tcp:{self.git_port}:interface=127.0.0.1",
                # one process unless a test asks for more (counts in /metrics stay simple)
                *(() if "--workers" in extra else ("--workers", "1")),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir.parent,
            env=checkout_env(),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_text()[-3000:]}")
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not come up: " + self.log_text()[-3000:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None

    def alive(self) -> bool:
        return (
            self.proc is not None
            and self.proc.poll() is None
            and self.request("GET", "/healthz")[0] == 200
        )

    def pids(self) -> list[int]:
        """The server's process and every descendant (worker processes included)."""
        assert self.proc is not None
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            todo.extend(int(c) for c in children)
        return found

    def rss_bytes(self) -> int:
        """Resident memory of the server's processes, summed."""
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        return total

    def disk_bytes(self) -> int:
        """Bytes held by files under the data directory (apparent sizes)."""
        total = 0
        for path in self.data_dir.rglob("*"):
            try:
                if path.is_file():
                    total += path.stat().st_size
            except OSError:
                continue
        return total

    def log_text(self) -> str:
        p = self.data_dir.parent / f"{self.data_dir.name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict | None = None,
        timeout: float = 60,
    ) -> tuple[int, dict, bytes]:
        """One raw HTTP request (path sent as given, never normalised)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            hdrs = dict(headers or {})
            if body is not None and "Transfer-Encoding" not in hdrs:
                hdrs["Content-Length"] = str(len(body))
            for k, v in hdrs.items():
                conn.putheader(k, v)
            conn.endheaders()
            if body is not None:
                conn.send(body)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def api(
        self, method: str, path: str, payload: dict | None = None, token: str | None = None
    ) -> tuple[int, object]:
        body = json.dumps(payload).encode() if payload is not None else None
        status, _, data = self.request(
            method,
            "/api/v1" + path,
            body,
            {
                "Authorization": f"Bearer {token or self.admin_token}",
                "Content-Type": "application/json",
            },
        )
        return status, (json.loads(data) if data else None)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from gitstratum.cli import main; sys.exit(main())",
                *args,
            ],
            capture_output=True,
            timeout=60,
            env={**os.environ, "GITSTRATUM_URL": self.base, "GITSTRATUM_TOKEN": self.admin_token},
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"gitstratum {' '.join(args)}: {proc.stderr.decode()}")
        return proc

    def user_with_token(self, name: str) -> str:
        """Create *name* (if new) through the CLI and mint it a token."""
        if self.cli("user", "create", name, check=False).returncode not in (0, 1):
            raise AssertionError("gitstratum user create crashed")
        return self.cli("token", "create", name).stdout.decode().strip()

    def url(self, repo: str, token: str | None = None, user: str = "ci") -> str:
        cred = f"{user}:{token}@" if token else ""
        return f"http://{cred}127.0.0.1:{self.port}/{repo}.git"

    # -- issue 3 (h9) --
    def ssh_url(self, repo: str) -> str:
        return f"ssh://git@127.0.0.1:{self.ssh_port}/{repo}.git"

    def git_url(self, repo: str) -> str:
        return f"git://127.0.0.1:{self.git_port}/{repo}.git"

    def basic(self, token: str, user: str = "ci") -> dict:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("server")
    srv = Server(base / "data", free_port())
    srv.data_dir.mkdir()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def ci_token(server: Server) -> str:
    return server.user_with_token("ci")


_repo_cache: dict[tuple, Path] = {}


def bench_repo(
    tmp_root: Path, files: int, commits: int, seed: int = 1, branches: int = 5, tags: int = 10
) -> Path:
    """A ``gitstratum.testing.repogen`` repository (made once per session and shape)."""
    key = (files, commits, seed, branches, tags)
    if key not in _repo_cache:
        out = tmp_root / f"src-{files}-{commits}-{seed}-{branches}-{tags}.git"
        # linear main: the shallow tests count commits along it
        _repo_cache[key] = make_repo(
            out, files=files, commits=commits, seed=seed, branches=branches, tags=tags, merges=False
        )
    return _repo_cache[key]


@pytest.fixture(scope="session")
def repo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("repos")


def copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
