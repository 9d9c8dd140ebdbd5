"""Hypothesis drives three Raft cores through ticks, lossy delivery, partitions, compaction and crashes, checking Raft's safety properties at every step."""

from __future__ import annotations

import hashlib
import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gitstratum.raft.core import Config, RaftCore
from gitstratum.raft.types import (
    Entry,
    Message,
    NodeId,
    NotLeader,
    ProposalDropped,
    Role,
)
from gitstratum.testing.raft import MemoryDisk

IDS = (1, 2, 3)
nodes = st.sampled_from(IDS)


def _fold(state: bytes, entry: Entry) -> bytes:
    """The test's state machine: a hash chain over every applied entry."""
    h = hashlib.sha256(state)
    h.update(b"%d:%d:%d:" % (entry.index, entry.term, entry.type))
    h.update(entry.data)
    return h.digest()


class RaftSafety(RuleBasedStateMachine):
    """Three cores over an adversarial network; invariants are Figure 3's safety properties."""

    def __init__(self) -> None:
        super().__init__()
        self.written = {i: MemoryDisk() for i in IDS}
        self.durable = {i: MemoryDisk() for i in IDS}
        self.cores = {i: self._make(i) for i in IDS}
        self.machine: dict[NodeId, tuple[int, bytes]] = {i: (0, b"") for i in IDS}
        self.network: list[Message] = []
        self.cut: set[tuple[NodeId, NodeId]] = set()
        self.leader_of_term: dict[int, NodeId] = {}
        self.leader_logs: dict[NodeId, tuple[int, list[tuple[int, int]]]] = {}
        self.committed: dict[int, int] = {}
        #: a term by which each committed index was known committed (at or after the real one)
        self.commit_term: dict[int, int] = {}
        self.applied: dict[int, bytes] = {}
        self.counter = 0

    def _make(self, node: NodeId) -> RaftCore:
        disk = self.durable[node]
        return RaftCore(
            Config(node, frozenset(IDS), election_tick=5, max_inflight_msgs=4, max_size_per_msg=8),
            random.Random(node * 7919 + len(disk.entries)),
            hard_state=disk.hard_state,
            snapshot=disk.snapshot,
            entries=list(disk.entries),
        )

    def _pump(self, node: NodeId) -> None:
        core = self.cores[node]
        while core.has_ready():
            ready = core.ready()
            self.written[node].save(ready)
            if ready.must_sync:
                self.durable[node] = self.written[node].copy()
            self.network.extend(ready.messages)
            index, state = self.machine[node]
            if ready.snapshot is not None:
                index, state = ready.snapshot.metadata.index, ready.snapshot.data
            for entry in ready.committed_entries:
                assert entry.index == index + 1, "committed entries skipped or repeated an index"
                index, state = entry.index, _fold(state, entry)
                # State Machine Safety: every node reaches the same state at each index.
                assert self.applied.setdefault(index, state) == state, f"divergent apply at {index}"
            self.machine[node] = (index, state)
            core.advance(ready)

    def _pump_all(self) -> None:
        for node in IDS:
            self._pump(node)

    def _deliver(self, m: Message) -> None:
        if (m.from_, m.to) not in self.cut:
            self.cores[m.to].step(m)
            self._pump(m.to)

    # ------------------------------------------------------------ rules

    @rule(node=nodes, times=st.integers(1, 12))
    def tick(self, node: NodeId, times: int) -> None:
        for _ in range(times):
            self.cores[node].tick()
            self._pump(node)

    @rule(times=st.integers(1, 6))
    def tick_all(self, times: int) -> None:
        for _ in range(times):
            for node in IDS:
                self.cores[node].tick()
            self._pump_all()

    @rule(
        steps=st.integers(1, 40),
        seed=st.integers(0, 2**32),
        loss=st.sampled_from([0.0, 0.0, 0.1, 0.3]),
        proposals=st.integers(0, 3),
    )
    def run(self, steps: int, seed: int, loss: float, proposals: int) -> None:
        """Let the cluster run: tick everyone, propose to any leader, and deliver with loss,
        duplication and reordering chosen by ``seed``; the invariants hold after every step."""
        rng = random.Random(seed)
        for _ in range(steps):
            for node in IDS:
                self.cores[node].tick()
            self._pump_all()
            for _ in range(proposals):
                self.propose(rng.choice(IDS))
            batch, self.network = self.network, []
            rng.shuffle(batch)
            for m in batch:
                roll = rng.random()
                if roll < loss:
                    continue
                self._deliver(m)
                if roll > 1 - loss / 3:
                    self._deliver(m)
            self.check()

    @precondition(lambda self: self.network)
    @rule(pick=st.integers(0, 10_000))
    def deliver_one(self, pick: int) -> None:
        """Deliver any queued message, so delivery order is arbitrary."""
        self._deliver(self.network.pop(pick % len(self.network)))

    @precondition(lambda self: self.network)
    @rule(limit=st.integers(1, 300))
    def deliver_all(self, limit: int) -> None:
        for _ in range(limit):
            if not self.network:
                break
            self._deliver(self.network.pop(0))

    @precondition(lambda self: self.network)
    @rule(pick=st.integers(0, 10_000))
    def drop(self, pick: int) -> None:
        self.network.pop(pick % len(self.network))

    @precondition(lambda self: self.network)
    @rule(pick=st.integers(0, 10_000))
    def duplicate(self, pick: int) -> None:
        self._deliver(self.network[pick % len(self.network)])

    @rule(node=nodes)
    def isolate(self, node: NodeId) -> None:
        for other in IDS:
            if other != node:
                self.cut |= {(node, other), (other, node)}

    @rule(a=nodes, b=nodes)
    def cut_one_way(self, a: NodeId, b: NodeId) -> None:
        if a != b:
            self.cut.add((a, b))

    @rule()
    def heal(self) -> None:
        self.cut.clear()

    @rule(node=nodes)
    def propose(self, node: NodeId) -> None:
        self.counter += 1
        try:
            self.cores[node].propose(b"p%d" % self.counter)
        except (NotLeader, ProposalDropped):
            return
        self._pump(node)

    @rule(node=nodes, to=nodes)
    def transfer(self, node: NodeId, to: NodeId) -> None:
        try:
            self.cores[node].transfer_leader(to)
        except NotLeader:
            return
        self._pump(node)

    @rule(node=nodes, back=st.integers(0, 3))
    def compact(self, node: NodeId, back: int) -> None:
        core = self.cores[node]
        index, state = self.machine[node]
        if index - back > core.snapshot_metadata.index and index == core.applied_index:
            target = index - back
            snapshot = core.compact(target, self.applied[target])
            self.written[node].compact(snapshot)

    @rule(node=nodes)
    def crash_restart(self, node: NodeId) -> None:
        """Lose everything volatile and unsynced, then rebuild from the durable disk."""
        # What it sent before crashing stays in flight: each message left after the
        # sync that made its claims durable, so delivering it late must stay safe.
        self.written[node] = self.durable[node].copy()
        snapshot = self.durable[node].snapshot
        self.machine[node] = (
            (snapshot.metadata.index, snapshot.data) if snapshot is not None else (0, b"")
        )
        self.cores[node] = self._make(node)
        self.leader_logs.pop(node, None)
        self._pump(node)

    # ------------------------------------------------------------ invariants

    @invariant()
    def check(self) -> None:
        self.election_safety()
        self.leader_append_only()
        self.log_matching()
        self.leader_completeness()
        self.commit_never_passes_the_log()

    def election_safety(self) -> None:
        """At most one leader per term."""
        for node, core in self.cores.items():
            if core.role is Role.LEADER:
                leader = self.leader_of_term.setdefault(core.term, node)
                assert leader == node, f"two leaders in term {core.term}: {leader} and {node}"

    def leader_append_only(self) -> None:
        """A leader never deletes or overwrites entries in its log, only appends."""
        for node, core in self.cores.items():
            if core.role is not Role.LEADER:
                self.leader_logs.pop(node, None)
                continue
            log = [(i, core.term_at(i)) for i in range(core.first_index, core.last_index + 1)]
            previous = self.leader_logs.get(node)
            if previous is not None and previous[0] == core.term:
                for index, term in previous[1]:
                    if index >= core.first_index:
                        assert core.term_at(index) == term, f"leader {node} rewrote {index}"
                assert core.last_index >= (previous[1][-1][0] if previous[1] else 0)
            self.leader_logs[node] = (core.term, log)

    def log_matching(self) -> None:
        """Two logs with an entry of the same index and term are identical up to it."""
        cores = list(self.cores.values())
        for x, a in enumerate(cores):
            for b in cores[x + 1 :]:
                lo = max(a.first_index, b.first_index)
                hi = min(a.last_index, b.last_index)
                matched = False
                for index in range(hi, lo - 1, -1):
                    same = a.term_at(index) == b.term_at(index)
                    if matched:
                        assert same, f"logs of {a.id} and {b.id} differ at {index}"
                        assert a.entries(index, index + 1) == b.entries(index, index + 1)
                    elif same:
                        matched = True
                        assert a.entries(index, index + 1) == b.entries(index, index + 1)

    def leader_completeness(self) -> None:
        """Every committed entry is in the log of every leader of a later term."""
        for core in self.cores.values():
            for index in range(core.first_index, core.commit_index + 1):
                term = core.term_at(index)
                assert self.committed.setdefault(index, term) == term, f"two commits at {index}"
                self.commit_term.setdefault(index, core.term)
        for core in self.cores.values():
            if core.role is not Role.LEADER:
                continue
            for index, term in self.committed.items():
                if core.term <= self.commit_term[index]:
                    # A deposed leader still leading an older term (cut off) need
                    # not have what a later term committed.
                    continue
                if index >= core.first_index:
                    assert core.last_index >= index, f"leader {core.id} lacks committed {index}"
                    assert core.term_at(index) == term, f"leader {core.id} differs at {index}"
                else:
                    assert core.snapshot_metadata.index >= index

    def commit_never_passes_the_log(self) -> None:
        """Each node's commit and applied indexes stay within its own log."""
        for core in self.cores.values():
            assert core.applied_index <= core.commit_index <= core.last_index
            assert core.first_index == core.snapshot_metadata.index + 1


RaftSafety.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, derandomize=True, deadline=None
)


class TestRaftSafety(RaftSafety.TestCase):  # type: ignore[name-defined,misc,valid-type]
    """Random runs of three cores never break Election Safety, Leader Append-Only, Log Matching,
    Leader Completeness or State Machine Safety."""


def test_a_cut_off_leader_of_an_older_term_is_not_held_to_later_commits() -> None:
    """The checker's Leader Completeness asks it only of leaders of later terms: an isolated
    leader still leading term 1 while term 2 commits index 5 is allowed (a found sequence)."""
    s = RaftSafety()
    s.isolate(node=2)
    s.tick(node=1, times=8)
    s.deliver_all(limit=21)
    s.heal()
    s.isolate(node=1)
    s.tick(node=3, times=6)
    s.deliver_all(limit=17)
    assert s.cores[1].role is Role.LEADER and s.cores[1].term == 1
    assert s.cores[3].role is Role.LEADER and s.cores[3].commit_index > s.cores[1].last_index
    s.check()
