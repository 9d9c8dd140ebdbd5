"""The worker supervisor: shared listening sockets, spawning, restarting and stopping workers."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gitstratum.standalone.workers import (
    METRICS_ENV,
    WorkerSupervisor,
    bind_tcp,
    format_worker_fds,
    parse_worker_fds,
)


class FakeTransport:
    def __init__(self, pid: int):
        self.pid = pid


class ProcessReactor(Clock):
    """A Clock that records spawnProcess calls instead of starting processes."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []
        self.next_pid = 1000

    def spawnProcess(self, protocol, executable, args, env, childFDs):  # noqa: N802 - Twisted's name
        self.next_pid += 1
        protocol.makeConnection(FakeTransport(self.next_pid))
        self.spawned.append(
            {"protocol": protocol, "args": args, "env": env, "fds": childFDs, "pid": self.next_pid}
        )


def test_bind_tcp_listens_inheritably_and_refuses_other_kinds() -> None:
    """A tcp: description gives an inheritable listening socket; ssl: and unix: are refused."""
    sock = bind_tcp("tcp:0:interface=127.0.0.1:backlog=5")
    try:
        assert sock.get_inheritable()
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        with socket.create_connection((host, port), timeout=5):
            pass  # the kernel accepts into the backlog
    finally:
        sock.close()
    for bad in ("ssl:8443:privateKey=k.pem", "unix:/tmp/s", "tcp:"):
        with pytest.raises(ValueError):
            bind_tcp(bad)


def test_worker_fds_round_trip() -> None:
    """The --worker-fds value names each socket's descriptor and its address family."""
    sock = bind_tcp("tcp:0:interface=127.0.0.1")
    try:
        text = format_worker_fds({"http": sock})
        assert text == f"http={sock.fileno()}"
        assert parse_worker_fds(text) == {"http": (sock.fileno(), socket.AF_INET)}
    finally:
        sock.close()


@pytest.fixture
def supervisor(tmp_path: Path):
    reactor = ProcessReactor()
    sock = bind_tcp("tcp:0:interface=127.0.0.1")
    killed: list[tuple[int, int]] = []
    sup = WorkerSupervisor(
        reactor=reactor,
        count=2,
        worker_argv=["--data-dir", str(tmp_path / "data")],
        sockets={"http": sock},
        metrics_dir=str(tmp_path / "metrics"),
        executable="/usr/bin/python3",
        kill=lambda pid, sig: killed.append((pid, sig)),
    )
    yield sup, reactor, sock, killed
    sock.close()


def test_starts_workers_that_inherit_the_sockets(supervisor) -> None:
    """Each worker is a standalone process told which inherited descriptor serves what."""
    sup, reactor, sock, _ = supervisor
    sup.startService()
    assert len(reactor.spawned) == 2
    for spawned in reactor.spawned:
        args = spawned["args"]
        assert "gitstratum-standalone" in args
        assert args[args.index("--workers") + 1] == "1"
        assert args[args.index("--worker-fds") + 1] == f"http={sock.fileno()}"
        assert spawned["fds"][sock.fileno()] == sock.fileno()
        assert spawned["env"][METRICS_ENV] == sup.metrics_dir


def test_a_worker_that_dies_is_started_again(supervisor) -> None:
    """A crashed worker is replaced after a short delay; the others are untouched."""
    sup, reactor, _, _ = supervisor
    sup.startService()
    first = reactor.spawned[0]["protocol"]
    first.processEnded(Failure(ProcessTerminated(exitCode=1)))
    assert len(reactor.spawned) == 2
    reactor.advance(1.0)
    assert len(reactor.spawned) == 3
    assert sorted(sup.workers) == [0, 1]


def test_stop_terminates_workers_and_waits(supervisor) -> None:
    """Stopping sends SIGTERM to every worker and fires once all have ended; none restart."""
    sup, reactor, _, killed = supervisor
    sup.startService()
    done = sup.stopService()
    assert sorted(killed) == sorted((s["pid"], signal.SIGTERM) for s in reactor.spawned)
    fired: list[object] = []
    done.addCallback(fired.append)
    for s in reactor.spawned:
        s["protocol"].processEnded(Failure(ProcessDone(0)))
    assert fired
    reactor.advance(5)
    assert len(reactor.spawned) == 2
