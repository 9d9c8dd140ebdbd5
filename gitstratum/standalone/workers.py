"""``--workers N``: one supervisor binds the listening sockets, N worker processes serve them.

Python runs one thread of Python at a time, so a frontend uses both cores
by running several processes.  The supervisor binds every listening socket
itself, then starts N ``gitstratum-standalone`` workers that inherit those
sockets (``--worker-fds``) and adopt them, so the kernel spreads
connections across workers on one port.  Workers share everything else
through the data directory: the LMDB stores (LMDB is multi-process safe),
the pack cache (whose single-flight uses per-key ``flock``, so an entry one
worker is building is followed by the others) and, through
prometheus_client's multiprocess mode, the metrics, so ``/metrics`` from any
worker reports the whole frontend.  A worker that dies is started again.

Only ``tcp:`` endpoint descriptions can be shared this way; anything else
(``ssl:``, ``unix:``) needs ``--workers 1``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["WorkerSupervisor", "bind_tcp", "parse_worker_fds", "format_worker_fds", "METRICS_ENV"]

#: prometheus_client's switch to multiprocess mode (read when it is imported)
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"

_RESTART_DELAY = 1.0


def bind_tcp(description: str) -> socket.socket:
    """A listening socket for a ``tcp:PORT[:interface=HOST][:backlog=N]`` description.

    Raises ValueError for any other kind of endpoint.
    """
    kind, _, rest = description.partition(":")
    if kind != "tcp" or not rest:
        raise ValueError(f"--workers > 1 needs tcp: endpoints, not {description!r}")
    fields = rest.split(":")
    port = int(fields[0])
    options = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
    interface = options.get("interface", "")
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((interface, port))
    sock.listen(int(options.get("backlog", "50")))
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def format_worker_fds(sockets: Mapping[str, socket.socket]) -> str:
    return ",".join(f"{name}={sock.fileno()}" for name, sock in sorted(sockets.items()))


def parse_worker_fds(value: str) -> dict[str, tuple[int, int]]:
    """``http=5,ssh=6`` -> {name: (fd, address family)} of inherited listening sockets."""
    out: dict[str, tuple[int, int]] = {}
    for item in filter(None, value.split(",")):
        name, _, fd = item.partition("=")
        number = int(fd)
        family = socket.socket(fileno=os.dup(number))
        try:
            out[name] = (number, family.family)
        finally:
            family.close()
    return out


class _Worker(ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int):
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


@attrs.define(eq=False)
class WorkerSupervisor(Service):
    """Starts *count* workers on the inherited *sockets*, restarts them, stops them."""

    reactor: Any
    count: int
    worker_argv: Sequence[str]
    sockets: Mapping[str, socket.socket]
    metrics_dir: str
    executable: str = sys.executable
    kill: Any = os.kill
    workers: dict[int, _Worker] = attrs.field(factory=dict)

    log = Logger()

    def startService(self) -> None:
        # Fresh metric files: counters of a previous run must not be summed in.
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        os.makedirs(self.metrics_dir, mode=0o700)
        Service.startService(self)
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        worker = _Worker(self, index)
        args = [
            self.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--pidfile=",
            "-n",
            "gitstratum-standalone",
            *self.worker_argv,
            "--workers",
            "1",
            "--worker-fds",
            format_worker_fds(self.sockets),
        ]
        fds: dict[int, Any] = {0: 0, 1: 1, 2: 2}
        for sock in self.sockets.values():
            fds[sock.fileno()] = sock.fileno()
        env = {**os.environ, METRICS_ENV: self.metrics_dir}
        self.reactor.spawnProcess(worker, self.executable, args, env=env, childFDs=fds)
        self.workers[index] = worker
        self.log.info("Started worker {index} (pid {pid})", index=index, pid=worker.pid)

    def worker_ended(self, worker: _Worker, reason: Failure) -> None:
        if worker.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid, self.metrics_dir)
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.running:
            self.log.warn(
                "Worker {index} (pid {pid}) ended: {reason}; starting it again",
                index=worker.index,
                pid=worker.pid,
                reason=reason.getErrorMessage(),
            )
            self.reactor.callLater(_RESTART_DELAY, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if self.running and index not in self.workers:
            self._spawn(index)

    def stopService(self) -> defer.Deferred[Any]:
        Service.stopService(self)
        waiting = []
        for worker in list(self.workers.values()):
            waiting.append(worker.ended)
            if worker.pid is not None:
                try:
                    self.kill(worker.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for sock in self.sockets.values():
            sock.close()
        return defer.DeferredList(waiting)
