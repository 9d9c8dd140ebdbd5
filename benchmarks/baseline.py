"""The reference servers the benchmarks compare against, on loopback.

``Baseline`` runs stock ``git http-backend`` behind nginx + fcgiwrap (the way
Git's own documentation serves smart HTTP), started and stopped by the
benchmark, in a state directory of its own.  The same nginx serves
``/static/`` with ``sendfile on``: a static file of the size of a clone's
response, fetched by the same storm client, is what this machine can send
at best (the physical limit), so every storm figure can be read as a
fraction of it.

Needs Debian's nginx and fcgiwrap: ``apt-get install -y nginx fcgiwrap``.

    python benchmarks/baseline.py ROOT [--port 8090] [--state DIR]

serves the bare repositories under ROOT until interrupted (for trying it by
hand); the benchmarks use the class.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from harness import ENV, free_port, sh

from gitstratum import cmdline
from gitstratum.cmdline import InterspersedOptions

SETUP_HINT = "the git baseline needs nginx and fcgiwrap: apt-get install -y nginx fcgiwrap"

_CONF = """\
daemon off;
worker_processes auto;
pid {state}/nginx.pid;
error_log {state}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {state}/tmp-body;
  fastcgi_temp_path {state}/tmp-fastcgi;
  proxy_temp_path {state}/tmp-proxy;
  uwsgi_temp_path {state}/tmp-uwsgi;
  scgi_temp_path {state}/tmp-scgi;
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 0;
    # the machine's limit: a static file sent with sendfile(2), no user-space copy
    location /static/ {{
      root {root};
      sendfile on;
      tcp_nopush on;
    }}
    location ~ ^/.+/(info/refs|git-upload-pack|git-receive-pack)$ {{
      fastcgi_pass unix:{state}/fcgiwrap.sock;
      fastcgi_buffering off;
      fastcgi_request_buffering off;
      include {fastcgi_params};
      fastcgi_param SCRIPT_FILENAME {timed};
      fastcgi_param GIT_PROJECT_ROOT {root};
      fastcgi_param GIT_HTTP_EXPORT_ALL "";
      fastcgi_param PATH_INFO $uri;
      fastcgi_param GIT_PROTOCOL $http_git_protocol;
      fastcgi_param REMOTE_USER bench;
    }}
  }}
}}
"""


# fcgiwrap runs each CGI with SIGCHLD ignored, so the kernel reaps git's
# processes itself and adds their CPU time to no parent: /proc cannot see it.
# This wrapper (perl-base is always installed; it costs ~2 ms a request,
# which counts as the baseline's) restores SIGCHLD, runs the backend, and
# appends its own and its children's CPU seconds to a log clone_storm reads.
_TIMED = """\
#!/usr/bin/perl
$SIG{{CHLD}} = 'DEFAULT';
my $rc = system('{backend}');
my @cpu = times;
open(my $log, '>>', '{log}') or die "cpu log: $!";
print $log "@cpu\n";
close($log);
exit($rc == -1 ? 127 : $rc >> 8);
"""


def _wait_for(check: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up")
        time.sleep(0.05)


class Baseline:
    """git http-backend behind nginx + fcgiwrap, and nginx's sendfile, over *work*/baseline-*."""

    def __init__(self, work: Path, fcgi_children: int = 8, port: int | None = None):
        # nginx workers run unprivileged (nobody) when started as root: they must reach ROOT
        work.chmod(0o755)
        self.root = work / "baseline-root"
        self.state = work / "baseline-state"
        (self.root / "static").mkdir(parents=True)
        self.state.mkdir()
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        sock = self.state / "fcgiwrap.sock"
        # its own session: fcgiwrap -c N preforks N children, ended as one group
        self.fcgiwrap = subprocess.Popen(
            [_tool("fcgiwrap"), "-c", str(fcgi_children), "-s", f"unix:{sock}"],
            stdin=subprocess.DEVNULL,
            stdout=open(self.state / "fcgiwrap.log", "wb"),
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
        )
        _wait_for(sock.exists, "fcgiwrap")
        sock.chmod(0o777)
        self.cpu_log = self.state / "cgi-cpu.log"
        self.cpu_log.touch(mode=0o666)
        timed = self.state / "git-http-backend-timed"
        backend = Path(sh("git", "--exec-path").strip()) / "git-http-backend"
        timed.write_text(_TIMED.format(backend=backend, log=self.cpu_log))
        timed.chmod(0o755)
        conf = self.state / "nginx.conf"
        conf.write_text(
            _CONF.format(
                state=self.state,
                port=self.port,
                root=self.root,
                fastcgi_params="/etc/nginx/fastcgi_params",
                timed=timed,
            )
        )
        self.nginx = subprocess.Popen(
            [
                _tool("nginx"),
                "-p",
                str(self.state),
                "-e",
                str(self.state / "error.log"),
                "-c",
                str(conf),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.state / "nginx.out", "wb"),
        )
        _wait_for(self._up, "nginx (see {})".format(self.state / "error.log"))

    def _up(self) -> bool:
        if self.nginx.poll() is not None:
            raise SystemExit(f"nginx exited: {(self.state / 'nginx.out').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(self.base + "/static/", timeout=1).read()
        except urllib.error.HTTPError:
            return True  # 403/404 for the bare folder: nginx answers
        except OSError:
            return False
        return True

    @property
    def git_pids(self) -> list[int]:
        """The processes that serve Git: nginx (master, workers) and fcgiwrap (and its git children)."""
        return [self.nginx.pid, self.fcgiwrap.pid]

    @property
    def cpu_logs(self) -> list[Path]:
        """Where the CPU of exited git processes is recorded (see _TIMED)."""
        return [self.cpu_log]

    @property
    def static_pids(self) -> list[int]:
        """The processes that serve static files: nginx's master and workers."""
        return [self.nginx.pid]

    def new_repo(self, name: str, from_repo: Path | None = None) -> str:
        """A repository (a copy of *from_repo*, or empty and pushable); its URL."""
        dst = self.root / f"{name}.git"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if from_repo is not None:
            shutil.copytree(from_repo, dst)
        else:
            sh("git", "init", "-q", "--bare", "--initial-branch=main", str(dst))
        sh("git", "-C", str(dst), "config", "http.receivepack", "true")
        _open_up(self.root)
        return f"{self.base}/{name}.git"

    def static_file(self, name: str, size: int) -> str:
        """A file of *size* random bytes under /static/ (written in chunks); its URL."""
        path = self.root / "static" / name
        rng = random.Random(name)
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 1 << 20)
                f.write(rng.randbytes(n))
                left -= n
        _open_up(self.root)
        return f"{self.base}/static/{name}"

    def stop(self) -> None:
        if self.nginx.poll() is None:
            self.nginx.terminate()
            self.nginx.wait(30)
        if self.fcgiwrap.poll() is None:
            os.killpg(self.fcgiwrap.pid, signal.SIGTERM)
            self.fcgiwrap.wait(30)


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not found:
        raise SystemExit(SETUP_HINT)
    return found


def _open_up(root: Path) -> None:
    """Let nginx's unprivileged workers read, and git (as us) write, everything under *root*."""
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666)


class Options(InterspersedOptions):
    synopsis = "python benchmarks/baseline.py ROOT [--port PORT]"
    optParameters = [["port", None, 8090, "Port on 127.0.0.1 to listen on.", int]]

    def parseArgs(self, root: str) -> None:  # type: ignore[override]
        self["root"] = root


def main() -> int:
    options = Options()
    status = cmdline.parse(options, None, "baseline.py")
    if status is not None:
        return status
    work = Path(tempfile.mkdtemp(prefix="gs-baseline-"))
    base = Baseline(work, port=options["port"])
    # SIGTERM stops it as Ctrl-C does: nginx and fcgiwrap must not outlive it
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        for repo in sorted(Path(options["root"]).glob("**/*.git")):
            if repo.name != ".git" and (repo / "HEAD").is_file():
                name = str(repo.relative_to(options["root"]))[: -len(".git")]
                print(base.new_repo(name, from_repo=repo), flush=True)
        print(f"serving on {base.base}; Ctrl-C stops", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        base.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
