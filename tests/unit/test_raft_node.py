"""The Raft driver: three RaftNodes on a Clock, an in-memory network and the real LMDB log."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gitstratum.raft import kv
from gitstratum.raft.core import Config
from gitstratum.raft.interfaces import IRaftLog, IRaftTransport
from gitstratum.raft.log import LMDBRaftLog
from gitstratum.raft.node import LeadershipLost, NodeHalted, RaftNode, TransferFailed
from gitstratum.raft.types import (
    Entry,
    HardState,
    Message,
    MessageType,
    NodeId,
    NotLeader,
    Snapshot,
)

TICK = 0.05


@implementer(IRaftTransport)
@attrs.define(eq=False)
class MemoryTransport:
    """One node's end of a ``MemoryNetwork``."""

    network: MemoryNetwork
    node_id: NodeId
    receiver: Callable[[Message], None] | None = None
    unreachable: Callable[[NodeId], None] = lambda node: None

    def send(self, messages: Sequence[Message]) -> None:
        for message in messages:
            self.network.deliver(message)

    def set_receiver(self, receiver: Callable[[Message], None]) -> None:
        self.receiver = receiver

    def set_peers(self, peers: dict[NodeId, str]) -> None:
        pass


@attrs.define(eq=False)
class MemoryNetwork:
    """Delivers each message on the next Clock turn, unless one end is isolated."""

    clock: Clock
    transports: dict[NodeId, MemoryTransport] = attrs.field(factory=dict)
    isolated: set[NodeId] = attrs.field(factory=set)
    #: every (sender, message) handed to the network, in order
    sent: list[Message] = attrs.field(factory=list)

    def transport(self, node: NodeId) -> MemoryTransport:
        self.transports[node] = MemoryTransport(self, node)
        return self.transports[node]

    def deliver(self, message: Message) -> None:
        self.sent.append(message)
        if message.to in self.isolated or message.from_ in self.isolated:
            # As AMPTransport does, say so from inside send().
            self.transports[message.from_].unreachable(message.to)
            return
        target = self.transports.get(message.to)
        if target is not None and target.receiver is not None:
            self.clock.callLater(0, target.receiver, message)


@implementer(IRaftLog)
@attrs.define(eq=False)
class RecordingLog:
    """The real LMDB log, recording each call in a shared event list."""

    inner: LMDBRaftLog
    events: list[tuple[str, Any]]
    fail_sync: bool = False

    def load(self) -> tuple[HardState, Snapshot | None, Sequence[Entry]]:
        return self.inner.load()

    def append(self, entries: Sequence[Entry]) -> None:
        self.events.append(("append", entries[-1].index))
        self.inner.append(entries)

    def set_hard_state(self, hard_state: HardState) -> None:
        self.events.append(("hard_state", hard_state))
        self.inner.set_hard_state(hard_state)

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        self.events.append(("snapshot", snapshot.metadata.index))
        self.inner.apply_snapshot(snapshot)

    def compact(self, snapshot: Snapshot) -> None:
        self.events.append(("compact", snapshot.metadata.index))
        self.inner.compact(snapshot)

    def sync(self) -> None:
        if self.fail_sync:
            raise OSError(28, "No space left on device")
        self.events.append(("sync", None))
        self.inner.sync()

    def close(self) -> None:
        self.inner.close()


@implementer(IRaftTransport)
@attrs.define(eq=False)
class RecordingTransport:
    """A ``MemoryTransport`` that also records each send in the shared event list."""

    inner: MemoryTransport
    events: list[tuple[str, Any]]

    @property
    def unreachable(self) -> Callable[[NodeId], None]:
        return self.inner.unreachable

    @unreachable.setter
    def unreachable(self, hook: Callable[[NodeId], None]) -> None:
        self.inner.unreachable = hook

    def send(self, messages: Sequence[Message]) -> None:
        self.events.append(("send", tuple(messages)))
        self.inner.send(messages)

    def set_receiver(self, receiver: Callable[[Message], None]) -> None:
        self.inner.set_receiver(receiver)

    def set_peers(self, peers: dict[NodeId, str]) -> None:
        self.inner.set_peers(peers)


@attrs.define(eq=False)
class Cluster:
    """RaftNodes on one Clock and MemoryNetwork, each with its LMDB log under ``root``."""

    root: Path
    size: int = 3
    snapshot_every: int = 10_000
    clock: Clock = attrs.field(factory=Clock)
    network: MemoryNetwork = attrs.field(init=False)
    nodes: dict[NodeId, RaftNode] = attrs.field(factory=dict)
    events: dict[NodeId, list[tuple[str, Any]]] = attrs.field(factory=dict)
    logs: dict[NodeId, RecordingLog] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.network = MemoryNetwork(self.clock)
        for node in range(1, self.size + 1):
            self.start(node)

    def start(self, node: NodeId, voters: frozenset[NodeId] | None = None) -> RaftNode:
        """Start (or restart) ``node`` from whatever its log directory holds."""
        events: list[tuple[str, Any]] = []
        log = RecordingLog(LMDBRaftLog(str(self.root / f"node-{node}")), events)
        transport = RecordingTransport(self.network.transport(node), events)
        if voters is None:
            voters = frozenset(range(1, self.size + 1))
        raft = RaftNode(
            Config(id=node, voters=voters),
            log,
            kv.KVStore(),
            transport,
            self.clock,
            random.Random(node),
            tick_interval=TICK,
            snapshot_every=self.snapshot_every,
        )
        raft.startService()
        self.nodes[node], self.events[node], self.logs[node] = raft, events, log
        return raft

    def stop(self, node: NodeId) -> None:
        self.nodes[node].stopService()
        self.network.transports.pop(node, None)
        self.logs[node].close()

    def stop_all(self) -> None:
        for node in list(self.nodes):
            if self.nodes[node].running:
                self.stop(node)

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / TICK)):
            self.clock.advance(TICK)

    def run_until(self, condition: Callable[[], bool], seconds: float = 10.0) -> None:
        for _ in range(round(seconds / TICK)):
            if condition():
                return
            self.clock.advance(TICK)
        assert condition(), f"not reached within {seconds} simulated seconds"

    def leader(self) -> RaftNode:
        self.run_until(lambda: any(n.is_leader for n in self.running()))
        self.run(0.2)  # let the leader commit its no-op everywhere
        (leader,) = [n for n in self.running() if n.is_leader]
        return leader

    def followers(self) -> list[RaftNode]:
        return [n for n in self.running() if not n.is_leader]

    def running(self) -> list[RaftNode]:
        return [n for n in self.nodes.values() if n.running]

    def settle(self, d: defer.Deferred[Any], seconds: float = 5.0) -> Any:
        """Run the clock until ``d`` fires; its result (or raise its failure)."""
        results: list[Any] = []
        d.addBoth(results.append)
        self.run_until(lambda: bool(results), seconds)
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]


def put(key: bytes, value: bytes) -> bytes:
    return kv.encode_command(kv.Put(key, value))


def get(key: bytes) -> bytes:
    return kv.encode_command(kv.Get(key))


def failure_of(d: defer.Deferred[Any]) -> BaseException:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "the Deferred has not failed"
    error = failures[0].value
    assert error is not None
    return error


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    c = Cluster(tmp_path)
    yield c
    c.stop_all()


def test_fakes_provide_their_interfaces(tmp_path: Path) -> None:
    """The in-memory transport and recording log are complete implementations of the seams."""
    network = MemoryNetwork(Clock())
    assert verifyObject(IRaftTransport, network.transport(1))
    log = RecordingLog(LMDBRaftLog(str(tmp_path / "log")), [])
    assert verifyObject(IRaftLog, log)
    log.close()


def test_elects_a_leader_and_proposals_return_their_result(cluster: Cluster) -> None:
    """A 3-node group elects one leader; a proposal fires with the state machine's result everywhere."""
    leader = cluster.leader()
    assert [n.is_leader for n in cluster.running()].count(True) == 1
    assert cluster.settle(leader.propose(put(b"k", b"v1"))) is None
    swapped = cluster.settle(leader.propose(kv.encode_command(kv.Cas(b"k", b"v1", b"v2"))))
    assert swapped is True
    cluster.run(0.2)
    for node in cluster.running():
        assert node.leader_id == leader.config.id
        assert node.term == leader.term
        assert node.state_machine.query(get(b"k")) == b"v2"


def test_a_follower_fails_fast_with_the_leader_hint(cluster: Cluster) -> None:
    """propose and read on a follower fail at once with NotLeader naming the leader."""
    leader = cluster.leader()
    follower = cluster.followers()[0]
    for d in (follower.propose(put(b"k", b"v")), follower.read(get(b"k"))):
        error = failure_of(d)
        assert isinstance(error, NotLeader)
        assert error.leader_hint == leader.config.id


def test_an_empty_proposal_is_refused(cluster: Cluster) -> None:
    """An empty command is refused: empty entries are a new leader's no-op, not application data."""
    leader = cluster.leader()
    assert isinstance(failure_of(leader.propose(b"")), ValueError)


def test_read_returns_the_committed_value(cluster: Cluster) -> None:
    """A ReadIndex read on the leader sees every write acknowledged before it started."""
    leader = cluster.leader()
    assert cluster.settle(leader.read(get(b"k"))) is None
    cluster.settle(leader.propose(put(b"k", b"v")))
    assert cluster.settle(leader.read(get(b"k"))) == b"v"


def test_a_read_on_a_partitioned_leader_never_answers_stale(cluster: Cluster) -> None:
    """A leader cut off from the group cannot confirm a read; it fails with NotLeader when it steps down."""
    leader = cluster.leader()
    cluster.settle(leader.propose(put(b"k", b"old")))
    cluster.network.isolated.add(leader.config.id)
    stale_read = leader.read(get(b"k"))
    lost_write = leader.propose(put(b"k", b"lost?"))
    cluster.run_until(lambda: not leader.is_leader)
    assert isinstance(failure_of(stale_read), LeadershipLost)
    assert isinstance(failure_of(lost_write), NotLeader)
    new_leader = cluster.leader()
    assert new_leader is not leader
    cluster.settle(new_leader.propose(put(b"k", b"new")))
    assert cluster.settle(new_leader.read(get(b"k"))) == b"new"


def test_entries_are_durable_before_any_message_that_depends_on_them(cluster: Cluster) -> None:
    """Persist-before-send: appends and votes are synced before the messages announcing them leave."""
    leader = cluster.leader()
    for i in range(5):
        cluster.settle(leader.propose(put(b"k%d" % i, b"v")))
    checked = 0
    for events in cluster.events.values():
        written_last = synced_last = 0
        written_state = synced_state = HardState()
        for kind, payload in events:
            if kind == "append":
                written_last = payload
            elif kind == "hard_state":
                written_state = payload
            elif kind == "sync":
                synced_last, synced_state = written_last, written_state
            elif kind == "send":
                for message in payload:
                    if message.type is MessageType.APPEND and message.entries:
                        assert message.entries[-1].index <= synced_last
                        checked += 1
                    if message.type is MessageType.APPEND_RESPONSE and not message.reject:
                        assert message.index <= synced_last
                        checked += 1
                    if message.type is MessageType.VOTE_RESPONSE and not message.reject:
                        assert synced_state.vote == message.to
                        assert synced_state.term == message.term
                        checked += 1
    assert checked > 10


def test_proposals_in_one_reactor_turn_share_one_sync(cluster: Cluster) -> None:
    """Batching: fifty proposals made in one turn are appended and synced once, before one send."""
    leader = cluster.leader()
    events = cluster.events[leader.config.id]
    start = len(events)
    last_index = leader.commit_index + 50
    ds = [leader.propose(put(b"k%d" % i, b"v")) for i in range(50)]
    assert events[start:] == []  # nothing is written while the turn is still taking inputs
    cluster.clock.advance(0)
    first_send = next(i for i in range(start, len(events)) if events[i][0] == "send")
    before = events[start:first_send]
    assert [kind for kind, _ in before].count("sync") == 1
    assert [payload for kind, payload in before if kind == "append"] == [last_index]
    results = [cluster.settle(d) for d in ds]
    assert results == [None] * 50


def test_restart_from_the_log_keeps_state(cluster: Cluster) -> None:
    """Stopping every node and starting them from their logs keeps every acknowledged write."""
    leader = cluster.leader()
    for i in range(10):
        cluster.settle(leader.propose(put(b"k%d" % i, b"%d" % i)))
    term = leader.term
    cluster.stop_all()
    for node_id in range(1, 4):
        cluster.start(node_id)
    for restarted in cluster.running():
        assert restarted.term >= term
    leader = cluster.leader()
    for i in range(10):
        assert cluster.settle(leader.read(get(b"k%d" % i))) == b"%d" % i
    cluster.run(0.2)
    for restarted in cluster.running():
        assert restarted.state_machine.query(get(b"k9")) == b"9"


def test_the_log_is_compacted_every_snapshot_every_entries(tmp_path: Path) -> None:
    """After snapshot_every applied entries the node snapshots; a restart restores from it."""
    c = Cluster(tmp_path, snapshot_every=5)
    try:
        leader = c.leader()
        for i in range(12):
            c.settle(leader.propose(put(b"k%d" % i, b"%d" % i)))
        c.run(0.2)
        for node in c.running():
            assert node.compactions >= 2
            assert node.snapshot_index >= 10
            assert any(kind == "compact" for kind, _ in c.events[node.config.id])
        c.stop_all()
        restarted = c.start(1)
        # restored from its own snapshot before anything is re-applied
        assert restarted.applied_index >= 10
        assert restarted.snapshots_installed == 0
        c.clock.advance(0)  # the first drain re-applies the committed entries after it
        assert restarted.applied_index >= 13
        assert restarted.state_machine.query(get(b"k9")) == b"9"
    finally:
        c.stop_all()


def test_a_lagging_follower_catches_up_through_a_snapshot(tmp_path: Path) -> None:
    """A follower cut off while the leader compacts is brought back with InstallSnapshot."""
    c = Cluster(tmp_path, snapshot_every=5)
    try:
        leader = c.leader()
        lagging = c.followers()[0]
        c.network.isolated.add(lagging.config.id)
        for i in range(20):
            c.settle(leader.propose(put(b"k%d" % i, b"%d" % i)))
        assert leader.snapshot_index > lagging.applied_index
        c.network.isolated.clear()
        c.run_until(lambda: lagging.applied_index >= leader.applied_index)
        assert lagging.snapshots_installed >= 1
        assert lagging.state_machine.query(get(b"k19")) == b"19"
    finally:
        c.stop_all()


def test_leadership_transfer(cluster: Cluster) -> None:
    """transfer_leadership fires once the target leads; the old leader then refuses proposals."""
    leader = cluster.leader()
    target = cluster.followers()[0]
    cluster.settle(leader.transfer_leadership(target.config.id))
    assert target.is_leader
    error = failure_of(leader.propose(put(b"k", b"v")))
    assert isinstance(error, NotLeader)
    assert error.leader_hint == target.config.id


def test_a_transfer_to_an_unreachable_node_fails(cluster: Cluster) -> None:
    """A transfer whose target never takes over fails with TransferFailed, and the leader keeps leading."""
    leader = cluster.leader()
    target = cluster.followers()[0]
    cluster.network.isolated.add(target.config.id)
    with pytest.raises(TransferFailed):
        cluster.settle(leader.transfer_leadership(target.config.id))
    assert leader.is_leader
    assert cluster.settle(leader.propose(put(b"k", b"v"))) is None


def test_a_new_node_joins_as_learner_then_voter(cluster: Cluster) -> None:
    """add_learner then add_voter brings an empty node into the group with the whole state."""
    leader = cluster.leader()
    cluster.settle(leader.propose(put(b"k", b"v")))
    newcomer = cluster.start(4, voters=frozenset())
    cluster.settle(leader.add_learner(4))
    cluster.run_until(lambda: newcomer.applied_index >= leader.applied_index)
    cluster.settle(leader.add_voter(4))
    cluster.run(0.2)
    assert newcomer.state_machine.query(get(b"k")) == b"v"
    cluster.settle(leader.remove_node(4))
    assert cluster.settle(leader.propose(put(b"k", b"w"))) is None


def test_a_failed_sync_halts_the_node(cluster: Cluster) -> None:
    """When the log cannot be synced the node stops taking part and fails what it had pending."""
    leader = cluster.leader()
    halted: list[Failure] = []
    leader.on_halt = halted.append
    cluster.logs[leader.config.id].fail_sync = True
    d = leader.propose(put(b"k", b"v"))
    cluster.clock.advance(0)
    assert isinstance(failure_of(d), NodeHalted)
    assert halted and halted[0].check(OSError)
    assert isinstance(failure_of(leader.propose(put(b"k", b"v"))), NodeHalted)
    assert not leader.is_leader
    others = [n for n in cluster.running() if n is not leader]
    cluster.run_until(lambda: any(n.is_leader for n in others))


def watch_core(node: RaftNode, calls: list[str]) -> None:
    """Record every input and output call on ``node``'s core, by name, in ``calls``."""
    core = node._core
    for name in ("tick", "step", "propose", "read_index", "report_unreachable", "ready", "advance"):
        original = getattr(core, name)

        def recorded(*args: Any, _name: str = name, _original: Any = original) -> Any:
            calls.append(_name)
            return _original(*args)

        setattr(core, name, recorded)


def test_transport_reports_from_inside_send_wait_for_advance(tmp_path: Path) -> None:
    """The unreachable hook, called from inside send(), reaches the core only after advance()."""
    c = Cluster(tmp_path)
    calls: dict[NodeId, list[str]] = {}
    for node in c.running():
        watch_core(node, calls.setdefault(node.config.id, []))
    try:
        leader = c.leader()
        c.network.isolated.add(c.followers()[0].config.id)
        for i in range(5):
            assert c.settle(leader.propose(put(b"k%d" % i, b"%d" % i))) is None
    finally:
        c.stop_all()
    assert "report_unreachable" in calls[leader.config.id]
    for node_calls in calls.values():
        in_window = False
        for name in node_calls:
            if name == "advance":
                in_window = False
            else:
                assert not in_window, f"{name} between ready() and advance()"
                in_window = name == "ready"


def test_stopping_fails_pending_requests_and_keeps_the_commit_index(cluster: Cluster) -> None:
    """stopService fails what is pending with LeadershipLost and syncs, so a restart re-applies all."""
    leader = cluster.leader()
    cluster.settle(leader.propose(put(b"k", b"v")))
    leader_id = leader.config.id
    pending = leader.propose(put(b"k", b"w"))
    cluster.stop(leader_id)
    assert isinstance(failure_of(pending), LeadershipLost)
    log = LMDBRaftLog(str(cluster.root / f"node-{leader_id}"))
    try:
        hard_state, _, entries = log.load()
    finally:
        log.close()
    assert [e.data for e in entries][-1] == put(b"k", b"v")  # w never reached the log
    assert hard_state.commit == entries[-1].index


def test_a_command_the_state_machine_refuses_fails_only_its_proposal(cluster: Cluster) -> None:
    """A committed entry the state machine cannot decode fails its proposer; every replica goes on."""
    leader = cluster.leader()
    with pytest.raises(ValueError, match="KV command"):
        cluster.settle(leader.propose(b"\x80\x04\x95 not a command"))
    assert cluster.settle(leader.propose(put(b"k", b"v"))) is None
    cluster.run(0.2)
    for node in cluster.running():
        assert node.applied_index == leader.applied_index
        assert node.state_machine.query(get(b"k")) == b"v"
