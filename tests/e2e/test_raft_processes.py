"""End to end: three Raft processes over AMP on loopback, killed with SIGKILL and restarted.

Each member is ``python -m gitstratum.testing.raft_process`` (a RaftNode with
the KV store, LMDBRaftLog and AMPTransport), started and killed by
``RaftCluster``. The tests run on the reactor (pytest-twisted) and talk to
the members' client API with Twisted's own AMP client, so every wait is a
Deferred with a deadline, not a blocked thread.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionClosed, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols import amp
from twisted.python.failure import Failure

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
    Refused,
)

pytestmark = pytest.mark.e2e

#: small enough that the killed member's log is compacted away while it is down
SNAPSHOT_EVERY = 20
#: the longest any single call to a member may take before it counts as failed
CALL_TIMEOUT = 2.0
#: what a connection to a member may fail with while members die and come back
UNREACHABLE = (ConnectError, ConnectionClosed, TimeoutError)


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Wait, on the reactor, until ``check()`` holds; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        await sleep(0.02)


@attrs.define
class Members:
    """The group's client API, asynchronously: one AMP connection per member, redialled as needed."""

    cluster: RaftCluster
    connections: dict[NodeId, amp.AMP] = attrs.field(factory=dict)

    async def call(self, node: NodeId, command: type[amp.Command], **arguments: Any) -> Any:
        """*command* on *node*; raises its mapped error, or one of UNREACHABLE."""
        if node not in self.connections:
            endpoint = TCP4ClientEndpoint(
                reactor, "127.0.0.1", self.cluster.members[node].client_port, timeout=2
            )
            self.connections[node] = await connectProtocol(endpoint, amp.AMP())
        connection = self.connections[node]
        try:
            answer = connection.callRemote(command, **arguments)
            return await answer.addTimeout(CALL_TIMEOUT, reactor)  # type: ignore[arg-type]
        except UNREACHABLE:
            self.forget(node)
            raise

    def forget(self, node: NodeId) -> None:
        connection = self.connections.pop(node, None)
        if connection is not None and connection.transport is not None:
            connection.transport.loseConnection()

    def close(self) -> None:
        for node in list(self.connections):
            self.forget(node)

    async def status(self, node: NodeId) -> dict[str, Any] | None:
        """A member's NodeStatus, or None when it does not answer."""
        try:
            return await self.call(node, NodeStatus)
        except UNREACHABLE:
            return None

    async def leader(self, timeout: float = 10.0, among: Sequence[NodeId] | None = None) -> NodeId:
        """The member that says it leads, once one does."""
        found: list[NodeId] = []

        async def one_leads() -> bool:
            for node in among or list(self.cluster.members):
                status = await self.status(node) if self.cluster.alive(node) else None
                if status is not None and status["role"] == "leader":
                    found.append(node)
                    return True
            return False

        await eventually(one_leads, timeout, "a leader election")
        return found[0]

    async def request(
        self, command: type[amp.Command], timeout: float = 10.0, **arguments: Any
    ) -> tuple[NodeId, Any]:
        """*command* on whoever leads, following NotLeader hints; (the node that answered, answer)."""
        deadline = time.monotonic() + timeout
        alive = [n for n in self.cluster.members if self.cluster.alive(n)]
        target = alive[0]
        while True:
            try:
                return target, await self.call(target, command, **arguments)
            except NotLeaderReply as e:
                if e.leader_hint and self.cluster.alive(e.leader_hint):
                    target = e.leader_hint
                    continue
            except (*UNREACHABLE, Refused):
                pass
            assert time.monotonic() < deadline, f"{command.commandName!r} unanswered in {timeout} s"
            alive = [n for n in self.cluster.members if self.cluster.alive(n)]
            target = alive[(alive.index(target) + 1) % len(alive)] if target in alive else alive[0]
            await sleep(0.01)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RaftCluster]:
    group = RaftCluster(tmp_path, snapshot_every=SNAPSHOT_EVERY)
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture
def members(cluster: RaftCluster) -> Iterator[Members]:
    api = Members(cluster)
    yield api
    api.close()


async def put_all(members: Members, items: dict[bytes, bytes]) -> None:
    for key, value in items.items():
        await members.request(KVPut, key=key, value=value)


@pytest_twisted.ensureDeferred
async def test_a_group_elects_commits_survives_kill_9_and_catches_up(
    cluster: RaftCluster, members: Members
) -> None:
    """The issue's real-process must-holds, in one run of one group.

    Three processes elect a leader and commit; after ``kill -9`` of the
    leader the survivors elect another and commit within 2 s, losing no
    acknowledged write; the killed member restarts and catches up through a
    snapshot, because the others compacted past its log while it was down.
    """
    leader = await members.leader(timeout=10)
    assert "elected leader for term" in cluster.log_text(leader)
    acknowledged = {b"k%03d" % i: b"v%d" % i for i in range(25)}
    await put_all(members, acknowledged)
    _, answer = await members.request(KVCas, key=b"cas", new=b"1")
    assert answer["swapped"] is True
    acknowledged[b"cas"] = b"1"

    killed_at = time.monotonic()
    cluster.kill(leader)
    survivors = [n for n in cluster.members if n != leader]
    answered_by, _ = await members.request(KVPut, key=b"after-kill", value=b"yes", timeout=5)
    failover = time.monotonic() - killed_at
    assert failover < 2.0, f"first commit after kill -9 took {failover:.2f} s"
    assert answered_by in survivors
    acknowledged[b"after-kill"] = b"yes"
    new_leader = await members.leader(among=survivors)
    assert "elected leader for term" in cluster.log_text(new_leader)
    for key, value in acknowledged.items():
        assert (await members.request(KVGet, key=key))[1]["value"] == value, key

    more = {b"m%03d" % i: b"w%d" % i for i in range(2 * SNAPSHOT_EVERY)}
    await put_all(members, more)
    acknowledged.update(more)
    status = await members.status(new_leader)
    assert status is not None and status["compactions"] >= 2

    # Starting a process blocks until it answers: off the reactor's thread.
    await deferToThread(cluster.start, leader)
    caught_up: list[dict[str, Any]] = []

    async def restarted_node_caught_up() -> bool:
        back, target = await members.status(leader), await members.status(new_leader)
        assert target is not None
        caught_up[:] = [back] if back is not None else []
        return back is not None and back["applied"] >= target["commit"]

    await eventually(restarted_node_caught_up, 10, "the restarted node's catching up")
    assert caught_up[0]["snapshots_installed"] >= 1, "it caught up without a snapshot"
    for key, value in acknowledged.items():
        assert (await members.call(leader, LocalGet, key=key))["value"] == value, key
    with pytest.raises(NotLeaderReply) as refused:
        await members.call(leader, KVPut, key=b"x", value=b"y")
    assert refused.value.leader_hint in survivors


class RawExchange(Protocol):
    """Sends a payload on connect; fires ``done`` with every byte received once the peer closes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionClosed())) -> None:
        self.done.callback(self.received)


async def raw_exchange(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send *payload* on a raw connection; the bytes received once the other side closed it."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)
    protocol = await connectProtocol(endpoint, RawExchange(payload))
    return await protocol.done.addTimeout(timeout, reactor)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_corrupt_and_incompatible_messages_drop_the_connection_not_the_node(
    cluster: RaftCluster, members: Members
) -> None:
    """Bytes that are not AMP, an unknown command, a stranger, an incompatible codec version, a message before
    the handshake, a broken frame and an undecodable message on a member's raft port: each gets one
    log line and a closed connection; the member keeps running and the group keeps committing."""
    leader = await members.leader(timeout=10)
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
        await raw_exchange(port, payload)  # returns only once the node closed the connection
    assert cluster.alive(victim)
    new_lines = cluster.log_text(victim)[len(before) :]
    assert new_lines.count("Dropping Raft connection from") == len(payloads), new_lines
    await members.request(KVPut, key=b"still", value=b"working")
    status = await members.status(victim)
    assert status is not None and status["role"] == "follower"

    async def victim_applied_it() -> bool:
        answer = await members.call(victim, LocalGet, key=b"still")
        return bool(answer["value"] == b"working")

    await eventually(victim_applied_it, 5, "the write's reaching the victim")
    assert (await members.call(victim, NodeStatus))["leader"] == leader


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
