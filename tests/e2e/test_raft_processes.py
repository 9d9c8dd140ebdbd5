"""End to end: three Raft processes over AMP on loopback, killed with SIGKILL and restarted.

Each member is ``python -m gitstratum.testing.raft_process`` (a RaftNode with
the KV store, LMDBRaftLog and AMPTransport); the test talks to the client
API with a blocking socket client, so no reactor runs in the test process.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.protocols import amp

from gitstratum.raft.codec import CODEC_VERSION
from gitstratum.raft.transport import Handshake, RaftMessages, pack_frames
from gitstratum.raft.types import NodeId
from gitstratum.testing.raft_process import (
    KVCas,
    KVGet,
    KVPut,
    LocalGet,
    NodeStatus,
    NotLeaderReply,
    RaftCluster,
)

pytestmark = pytest.mark.e2e

#: small enough that the killed member's log is compacted away while it is down
SNAPSHOT_EVERY = 20


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RaftCluster]:
    group = RaftCluster(tmp_path, snapshot_every=SNAPSHOT_EVERY)
    try:
        group.start()
        yield group
    finally:
        group.stop()


def put_all(cluster: RaftCluster, items: dict[bytes, bytes]) -> None:
    for key, value in items.items():
        cluster.request(KVPut, key=key, value=value)


def test_a_group_elects_commits_survives_kill_9_and_catches_up(cluster: RaftCluster) -> None:
    """The issue's real-process must-holds, in one run of one group.

    Three processes elect a leader and commit; after ``kill -9`` of the
    leader the survivors elect another and commit within 2 s, losing no
    acknowledged write; the killed member restarts and catches up through a
    snapshot, because the others compacted past its log while it was down.
    """
    leader = cluster.leader(timeout=10)
    assert "elected leader for term" in cluster.log_text(leader)
    acknowledged = {b"k%03d" % i: b"v%d" % i for i in range(25)}
    put_all(cluster, acknowledged)
    _, answer = cluster.request(KVCas, key=b"cas", new=b"1")
    assert answer["swapped"] is True
    acknowledged[b"cas"] = b"1"

    killed_at = time.monotonic()
    cluster.kill(leader)
    survivors = [n for n in cluster.members if n != leader]
    answered_by, _ = cluster.request(KVPut, key=b"after-kill", value=b"yes", timeout=5)
    failover = time.monotonic() - killed_at
    assert failover < 2.0, f"first commit after kill -9 took {failover:.2f} s"
    assert answered_by in survivors
    acknowledged[b"after-kill"] = b"yes"
    new_leader = cluster.leader(among=survivors)
    assert "elected leader for term" in cluster.log_text(new_leader)
    for key, value in acknowledged.items():
        assert cluster.request(KVGet, key=key)[1]["value"] == value, key

    more = {b"m%03d" % i: b"w%d" % i for i in range(2 * SNAPSHOT_EVERY)}
    put_all(cluster, more)
    acknowledged.update(more)
    status = cluster.status(new_leader)
    assert status is not None and status["compactions"] >= 2

    cluster.start(leader)
    deadline = time.monotonic() + 10
    while True:
        back = cluster.status(leader)
        target = cluster.status(new_leader)
        assert target is not None
        if back is not None and back["applied"] >= target["commit"]:
            break
        assert time.monotonic() < deadline, f"restarted node stuck at {back}"
        time.sleep(0.05)
    assert back["snapshots_installed"] >= 1, "the restarted node caught up without a snapshot"
    with cluster.client(leader) as client:
        for key, value in acknowledged.items():
            assert client.call(LocalGet, key=key)["value"] == value, key
        with pytest.raises(NotLeaderReply) as refused:
            client.call(KVPut, key=b"x", value=b"y")
    assert refused.value.leader_hint in survivors


def raw_exchange(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send ``payload`` to a raw connection and read until the other side closes it."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_corrupt_and_incompatible_messages_drop_the_connection_not_the_node(
    cluster: RaftCluster,
) -> None:
    """Bytes that are not AMP, an unknown command, a stranger, an incompatible codec version, a message before
    the handshake, a broken frame and an undecodable message on a member's raft port: each gets one
    log line and a closed connection; the member keeps running and the group keeps committing."""
    leader = cluster.leader(timeout=10)
    victim = next(n for n in cluster.members if n != leader)
    port = cluster.members[victim].raft_port
    before = cluster.log_text(victim)
    unknown = amp.AmpBox(_command=b"NoSuchCommand", _ask=b"1", junk=b"x")
    payloads = [
        b"\xff\xff" + bytes(range(256)) * 4,  # not AMP at all
        unknown.serialize(),
        *corrupt_raft_payloads(victim, impostor=leader),
    ]
    for payload in payloads:
        raw_exchange(port, payload)  # returns only once the node closed the connection
    assert cluster.alive(victim)
    new_lines = cluster.log_text(victim)[len(before) :]
    assert new_lines.count("Dropping Raft connection from") == len(payloads), new_lines
    cluster.request(KVPut, key=b"still", value=b"working")
    status = cluster.status(victim)
    assert status is not None and status["role"] == "follower"
    with cluster.client(victim) as client:
        deadline = time.monotonic() + 5
        while client.call(LocalGet, key=b"still")["value"] != b"working":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.call(NodeStatus)["leader"] == leader


def corrupt_raft_payloads(victim: NodeId, impostor: NodeId) -> list[bytes]:
    """The Raft transport's own commands carrying what a node must refuse.

    The broken frames come after a valid handshake claiming to be *impostor*
    (a member), so they reach the frame and codec checks.
    """

    def hello(sender: NodeId) -> bytes:
        return amp.AmpBox(
            _command=Handshake.commandName,
            _ask=b"1",
            version=str(CODEC_VERSION).encode(),
            sender=str(sender).encode(),
            receiver=str(victim).encode(),
        ).serialize()

    def messages(frames: bytes) -> bytes:
        return (
            hello(impostor)
            + amp.AmpBox(_command=RaftMessages.commandName, frames=frames).serialize()
        )

    return [
        hello(99),  # not a member
        amp.AmpBox(  # a future codec version
            _command=Handshake.commandName,
            _ask=b"1",
            version=str(CODEC_VERSION + 1).encode(),
            sender=b"99",
            receiver=str(victim).encode(),
        ).serialize(),
        # a message before the handshake
        amp.AmpBox(_command=RaftMessages.commandName, frames=b"x").serialize(),
        messages(b"\x00\x01"),  # a truncated frame
        messages(pack_frames([(0, b"\x7fnot a raft message")])[0]),  # frames fine, codec not
    ]
