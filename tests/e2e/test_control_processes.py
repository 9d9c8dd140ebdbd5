"""Three real ``twistd -n gitstratum-control`` processes on their own loopback addresses.

A leader is elected, members join through any node, the leader is killed
with SIGKILL, a new one is elected with the topology unchanged, the killed
node restarts and catches up from its Raft log (marked down meanwhile, then
active again, as every member is), and a client without the
cluster secret is refused.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gitstratum.cluster import commands as wire
from gitstratum.cluster.auth import NONCE_BYTES, Authenticate, Prove, make_proof
from gitstratum.cluster.secret import load
from gitstratum.control.commands import Join, encode_command
from gitstratum.control.topology import Topology
from gitstratum.testing.raft_process import BlockingClient

from .conftest import checkout_env

ROOT = Path(__file__).resolve().parents[2]
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
NAMES = ("c1", "c2", "c3")
# twistd finds plugins on twisted.plugins.__path__; put this checkout's first
# so an installed older copy of the plugin file cannot shadow it.
LAUNCH = (
    "import sys, twisted.plugins; "
    f"twisted.plugins.__path__.insert(0, {str(ROOT / 'twisted' / 'plugins')!r}); "
    "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
)


def _port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _wait(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, ConnectionError, wire.NoLeader) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Client(BlockingClient):
    """A blocking AMP client that proves the cluster secret first (when it has one)."""

    def __init__(self, host: str, port: int, secret: bytes | None, node: str = "tester") -> None:
        super().__init__(port, host=host, timeout=5.0)
        if secret is not None:
            nonce_c = os.urandom(NONCE_BYTES)
            answer = self.call(Authenticate, node=node, nonce=nonce_c)
            proof = make_proof(secret, b"client", nonce_c, answer["nonce"], node, answer["node"])
            self.call(Prove, proof=proof)

    def topology(self) -> Topology:
        answer = self.call(wire.GetTopology, epoch=0, offset=0)
        epoch, total, data = answer["epoch"], answer["total"], answer["page"]
        while len(data) < total:
            data += self.call(wire.GetTopology, epoch=epoch, offset=len(data))["page"]
        return Topology.decode(data)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.call(wire.ClusterStatus)["status"])
        return result


class ControlCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.raft = {n: (h, _port(h)) for n, h in zip(NAMES, HOSTS, strict=True)}
        self.amp = {n: (h, _port(h)) for n, h in zip(NAMES, HOSTS, strict=True)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.secret_file = root / "cluster-secret"

    def start(self, name: str) -> None:
        host, raft_port = self.raft[name]
        _, amp_port = self.amp[name]
        initial = ",".join(f"{n}={h}:{p}" for n, (h, p) in self.raft.items())
        log = open(self.root / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LAUNCH,
                "--pidfile=",
                "-n",
                "gitstratum-control",
                "--data-dir",
                str(self.root / name),
                "--name",
                name,
                "--initial-cluster",
                initial,
                "--listen",
                f"tcp:{amp_port}:interface={host}",
                "--raft-listen",
                f"tcp:{raft_port}:interface={host}",
                "--cluster-secret-file",
                str(self.secret_file),
                "--heartbeat-window",
                "3",
                "--heartbeat-interval",
                "0.2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=checkout_env(),
        )

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def client(self, name: str, secret: bytes | None) -> Client:
        host, port = self.amp[name]
        return Client(host, port, secret)

    def leader(self, secret: bytes, among: tuple[str, ...] = NAMES) -> str:
        def agreed() -> str | None:
            leaders = set()
            for name in among:
                with self.client(name, secret) as c:
                    leaders.add(c.status()["leader"])
            # only a leader among the asked: the others may still name a dead one
            return leaders.pop() if len(leaders) == 1 and leaders <= set(among) else None

        leader: str = _wait("one leader all agree on", agreed)
        return leader


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ControlCluster]:
    c = ControlCluster(tmp_path)
    # the first node makes the secret; the others are given the same file
    c.start("c1")
    _wait("the cluster secret", c.secret_file.exists)
    for name in NAMES[1:]:
        c.start(name)
    try:
        yield c
    finally:
        c.stop()


def test_three_control_processes_survive_the_leaders_kill(cluster: ControlCluster) -> None:
    """Members join through any node; kill -9 of the leader keeps their topology; it is marked down,
    and on restart it catches up from its Raft log and is marked active again.
    """
    secret = load(str(cluster.secret_file))
    for name in NAMES:
        _wait(f"{name} listening", lambda n=name: cluster.client(n, secret).close() or True)
    leader = cluster.leader(secret)

    # six members join, through every control node (followers forward)
    for i in range(6):
        via = NAMES[i % 3]
        join = Join(f"obj-{i}", ("object",), f"127.0.1.{i + 1}:9000", 0.0)
        with cluster.client(via, secret) as c:
            _wait(
                f"obj-{i} joined", lambda c=c, j=join: c.call(wire.Join, member=encode_command(j))
            )
    with cluster.client(leader, secret) as c:
        before = _wait(
            "six members",
            lambda: _joined(c.topology()) if len(_joined(c.topology())) == 6 else None,
        )
        epoch = c.topology().epoch

    cluster.kill(leader)
    rest = tuple(n for n in NAMES if n != leader)
    new_leader = cluster.leader(secret, rest)
    assert new_leader != leader
    for name in rest:
        with cluster.client(name, secret) as c:
            topology = c.topology()
            assert _joined(topology) == before
            assert topology.epoch == epoch

    # control nodes are members too: the new leader marks the killed one down
    with cluster.client(new_leader, secret) as c:
        _wait(f"{leader} marked down", lambda: _state(c.status(), leader) == "down")

    # a write after the failover, then the killed node catches up on it
    join = Join("obj-late", ("object",), "127.0.1.99:9000", 0.0)
    with cluster.client(new_leader, secret) as c:
        c.call(wire.Join, member=encode_command(join))
    cluster.start(leader)
    _wait(f"{leader} listening", lambda: cluster.client(leader, secret).close() or True)
    with cluster.client(leader, secret) as c:
        _wait(
            "the restarted node to catch up",
            lambda: "obj-late" in _joined(c.topology()) and _joined(c.topology()) > before,
        )
    with cluster.client(new_leader, secret) as c:
        _wait(f"{leader} active again", lambda: _state(c.status(), leader) == "active")


def test_a_client_without_the_secret_is_refused(cluster: ControlCluster) -> None:
    """A client with the wrong secret cannot authenticate; one that skips it gets NOT_AUTHENTICATED."""
    secret = load(str(cluster.secret_file))
    _wait("c1 listening", lambda: cluster.client("c1", secret).close() or True)
    with pytest.raises(Exception, match="AUTHENTICATION_FAILED|closed|secret"):
        cluster.client("c1", b"w" * 32).call(wire.ClusterStatus)
    with cluster.client("c1", None) as c:
        join = Join("intruder", ("object",), "127.0.1.200:9000", 0.0)
        with pytest.raises(Exception, match="prove the cluster secret"):
            c.call(wire.Join, member=encode_command(join))
    with cluster.client("c1", secret) as c:
        assert "intruder" not in _joined(c.topology())


def _joined(topology: Topology) -> frozenset[str]:
    return frozenset(m.id for m in topology.members if not m.id.startswith("c"))


def _state(status: dict[str, Any], name: str) -> str | None:
    states = [n["state"] for n in status["nodes"] if n["name"] == name]
    return states[0] if states else None
