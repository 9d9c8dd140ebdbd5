"""A deterministic simulator that drives clusters of pure Raft cores through faults and checks them.

``python -m gitstratum.raft.simulate --seed S --seeds N --nodes 3|5 [--steps K]``
runs seeds S..S+N-1.  Each seed is one ``random.Random(seed)`` driving
everything: the network (drop, delay, reorder, duplication, symmetric and
asymmetric partitions), each node's disk (writes are lost at a crash unless
synced), crashes and restarts, a membership cycle (a voter removed, then
re-added with an empty disk as a learner and then as a voter), compaction
under load (so lagging nodes get InstallSnapshot), leadership transfers, and
a client workload of put, get and compare-and-swap on a few keys.

Each node's driver follows etcd's order: persist (and sync when
``must_sync``), send, apply, advance.  After every Ready the simulator
checks Election Safety, Leader Append-Only, Log Matching, Leader
Completeness and State Machine Safety; at the end the clients' history must
be linearizable (``gitstratum.raft.linearizability``).

It prints one summary line.  On a violation it prints the seed, the
violation and the last events, and exits with status 1.
"""

from __future__ import annotations

import collections
import random
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import attrs
from twisted.python import usage
from zope.interface import implementer

from gitstratum import cmdline
from gitstratum.raft.core import Config, RaftCore
from gitstratum.raft.interfaces import IRaftLog
from gitstratum.raft.kv import Cas, Command, Get, KVStore, Put, Result, encode_command
from gitstratum.raft.linearizability import Operation, check
from gitstratum.raft.types import (
    NONE,
    CompactedError,
    ConfChange,
    ConfChangeType,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    NodeId,
    NotLeader,
    ProposalDropped,
    Ready,
    Role,
    Snapshot,
)

__all__ = [
    "FAULT_KINDS",
    "BROKEN_MODES",
    "DEFAULT_STEPS",
    "SeedResult",
    "run_seed",
    "Options",
    "main",
]

#: every kind of fault the simulator injects, as counted in ``SeedResult.faults``
FAULT_KINDS = (
    "drop",
    "duplicate",
    "delay",
    "reorder",
    "partition",
    "asymmetric_partition",
    "crash",
    "lost_unsynced",
    "membership",
    "compaction",
    "snapshot",
    "transfer",
)

#: deliberate bugs, for the tests only: ``stale_reads`` lets any node answer
#: a get from its own state machine without ReadIndex; ``unsynced`` makes
#: the drivers ignore ``must_sync``, so a crash loses acknowledged writes
BROKEN_MODES = ("stale_reads", "unsynced")

DEFAULT_STEPS = 600
PROG = "python -m gitstratum.raft.simulate"
TRACE_LENGTH = 40

ELECTION_TICK = 10
HEARTBEAT_TICK = 2
#: entries a node keeps past its snapshot before it compacts
COMPACT_EVERY = 24
#: steps a client waits for an answer before it gives up (the op stays open)
CLIENT_TIMEOUT = 60
CLIENTS = 3
KEYS = (b"x", b"y", b"z")


class Violation(Exception):
    """A safety property does not hold; the message says which and where."""


# -- the disk ---------------------------------------------------------------------------------


@implementer(IRaftLog)
class SimDisk:
    """An in-memory ``IRaftLog`` with a write-back cache: ``sync`` makes writes durable, a crash keeps a prefix."""

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []  # durable entries after the snapshot
        self._pending: list[tuple[str, object]] = []

    # IRaftLog
    def load(self) -> tuple[HardState, Snapshot | None, Sequence[Entry]]:
        return self.hard_state, self.snapshot, tuple(self.entries)

    def append(self, entries: Sequence[Entry]) -> None:
        if entries:
            self._pending.append(("append", tuple(entries)))

    def set_hard_state(self, hard_state: HardState) -> None:
        self._pending.append(("hard_state", hard_state))

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        self._pending.append(("apply_snapshot", snapshot))

    def compact(self, snapshot: Snapshot) -> None:
        self._pending.append(("compact", snapshot))

    def sync(self) -> None:
        for write in self._pending:
            self._write(write)
        self._pending.clear()

    def close(self) -> None:
        pass

    # the simulator's side
    def crash(self, rng: random.Random, keep_nothing: bool) -> int:
        """Lose the unsynced writes but a random prefix (a torn write-back); return how many were lost."""
        kept = 0 if keep_nothing else rng.randint(0, len(self._pending))
        for write in self._pending[:kept]:
            self._write(write)
        lost = len(self._pending) - kept
        self._pending.clear()
        return lost

    def _snapshot_index(self) -> int:
        return self.snapshot.metadata.index if self.snapshot is not None else 0

    def _write(self, write: tuple[str, object]) -> None:
        kind, value = write
        if kind == "append":
            assert isinstance(value, tuple)
            first = value[0].index
            offset = first - self._snapshot_index() - 1
            if offset < 0:
                value = value[-offset:]
                offset = 0
            if offset > len(self.entries):
                raise Violation(
                    f"disk: append at {first} leaves a gap after {self._snapshot_index() + len(self.entries)}"
                )
            del self.entries[offset:]
            self.entries.extend(value)
        elif kind == "hard_state":
            assert isinstance(value, HardState)
            self.hard_state = value
        else:
            assert isinstance(value, Snapshot)
            index = value.metadata.index
            if index <= self._snapshot_index():
                return
            old_first = self._snapshot_index() + 1
            keep = [e for e in self.entries if e.index > index]
            if kind == "apply_snapshot":
                # A received snapshot keeps the tail only if the log agrees with it at its index.
                at = index - old_first
                if not (
                    0 <= at < len(self.entries) and self.entries[at].term == value.metadata.term
                ):
                    keep = []
            self.snapshot = value
            self.entries = keep


# -- the network ------------------------------------------------------------------------------


@attrs.define
class _Network:
    """Messages in flight, with per-link delays; partitions block delivery on directed links."""

    rng: random.Random
    faults: collections.Counter[str]
    drop_rate: float = 0.02
    duplicate_rate: float = 0.02
    delay_rate: float = 0.03
    blocked: set[tuple[NodeId, NodeId]] = attrs.field(factory=set)
    queue: list[tuple[int, int, Message]] = attrs.field(factory=list)
    seq: int = 0
    # the highest send sequence delivered per link, to count reordering
    last_delivered: dict[tuple[NodeId, NodeId], int] = attrs.field(factory=dict)
    # links a message could not cross, for the senders' report_unreachable
    unreachable: list[tuple[NodeId, NodeId]] = attrs.field(factory=list)

    def send(self, now: int, messages: Sequence[Message]) -> None:
        rng = self.rng
        for message in messages:
            if rng.random() < self.drop_rate:
                self.faults["drop"] += 1
                continue
            copies = 1
            if rng.random() < self.duplicate_rate:
                self.faults["duplicate"] += 1
                copies = 2
            for _ in range(copies):
                delay = 1 + rng.randrange(3)
                if rng.random() < self.delay_rate:
                    self.faults["delay"] += 1
                    delay += rng.randrange(5, 25)
                self.seq += 1
                self.queue.append((now + delay, self.seq, message))

    def due(self, now: int) -> list[Message]:
        """Take the messages due by ``now`` in delivery order, dropping those on blocked links."""
        if not self.queue:
            return []
        ready = [item for item in self.queue if item[0] <= now]
        if not ready:
            return []
        self.queue = [item for item in self.queue if item[0] > now]
        ready.sort()
        out = []
        for _, seq, message in ready:
            link = (message.from_, message.to)
            if link in self.blocked:
                self.unreachable.append(link)
                continue
            if seq < self.last_delivered.get(link, 0):
                self.faults["reorder"] += 1
            else:
                self.last_delivered[link] = seq
            out.append(message)
        return out


# -- clients and the history ------------------------------------------------------------------


@attrs.define
class _PendingOp:
    client: int
    call_time: int
    command: Command
    via_log: bool
    # where it was last submitted: (node, incarnation, term, index) for a
    # proposal, (node, incarnation, context) for a read
    at: tuple[int, ...] | None = None
    deadline: int = 0


@attrs.define
class _Client:
    id: int
    leader_guess: NodeId = NONE
    op: _PendingOp | None = None
    retry_at: int = 0
    last_seen: dict[bytes, bytes | None] = attrs.field(factory=dict)


# -- a node and its driver --------------------------------------------------------------------


@attrs.define
class _Node:
    id: NodeId
    config: Config
    disk: SimDisk
    incarnation: int = 0
    core: RaftCore | None = None
    store: KVStore = attrs.field(factory=KVStore)
    applied: int = 0
    read_states: list[tuple[int, bytes]] = attrs.field(factory=list)
    #: removed from the cluster (not crashed): the simulator will not restart it
    stopped: bool = False
    restart_at: int = 0
    # Leader Append-Only: (term, last index) of what it last persisted while leading
    led: tuple[int, int] = (0, 0)

    @property
    def up(self) -> bool:
        return self.core is not None


# -- the simulation ---------------------------------------------------------------------------


@attrs.frozen
class SeedResult:
    """What one seed did and found."""

    seed: int
    nodes: int
    steps: int
    operations: int
    faults: dict[str, int]
    violations: tuple[str, ...]
    trace: tuple[str, ...]
    #: leaders elected, entries committed, ops that never returned (for tuning and tests)
    elections: int = 0
    committed: int = 0
    open_operations: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations


class _Simulation:
    def __init__(
        self, seed: int, nodes: int, steps: int, broken: str | None, joiner_voters: str
    ) -> None:
        if broken is not None and broken not in BROKEN_MODES:
            raise ValueError(f"unknown broken mode {broken!r}")
        self.seed = seed
        self.rng = random.Random(seed)
        self.steps = steps
        self.broken = broken
        self.joiner_voters = joiner_voters
        self.now = 0
        self.clock = 0  # the history's event counter: strictly increasing call/return times
        self.faults: collections.Counter[str] = collections.Counter(
            {kind: 0 for kind in FAULT_KINDS}
        )
        self.trace: collections.deque[tuple[int, str]] = collections.deque(maxlen=TRACE_LENGTH)
        self.network = _Network(self.rng, self.faults)
        self.bootstrap = frozenset(range(1, nodes + 1))
        self.nodes: dict[NodeId, _Node] = {}
        for node_id in sorted(self.bootstrap):
            node = _Node(
                node_id,
                Config(
                    id=node_id,
                    voters=self.bootstrap,
                    election_tick=ELECTION_TICK,
                    heartbeat_tick=HEARTBEAT_TICK,
                ),
                SimDisk(),
            )
            self.nodes[node_id] = node
            self._start(node)
        self.clients = [_Client(i) for i in range(CLIENTS)]
        self.history: list[Operation] = []
        self.operations = 0
        # safety bookkeeping
        self.leader_of_term: dict[int, NodeId] = {}
        self.entry_ids: dict[tuple[int, int], tuple[int, bytes, int]] = {}
        self.applied_entries: dict[int, tuple[int, int, bytes]] = {}
        self.committed_upto = 0
        self.commit_term: dict[int, int] = {}
        self.entry_term: dict[int, int] = {}
        self.leaders_checked: set[tuple[NodeId, int]] = set()
        # fault schedule
        self.partition_until = 0
        self.lossy_until = 0
        self.membership: _MembershipCycle | None = None
        self.membership_start = self.rng.randrange(steps // 8, max(steps // 8 + 1, steps // 3))
        self.read_seq = 0
        self.elections = 0

    # -- helpers

    def log(self, text: str) -> None:
        self.trace.append((self.now, text))

    def next_time(self) -> int:
        self.clock += 1
        return self.clock

    def _start(self, node: _Node) -> None:
        hard_state, snapshot, entries = node.disk.load()
        rng = random.Random(self.rng.getrandbits(64))
        node.core = RaftCore(
            node.config, rng, hard_state=hard_state, snapshot=snapshot, entries=entries
        )
        node.incarnation += 1
        node.store = KVStore()
        node.applied = 0
        node.read_states = []
        node.led = (0, 0)
        if snapshot is not None:
            node.store.restore(snapshot.data)
            node.applied = snapshot.metadata.index

    def live(self) -> Iterator[_Node]:
        return (node for node in self.nodes.values() if node.core is not None)

    def leader(self) -> _Node | None:
        best = None
        for node in self.live():
            assert node.core is not None
            if node.core.role is Role.LEADER and (best is None or node.core.term > best.core.term):  # type: ignore[union-attr]
                best = node
        return best

    # -- the driver loop: persist, send, apply, advance

    def process(self, node: _Node) -> None:
        core = node.core
        while core is not None and core.has_ready():
            ready = core.ready()
            if ready.soft_state is not None:
                soft = ready.soft_state
                self.log(
                    f"node {node.id}: {soft.role.value}, term {core.term}, leader {soft.leader}"
                )
            self.check_ready(node, ready)
            if ready.snapshot is not None:
                node.disk.apply_snapshot(ready.snapshot)
            if ready.entries:
                node.disk.append(ready.entries)
            if ready.hard_state is not None:
                node.disk.set_hard_state(ready.hard_state)
            if ready.must_sync and self.broken != "unsynced":
                node.disk.sync()
            self.network.send(self.now, ready.messages)
            if ready.snapshot is not None:
                node.store.restore(ready.snapshot.data)
                node.applied = ready.snapshot.metadata.index
                self.log(f"node {node.id} installed snapshot at {node.applied}")
            for entry in ready.committed_entries:
                self.apply(node, entry)
            node.read_states.extend((rs.index, rs.context) for rs in ready.read_states)
            self.answer_reads(node)
            core.advance(ready)
            self.check_node(node)
        self.maybe_compact(node)

    def apply(self, node: _Node, entry: Entry) -> None:
        seen = self.applied_entries.get(entry.index)
        mine = (entry.term, int(entry.type), entry.data)
        if seen is None:
            self.applied_entries[entry.index] = mine
        elif seen != mine:
            raise Violation(
                f"State Machine Safety: node {node.id} applied {mine[:2]} at index {entry.index}, another node applied {seen[:2]}"
            )
        if entry.index <= node.applied:
            raise Violation(
                f"node {node.id} applied index {entry.index} again (applied {node.applied})"
            )
        node.applied = entry.index
        result: Result = None
        if entry.type == EntryType.CONF_CHANGE:
            change = ConfChange.decode(entry.data)
            self.log(f"node {node.id} applied {change.type.name} {change.node_id} at {entry.index}")
        elif entry.data:
            result = node.store.apply(entry.index, entry.data)
        for client in self.clients:
            op = client.op
            if op is None or op.at is None or len(op.at) != 4:
                continue
            at_node, incarnation, term, index = op.at
            if at_node != node.id or incarnation != node.incarnation or index != entry.index:
                continue
            if term == entry.term:
                self.complete(client, result)
            else:
                # Another entry took our index: ours can never commit, so it is safe to resubmit.
                self.log(f"client {client.id}: entry {index} overwritten, retrying")
                op.at = None
                client.retry_at = self.now

    def answer_reads(self, node: _Node) -> None:
        if not node.read_states:
            return
        remaining = []
        for index, context in node.read_states:
            if index > node.applied:
                remaining.append((index, context))
                continue
            for client in self.clients:
                op = client.op
                if op is not None and op.at == (
                    node.id,
                    node.incarnation,
                    int.from_bytes(context, "big"),
                ):
                    self.complete(client, node.store.query(encode_command(op.command)))
        node.read_states = remaining

    def maybe_compact(self, node: _Node) -> None:
        core = node.core
        if core is None or core.applied_index - core.first_index < COMPACT_EVERY:
            return
        if node.applied != core.applied_index:
            return
        snapshot = core.compact(core.applied_index, node.store.snapshot())
        # Not synced here: losing it in a crash only leaves a longer log.
        node.disk.compact(snapshot)
        self.faults["compaction"] += 1

    # -- safety checks

    def check_ready(self, node: _Node, ready: Ready) -> None:
        """Log Matching and Leader Append-Only, on the entries a node is about to persist."""
        core = node.core
        assert core is not None
        if ready.entries:
            first = ready.entries[0].index
            lead_term, lead_last = node.led
            if core.role is Role.LEADER and core.term == lead_term and first <= lead_last:
                raise Violation(
                    f"Leader Append-Only: leader {node.id} (term {core.term}) rewrites its log from {first}, it had {lead_last}"
                )
            try:
                prev_term = core.term_at(first - 1) if first > 1 else 0
            except CompactedError:
                prev_term = -1
            for entry in ready.entries:
                key = (entry.index, entry.term)
                mine = (int(entry.type), entry.data, prev_term)
                seen = self.entry_ids.get(key)
                if seen is None:
                    self.entry_ids[key] = mine
                elif seen[:2] != mine[:2] or (
                    prev_term >= 0 and seen[2] >= 0 and seen[2] != prev_term
                ):
                    raise Violation(
                        f"Log Matching: node {node.id} has a different entry (or predecessor) at index {entry.index} term {entry.term}"
                    )
                elif seen[2] < 0 and prev_term >= 0:
                    self.entry_ids[key] = mine
                prev_term = entry.term
        if ready.snapshot is not None:
            meta = ready.snapshot.metadata
            if (
                meta.index <= self.committed_upto
                and self.entry_term.get(meta.index, meta.term) != meta.term
            ):
                raise Violation(
                    f"node {node.id} got a snapshot at {meta.index} term {meta.term} disagreeing with the committed log"
                )

    def check_election(self, node: _Node) -> None:
        """Election Safety: at most one leader per term.

        Checked after every input as well as every Ready, so a leadership
        that ends at the next message of the same step is not missed.
        """
        core = node.core
        if core is None or core.role is not Role.LEADER:
            return
        holder = self.leader_of_term.setdefault(core.term, node.id)
        if holder != node.id:
            raise Violation(
                f"Election Safety: nodes {holder} and {node.id} both led term {core.term}"
            )

    def check_node(self, node: _Node) -> None:
        """Election Safety, Leader Append-Only and Leader Completeness, after each Ready."""
        core = node.core
        assert core is not None
        term = core.term
        if core.role is Role.LEADER:
            self.check_election(node)
            lead_term, lead_last = node.led
            if lead_term == term and core.last_index < lead_last:
                raise Violation(
                    f"Leader Append-Only: leader {node.id} (term {term}) shrank its log from {lead_last} to {core.last_index}"
                )
            node.led = (term, core.last_index)
            if (node.id, term) not in self.leaders_checked:
                self.leaders_checked.add((node.id, term))
                self.elections += 1
                self.log(f"node {node.id} leads term {term}")
                for index in range(max(core.first_index - 1, 1), self.committed_upto + 1):
                    if self.commit_term.get(index, term) < term:
                        self.check_has(node, index, "elected")
        commit = core.commit_index
        if commit > self.committed_upto:
            for index in range(self.committed_upto + 1, commit + 1):
                self.commit_term[index] = term
                try:
                    self.entry_term[index] = core.term_at(index)
                except CompactedError:
                    pass
            start = self.committed_upto + 1
            self.committed_upto = commit
            for other in self.live():
                other_core = other.core
                assert other_core is not None
                if other_core.role is Role.LEADER and other_core.term > term:
                    for index in range(start, commit + 1):
                        self.check_has(other, index, "already leading")

    def check_has(self, node: _Node, index: int, when: str) -> None:
        core = node.core
        assert core is not None
        if index < core.first_index - 1:
            return  # compacted: it was committed, so its snapshot holds it
        expected = self.entry_term.get(index)
        if expected is None:
            return
        try:
            have = core.term_at(index) if index <= core.last_index else None
        except CompactedError:
            return
        if have != expected:
            raise Violation(
                f"Leader Completeness: leader {node.id} ({when}, term {core.term}) has term {have} at index {index}, "
                f"committed in term {self.commit_term[index]} with term {expected}"
            )

    # -- the client workload

    def complete(self, client: _Client, output: Result) -> None:
        op = client.op
        assert op is not None
        self.history.append(
            Operation(client.id, op.call_time, self.next_time(), op.command, output)
        )
        key = op.command.key
        if isinstance(op.command, Get):
            client.last_seen[key] = output  # type: ignore[assignment]
        elif isinstance(op.command, Put):
            client.last_seen[key] = op.command.value
        elif output:
            client.last_seen[key] = op.command.new
        self.log(f"client {client.id}: {_show(op.command)} -> {output!r}")
        client.op = None

    def abandon(self, client: _Client, why: str) -> None:
        op = client.op
        assert op is not None
        self.history.append(Operation(client.id, op.call_time, None, op.command))
        self.log(f"client {client.id}: {_show(op.command)} -> unknown ({why})")
        client.op = None

    def new_op(self, client: _Client) -> _PendingOp:
        rng = self.rng
        key = rng.choice(KEYS)
        roll = rng.random()
        self.operations += 1
        value = b"%d" % self.operations
        command: Command
        if roll < 0.35:
            command = Put(key, value)
        elif roll < 0.75:
            command = Get(key)
        else:
            command = Cas(
                key,
                client.last_seen.get(key) if rng.random() < 0.8 else rng.choice([None, b"1"]),
                value,
            )
        via_log = isinstance(command, Get) and rng.random() < 0.2
        op = _PendingOp(
            client.id, self.next_time(), command, via_log or not isinstance(command, Get)
        )
        self.log(f"client {client.id}: call {_show(command)}")
        return op

    def run_clients(self) -> None:
        rng = self.rng
        for client in self.clients:
            op = client.op
            if op is not None and op.at is not None:
                if self.now >= op.deadline:
                    self.abandon(client, "timed out")
                continue
            if op is None:
                if rng.random() < 0.3:
                    client.op = self.new_op(client)
                    op = client.op
                else:
                    continue
            elif self.now < client.retry_at:
                continue
            self.submit(client, op)

    def submit(self, client: _Client, op: _PendingOp) -> None:
        rng = self.rng
        candidates = [n for n in self.live()]
        if not candidates:
            client.retry_at = self.now + 5
            return
        target = self.nodes.get(client.leader_guess)
        if target is None or not target.up or rng.random() < 0.1:
            target = rng.choice(candidates)
        core = target.core
        assert core is not None
        command = op.command
        if self.broken == "stale_reads" and isinstance(command, Get):
            self.complete(client, target.store.query(encode_command(command)))
            return
        try:
            if op.via_log:
                term, index = core.propose(encode_command(command))
                op.at = (target.id, target.incarnation, term, index)
            else:
                self.read_seq += 1
                core.read_index(self.read_seq.to_bytes(8, "big"))
                op.at = (target.id, target.incarnation, self.read_seq)
        except NotLeader as e:
            client.leader_guess = e.leader_hint
            client.retry_at = self.now + 1 + rng.randrange(3)
            return
        except ProposalDropped:
            client.retry_at = self.now + 2 + rng.randrange(5)
            return
        client.leader_guess = target.id
        op.deadline = self.now + CLIENT_TIMEOUT
        self.process(target)

    # -- faults

    def crash(self, node: _Node, why: str) -> None:
        lost = node.disk.crash(self.rng, keep_nothing=self.broken == "unsynced")
        if lost:
            self.faults["lost_unsynced"] += lost
        node.core = None
        node.read_states = []
        for client in self.clients:
            op = client.op
            if op is not None and op.at is not None and op.at[0] == node.id:
                self.abandon(client, f"node {node.id} {why}")
        self.log(f"node {node.id} {why} (lost {lost} unsynced writes)")

    def inject_faults(self) -> None:
        rng = self.rng
        now = self.now
        net = self.network
        quorum_room = (len(self.bootstrap) - 1) // 2
        # crashes and restarts
        for node in self.nodes.values():
            if not node.up and not node.stopped and now >= node.restart_at:
                self._start(node)
                self.log(f"node {node.id} restarted")
        down = sum(1 for node in self.nodes.values() if not node.up)
        # The unsynced bug only shows when nodes crash often enough to forget what they acknowledged.
        crash_rate = 0.05 if self.broken == "unsynced" else 0.006
        if down < quorum_room and rng.random() < crash_rate:
            victim = rng.choice([n for n in self.nodes.values() if n.up])
            self.crash(victim, "crashed")
            victim.restart_at = now + rng.randrange(5, 60)
            self.faults["crash"] += 1
        # partitions
        if net.blocked and now >= self.partition_until:
            net.blocked.clear()
            self.log("partition healed")
        elif not net.blocked and rng.random() < 0.006:
            ids = sorted(self.nodes)
            rng.shuffle(ids)
            cut = rng.randrange(1, len(ids))
            side_a, side_b = ids[:cut], ids[cut:]
            if rng.random() < 0.5:
                net.blocked = {(a, b) for a in side_a for b in side_b} | {
                    (b, a) for a in side_a for b in side_b
                }
                self.faults["partition"] += 1
                self.log(f"partition {sorted(side_a)} | {sorted(side_b)}")
            else:
                net.blocked = {(a, b) for a in side_a for b in side_b}
                self.faults["asymmetric_partition"] += 1
                self.log(f"one-way partition {sorted(side_a)} -/-> {sorted(side_b)}")
            self.partition_until = now + rng.randrange(10, 80)
        # lossy phases
        if now >= self.lossy_until:
            net.drop_rate = 0.02
            if rng.random() < 0.004:
                net.drop_rate = 0.3
                self.lossy_until = now + rng.randrange(10, 40)
                self.log("lossy network")
        # leadership transfer
        if rng.random() < 0.004:
            leader = self.leader()
            if leader is not None and leader.core is not None:
                voters = sorted(leader.core.conf_state.voters - {leader.id})
                if voters:
                    target = rng.choice(voters)
                    try:
                        leader.core.transfer_leader(target)
                    except (NotLeader, ValueError) as e:
                        self.log(f"transfer to {target} refused: {e}")
                    else:
                        self.faults["transfer"] += 1
                        self.log(f"leader {leader.id} transfers to {target}")
                        self.process(leader)
        # the membership cycle
        if self.membership is None and now >= self.membership_start:
            self.membership = _MembershipCycle(self)
        if self.membership is not None and not self.membership.done:
            self.membership.step()

    # -- the main loop

    def run(self) -> SeedResult:
        violations: list[str] = []
        try:
            for step in range(self.steps):
                self.now = step
                self.inject_faults()
                for message in self.network.due(step):
                    node = self.nodes[message.to]
                    if node.core is None:
                        continue
                    if message.type == MessageType.SNAPSHOT:
                        self.faults["snapshot"] += 1
                        self.log(
                            f"snapshot {message.from_}->{message.to} at {message.snapshot.metadata.index if message.snapshot else '?'}"
                        )
                    node.core.step(message)
                    self.check_election(node)
                for sender, peer in self.network.unreachable:
                    # A transport notices only some failed sends.
                    sender_core = self.nodes[sender].core
                    if sender_core is not None and self.rng.random() < 0.2:
                        sender_core.report_unreachable(peer)
                self.network.unreachable.clear()
                for node in self.nodes.values():
                    # Clocks drift: now and then a node misses a tick.
                    if node.core is not None and self.rng.random() >= 0.05:
                        node.core.tick()
                        self.check_election(node)
                for node in self.nodes.values():
                    self.process(node)
                self.run_clients()
            # Whatever is still outstanding may or may not have taken effect.
            for client in self.clients:
                if client.op is not None:
                    self.abandon(client, "end of run")
            result = check(self.history)
            if not result.ok:
                violations.append("history is not linearizable: " + result.explanation)
        except Violation as e:
            violations.append(str(e))
        except Exception as e:  # noqa: BLE001 - reported with the seed, not hidden
            where = traceback.extract_tb(e.__traceback__)[-1]
            violations.append(
                f"unexpected {type(e).__name__} at {where.filename}:{where.lineno}: {e}"
            )
        return SeedResult(
            seed=self.seed,
            nodes=len(self.bootstrap),
            steps=self.steps,
            operations=len(self.history),
            faults={kind: self.faults[kind] for kind in FAULT_KINDS},
            violations=tuple(violations),
            trace=tuple(f"step {step}: {text}" for step, text in self.trace),
            elections=self.elections,
            committed=self.committed_upto,
            open_operations=sum(1 for op in self.history if op.return_time is None),
        )


class _MembershipCycle:
    """Remove a voter, wait until every member has applied that, then re-add it empty as a learner and then a voter.

    The wait matters: a node that comes back with an empty disk under the same
    id could otherwise vote for a stale candidate that still counts it as a
    voter, which no Raft can tolerate (real deployments give a new id).
    """

    def __init__(self, sim: _Simulation) -> None:
        self.sim = sim
        self.done = False
        self.phase = "remove"
        self.target: NodeId = NONE
        self.pending: tuple[int, int] | None = None
        self.pending_since = 0
        self.removed_at = 0
        self.caught_up_wait = 0

    def _propose(self, change: ConfChange) -> bool:
        """Propose at the leader; True once the entry is committed."""
        sim = self.sim
        if self.pending is not None:
            term, index = self.pending
            if sim.entry_term.get(index) is not None and index <= sim.committed_upto:
                if term < 0 or sim.entry_term[index] == term:
                    self.pending = None
                    sim.faults["membership"] += 1
                    sim.log(f"membership: {change.type.name} {change.node_id} committed at {index}")
                    return True
                self.pending = None
            elif sim.now - self.pending_since > 100:
                self.pending = None
            return False
        leader = sim.leader()
        if leader is None or leader.core is None:
            return False
        try:
            self.pending = leader.core.propose_conf_change(change)
        except (NotLeader, ProposalDropped):
            return False
        except ValueError as e:
            # An earlier proposal we gave up on made it into the log after
            # all: done once everything the leader has is committed.
            sim.log(
                f"membership: leader {leader.id} refuses {change.type.name} {change.node_id}: {e}"
            )
            self.pending = (-1, leader.core.last_index)
            self.pending_since = sim.now
            return False
        self.pending_since = sim.now
        sim.log(
            f"membership: leader {leader.id} proposes {change.type.name} {change.node_id} at {self.pending[1]}"
        )
        sim.process(leader)
        return False

    def step(self) -> None:
        sim = self.sim
        if self.phase == "remove":
            if self.target == NONE:
                leader = sim.leader()
                if leader is None or leader.core is None or len(leader.core.conf_state.voters) < 3:
                    return
                self.target = sim.rng.choice(sorted(leader.core.conf_state.voters))
            if self._propose(ConfChange(ConfChangeType.REMOVE_NODE, self.target)):
                self.removed_at = sim.committed_upto
                node = sim.nodes[self.target]
                if node.up:
                    sim.crash(node, "stopped (removed)")
                node.stopped = True
                self.phase = "drain"
        elif self.phase == "drain":
            members = [n for n in sim.nodes.values() if n.id != self.target]
            if all(n.up and n.applied >= self.removed_at for n in members):
                node = sim.nodes[self.target]
                node.disk = SimDisk()
                voters = sim.bootstrap if sim.joiner_voters == "bootstrap" else frozenset()
                node.config = Config(
                    id=node.id,
                    voters=voters,
                    election_tick=ELECTION_TICK,
                    heartbeat_tick=HEARTBEAT_TICK,
                )
                node.stopped = False
                sim._start(node)
                sim.log(f"membership: node {node.id} starts again with an empty disk")
                self.phase = "learner"
        elif self.phase == "learner":
            if self._propose(ConfChange(ConfChangeType.ADD_LEARNER, self.target)):
                self.phase = "catch_up"
                self.caught_up_wait = sim.now + 30
        elif self.phase == "catch_up":
            node = sim.nodes[self.target]
            if sim.now >= self.caught_up_wait and (
                not node.up or node.applied >= sim.committed_upto - 5
            ):
                self.phase = "voter"
        elif self.phase == "voter":
            if self._propose(ConfChange(ConfChangeType.ADD_VOTER, self.target)):
                self.done = True


def _show(command: Command) -> str:
    if isinstance(command, Put):
        return f"put({command.key!r}, {command.value!r})"
    if isinstance(command, Get):
        return f"get({command.key!r})"
    return f"cas({command.key!r}, {command.expected!r}, {command.new!r})"


def run_seed(
    seed: int,
    nodes: int = 5,
    steps: int = DEFAULT_STEPS,
    *,
    broken: str | None = None,
    joiner_voters: str = "empty",
) -> SeedResult:
    """Run one seed; the same arguments always give the same result.

    ``broken`` (tests only) is one of ``BROKEN_MODES``.  ``joiner_voters``
    says what bootstrap membership a node re-added with an empty disk is
    given: ``"bootstrap"`` (the cluster's initial voters, which its log
    replay folds the conf changes onto) or ``"empty"``.
    """
    if nodes < 1:
        raise ValueError("need at least one node")
    return _Simulation(seed, nodes, steps, broken, joiner_voters).run()


def _summary(results: Sequence[SeedResult], elapsed: float) -> str:
    totals: collections.Counter[str] = collections.Counter()
    for result in results:
        totals.update(result.faults)
    faults = " ".join(f"{kind}={totals[kind]}" for kind in FAULT_KINDS)
    return (
        f"seeds={len(results)} operations={sum(r.operations for r in results)} "
        f"open={sum(r.open_operations for r in results)} elections={sum(r.elections for r in results)} "
        f"committed={sum(r.committed for r in results)} faults: {faults} "
        f"violations={sum(1 for r in results if not r.ok)} time={elapsed:.1f}s"
    )


class Options(usage.Options):
    """The simulator's command line."""

    synopsis = f"Usage: {PROG} [options]"
    longdesc = (
        "Drive Raft groups through seeded faults and check every safety property and"
        " linearizability. Prints one summary line; on a violation, the seed, the violation"
        " and the last events, with exit status 1."
    )
    optParameters: ClassVar[list[list[Any]]] = [
        ["seed", None, 0, "First seed.", int],
        ["seeds", None, 1, "How many consecutive seeds.", int],
        ["nodes", None, 5, "Nodes in the group: 3 or 5.", int],
        ["steps", None, DEFAULT_STEPS, "Ticks per seed.", int],
        [
            "broken",
            None,
            None,
            f"Tests only: run a deliberately broken variant ({', '.join(BROKEN_MODES)}).",
        ],
    ]

    def parseArgs(self, *args: str) -> None:
        if args:
            raise usage.UsageError(f"unexpected argument {args[0]!r}")

    def postOptions(self) -> None:
        if self["nodes"] not in (3, 5):
            raise usage.UsageError(f"--nodes must be 3 or 5, not {self['nodes']}")
        if self["seeds"] < 1:
            raise usage.UsageError("--seeds must be at least 1")
        if self["steps"] < 1:
            raise usage.UsageError("--steps must be at least 1")
        if self["broken"] is not None and self["broken"] not in BROKEN_MODES:
            raise usage.UsageError(f"--broken must be one of {', '.join(BROKEN_MODES)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the seeds the command line names; 0 when all hold, 1 on a violation, 2 on a usage error."""
    args = Options()
    status = cmdline.parse(args, argv, PROG)
    if status is not None:
        return status
    started = time.perf_counter()
    results = []
    failed = None
    for seed in range(args["seed"], args["seed"] + args["seeds"]):
        result = run_seed(seed, args["nodes"], args["steps"], broken=args["broken"])
        results.append(result)
        if not result.ok and failed is None:
            failed = result
    print(_summary(results, time.perf_counter() - started))
    if failed is not None:
        print(
            f"VIOLATION with seed {failed.seed} (--seed {failed.seed} --nodes {failed.nodes} --steps {failed.steps}):"
        )
        for violation in failed.violations:
            print(f"  {violation}")
        print(f"last {len(failed.trace)} events:")
        for line in failed.trace:
            print(f"  {line}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
