"""A storm of identical clone requests, and the server's own CPU for them.

This is what a CI fleet does after a push: many jobs fetch the same commit
at the same depth.  ``storm`` speaks Git protocol v2 over smart HTTP: it asks
``ls-refs`` for HEAD once, then sends *requests* ``fetch`` requests,
*concurrency* at a time, each on a new connection, reads every response to
the end without keeping it, and checks that each carries a pack (the
``packfile`` section's first side-band packet starts with ``PACK``) and ends
with a flush.  With ``static=True`` it GETs a static file instead (the
sendfile limit), through the same client, so the two compare fairly.

Server CPU is the SERVER PROCESSES' OWN CPU time: utime + stime, from
``/proc/PID/stat``, of each given pid and all its descendants, plus the
cutime + cstime of each (children that exited and were reaped during the
storm), read before and after.  A busy machine or the client's own work
does not enter it.  For nginx + fcgiwrap give nginx's master and fcgiwrap
(the workers and git processes are their descendants); for GitStratum, the
twistd process (its workers are its children).  fcgiwrap ignores SIGCHLD,
so the kernel keeps no account of the git processes it runs; ``baseline.py``
wraps git http-backend to append their CPU seconds to a log, given here as
``--cpu-log`` and added in the same way (after minus before).

    python benchmarks/clone_storm.py URL [--depth 1] [-n 40] [-c 4]
        [--server-pid PID ...] [--pid-file FILE ...] [--cpu-log FILE ...] [--user U --token T]
        [--label L] [--static]

The last line printed is a JSON object with every figure.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from twisted.python import usage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gitstratum import cmdline
from gitstratum.cmdline import InterspersedOptions  # noqa: E402

__all__ = ["storm", "server_cpu_seconds", "server_tree", "percentile", "Options", "main"]

_TICK = os.sysconf("SC_CLK_TCK")
_READ = 1 << 20
_HEADERS = {"Git-Protocol": "version=2", "User-Agent": "git/2.45.0"}


def pkt(text: str) -> bytes:
    data = text.encode()
    return b"%04x" % (len(data) + 4) + data


def fetch_body(want: str, depth: int) -> bytes:
    """The protocol-v2 ``fetch`` request a ``git clone [--depth N]`` of *want* sends."""
    body = pkt("command=fetch\n") + pkt("agent=git/2.45.0\n") + pkt("object-format=sha1\n")
    body += b"0001" + pkt("thin-pack\n") + pkt("ofs-delta\n") + pkt("no-progress\n")
    if depth:
        body += pkt(f"deepen {depth}\n")
    return body + pkt(f"want {want}\n") + pkt("done\n") + b"0000"


# -- the server's CPU --


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime + stime + cutime + cstime in seconds) of *pid*; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # after the comm field: state ppid ... utime(11) stime(12) cutime(13) cstime(14)
    return int(fields[1]), sum(int(v) for v in fields[11:15]) / _TICK


def _process_table() -> dict[int, tuple[int, float]]:
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            table[int(entry)] = st
    return table


def _tree(pids: Iterable[int], table: dict[int, tuple[int, float]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    todo = [p for p in pids if p in table]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, ()))
    return seen


def server_tree(pids: Iterable[int]) -> set[int]:
    """*pids* (those still running) and all their descendants."""
    return _tree(pids, _process_table())


def server_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds used so far by *pids*, their descendants and their reaped children."""
    table = _process_table()
    return sum(table[p][1] for p in _tree(pids, table))


def logged_cpu_seconds(logs: Iterable[str | Path]) -> float:
    """CPU seconds appended to *logs* by processes as they exited (whitespace-separated)."""
    total = 0.0
    for log in logs:
        with open(log) as f:
            total += sum(float(word) for word in f.read().split())
    return total


def percentile(ordered: Sequence[float], p: float) -> float | None:
    """The nearest-rank *p*-th percentile of the sorted *ordered*."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered))) - 1))]


# -- the client --


class _Client:
    def __init__(self, url: str, user: str | None, token: str | None):
        self.url = urllib.parse.urlsplit(url.rstrip("/"))
        self.headers = dict(_HEADERS)
        if token:
            cred = base64.b64encode(f"{user or 'bench'}:{token}".encode()).decode()
            self.headers["Authorization"] = "Basic " + cred

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=600)

    def _post(self, body: bytes) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self._conn()
        headers = {**self.headers, "Content-Type": "application/x-git-upload-pack-request"}
        conn.request("POST", self.url.path + "/git-upload-pack", body=body, headers=headers)
        return conn, conn.getresponse()

    def head(self) -> str:
        body = pkt("command=ls-refs\n") + b"0001" + pkt("symrefs\n") + pkt("ref-prefix HEAD\n")
        conn, resp = self._post(body + b"0000")
        data = resp.read()
        conn.close()
        if resp.status != 200:
            raise RuntimeError(f"ls-refs: HTTP {resp.status} {data[:200]!r}")
        if len(data) > 8 and data[:4] != b"0000":
            return data[4:44].decode()
        raise RuntimeError("no HEAD advertised")

    def fetch(self, body: bytes) -> tuple[float, int]:
        """One fetch read to the end: (seconds, response bytes); RuntimeError without a pack."""
        started = time.perf_counter()
        conn, resp = self._post(body)
        try:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {resp.read(200)!r}")
            total, in_pack = 0, False
            # pkt-lines up to the first pack data; the rest in large reads
            while not in_pack:
                head = resp.read(4)
                total += len(head)
                if head == b"0001":
                    continue  # the delimiter between sections (shallow-info, packfile)
                if len(head) < 4 or head in (b"0000", b"0002"):
                    raise RuntimeError(f"response ended before a pack ({total} bytes)")
                line = resp.read(int(head, 16) - 4)
                total += len(line)
                if line[:1] == b"\1":
                    if line[1:5] != b"PACK":
                        raise RuntimeError(f"pack data does not start with PACK: {line[:20]!r}")
                    in_pack = True
                elif line[:1] == b"\3" or line.startswith(b"ERR "):
                    raise RuntimeError(f"server error: {line[:200]!r}")
            tail = b""
            while chunk := resp.read(_READ):
                total += len(chunk)
                tail = (tail + chunk)[-4:]
            if tail != b"0000":
                raise RuntimeError("response does not end with a flush: cut short")
        finally:
            conn.close()
        return time.perf_counter() - started, total

    def get(self) -> tuple[float, int]:
        """One GET of a static file read to the end: (seconds, bytes)."""
        started = time.perf_counter()
        conn = self._conn()
        try:
            conn.request("GET", self.url.path, headers=self.headers)
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            total = 0
            while chunk := resp.read(_READ):
                total += len(chunk)
        finally:
            conn.close()
        return time.perf_counter() - started, total


def storm(
    url: str,
    *,
    depth: int = 1,
    requests: int = 40,
    concurrency: int = 4,
    server_pids: Sequence[int] = (),
    cpu_logs: Sequence[str | Path] = (),
    user: str | None = None,
    token: str | None = None,
    label: str = "",
    static: bool = False,
) -> dict[str, Any]:
    """Run one storm; its figures (``errors`` counts failed requests, the first few in ``error_samples``)."""
    client = _Client(url, user, token)
    if static:
        one = client.get
    else:
        body = fetch_body(client.head(), depth)

        def one() -> tuple[float, int]:
            return client.fetch(body)

    latencies: list[float] = []
    sizes: list[int] = []
    errors: list[str] = []
    left = [requests]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not left[0]:
                    return
                left[0] -= 1
            try:
                seconds, size = one()
            except (OSError, RuntimeError, http.client.HTTPException) as e:
                with lock:
                    errors.append(str(e)[:200])
                continue
            with lock:
                latencies.append(seconds)
                sizes.append(size)

    cpu_before = server_cpu_seconds(server_pids) + logged_cpu_seconds(cpu_logs)
    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    cpu_after = server_cpu_seconds(server_pids) + logged_cpu_seconds(cpu_logs)
    cpu = cpu_after - cpu_before if server_pids else None
    latencies.sort()
    ok = len(latencies)
    return {
        "label": label,
        "url": url,
        "kind": "static GET" if static else f"protocol v2 fetch, depth {depth or 'full'}",
        "requests": requests,
        "concurrency": concurrency,
        "ok": ok,
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": round(wall, 3),
        "clones_per_s": round(ok / wall, 2) if wall else None,
        "mb_per_s": round(sum(sizes) / wall / 1e6, 1) if wall else None,
        "response_bytes_median": sorted(sizes)[len(sizes) // 2] if sizes else None,
        "latency_p50_s": _round(percentile(latencies, 50)),
        "latency_p90_s": _round(percentile(latencies, 90)),
        "latency_p99_s": _round(percentile(latencies, 99)),
        "server_cpu_s": _round(cpu),
        "server_cpu_s_per_clone": _round(cpu / ok) if cpu is not None and ok else None,
        "server_cpu_source": (
            f"/proc utime+stime of pids {sorted(server_pids)} and descendants, incl. reaped"
            f" children{' + CPU logs ' + ', '.join(map(str, cpu_logs)) if cpu_logs else ''}"
            if server_pids
            else "not measured (no --server-pid)"
        ),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class Options(InterspersedOptions):
    synopsis = "python benchmarks/clone_storm.py URL [options]"
    longdesc = __doc__
    optParameters = [
        ["depth", None, 1, "Clone depth; 0 for a full clone.", int],
        ["requests", "n", 40, "Requests in all.", int],
        ["concurrency", "c", 4, "Requests at once.", int],
        ["user", None, "bench", "User for HTTP basic auth (with --token)."],
        ["token", None, None, "Token for HTTP basic auth."],
        ["label", None, "", "What this storm measures, carried into the result."],
    ]
    optFlags = [["static", None, "GET URL as a static file instead of cloning (sendfile limit)."]]

    def __init__(self) -> None:
        super().__init__()
        self["server-pids"] = []
        self["cpu-logs"] = []

    def opt_server_pid(self, pid: str) -> None:
        """A server process whose tree's CPU is measured (repeatable)."""
        try:
            self["server-pids"].append(int(pid))
        except ValueError:
            raise usage.UsageError(f"--server-pid: not a pid: {pid!r}") from None

    def opt_pid_file(self, path: str) -> None:
        """A file holding server pid(s), e.g. nginx.pid (repeatable)."""
        try:
            for word in Path(path).read_text().split():
                self.opt_server_pid(word)
        except OSError as e:
            raise usage.UsageError(f"--pid-file: {e}") from None

    def opt_cpu_log(self, path: str) -> None:
        """A file to which server processes append their CPU seconds as they exit (repeatable);
        for servers that reap children without accounting (fcgiwrap ignores SIGCHLD)."""
        self["cpu-logs"].append(path)

    def parseArgs(self, url: str) -> None:  # type: ignore[override]
        self["url"] = url

    def postOptions(self) -> None:
        if self["requests"] < 1 or self["concurrency"] < 1 or self["depth"] < 0:
            raise usage.UsageError("-n and -c must be at least 1, --depth at least 0")


def main(argv: Sequence[str] | None = None) -> int:
    options = Options()
    status = cmdline.parse(options, argv, "clone_storm.py")
    if status is not None:
        return status
    result = storm(
        options["url"],
        depth=options["depth"],
        requests=options["requests"],
        concurrency=options["concurrency"],
        server_pids=options["server-pids"],
        cpu_logs=options["cpu-logs"],
        user=options["user"],
        token=options["token"],
        label=options["label"],
        static=bool(options["static"]),
    )
    for error in result["error_samples"]:
        print("error:", error, file=sys.stderr)
    print(json.dumps(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
