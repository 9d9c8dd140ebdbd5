"""Scripted tests of the pure Raft core: the paper's properties and every feature, over an in-memory network."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import attrs
import pytest

from gitstratum.raft.core import CAMPAIGN_TRANSFER, Config, ProgressState, RaftCore
from gitstratum.raft.types import (
    NONE,
    CompactedError,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    NodeId,
    NotLeader,
    ProposalDropped,
    ReadState,
    Role,
    Snapshot,
)
from gitstratum.testing.raft import MemoryDisk


class Network:
    """Cores wired together in memory: deliver everything, or drop, cut and isolate links.

    Each node's Ready is persisted to its ``MemoryDisk`` and its committed NORMAL
    entries are applied to a list of data, so restarts and snapshots can be
    checked too.
    """

    def __init__(
        self,
        ids: Iterable[NodeId],
        *,
        voters: Iterable[NodeId] | None = None,
        seed: int = 0,
        **config: object,
    ) -> None:
        self.ids = sorted(ids)
        self.voters = frozenset(self.ids if voters is None else voters)
        self.config = config
        self.seed = seed
        self.disks = {i: MemoryDisk() for i in self.ids}
        self.state: dict[NodeId, list[bytes]] = {i: [] for i in self.ids}
        self.cores = {i: self._make(i, MemoryDisk()) for i in self.ids}
        self.queue: list[Message] = []
        self.cut_links: set[tuple[NodeId, NodeId]] = set()
        self.down: set[NodeId] = set()
        self.filter: Callable[[Message], bool] | None = None
        self.rewrite: Callable[[Message], Message] | None = None
        self.sent: list[Message] = []
        self.snapshots_received: dict[NodeId, int] = {i: 0 for i in self.ids}
        self.read_states: dict[NodeId, list[ReadState]] = {i: [] for i in self.ids}

    def _make(
        self, node: NodeId, disk: MemoryDisk, voters: frozenset[NodeId] | None = None
    ) -> RaftCore:
        cfg = Config(node, self.voters if voters is None else voters, **self.config)  # type: ignore[arg-type]
        return RaftCore(
            cfg,
            random.Random(self.seed * 1000 + node),
            hard_state=disk.hard_state,
            snapshot=disk.snapshot,
            entries=list(disk.entries),
        )

    def add_node(self, node: NodeId) -> RaftCore:
        """A brand-new node joining a running cluster: no voters of its own, empty log."""
        self.ids.append(node)
        self.disks[node] = MemoryDisk()
        self.state[node] = []
        self.snapshots_received[node] = 0
        self.read_states[node] = []
        self.cores[node] = self._make(node, self.disks[node], voters=frozenset())
        return self.cores[node]

    def restart(self, node: NodeId) -> RaftCore:
        """Crash ``node`` and rebuild it from its disk; the state machine restarts from the snapshot."""
        disk = self.disks[node]
        self.cores[node] = self._make(node, disk)
        self.state[node] = _decode_state(disk.snapshot.data) if disk.snapshot else []
        return self.cores[node]

    def pump(self, node: NodeId) -> None:
        core = self.cores[node]
        while core.has_ready():
            ready = core.ready()
            self.disks[node].save(ready)
            self.queue.extend(ready.messages)
            if ready.snapshot is not None:
                self.snapshots_received[node] += 1
                self.state[node] = _decode_state(ready.snapshot.data)
            for entry in ready.committed_entries:
                if entry.type is EntryType.NORMAL and entry.data:
                    self.state[node].append(entry.data)
            self.read_states[node].extend(ready.read_states)
            core.advance(ready)

    def pump_all(self) -> None:
        for node in self.ids:
            self.pump(node)

    def blocked(self, m: Message) -> bool:
        return (
            m.to in self.down
            or m.from_ in self.down
            or (m.from_, m.to) in self.cut_links
            or (self.filter is not None and self.filter(m))
        )

    def deliver(self, limit: int = 100_000) -> int:
        """Deliver messages until the network is quiet; return how many were delivered."""
        delivered = 0
        self.pump_all()
        while self.queue:
            batch, self.queue = self.queue, []
            for m in batch:
                self.sent.append(m)
                if self.blocked(m):
                    continue
                if self.rewrite is not None:
                    m = self.rewrite(m)
                self.cores[m.to].step(m)
                delivered += 1
                self.pump(m.to)
            self.pump_all()
            assert delivered < limit, "the network never went quiet"
        return delivered

    def tick(self, node: NodeId, times: int = 1) -> None:
        for _ in range(times):
            self.cores[node].tick()
            self.deliver()

    def tick_all(self, times: int = 1) -> None:
        for _ in range(times):
            for node in self.ids:
                if node not in self.down:
                    self.cores[node].tick()
            self.deliver()

    def cut(self, a: NodeId, b: NodeId) -> None:
        self.cut_links |= {(a, b), (b, a)}

    def isolate(self, node: NodeId) -> None:
        for other in self.ids:
            if other != node:
                self.cut(node, other)

    def heal(self) -> None:
        self.cut_links.clear()
        self.down.clear()
        self.filter = None
        self.rewrite = None

    def elect(self, node: NodeId) -> RaftCore:
        self.cores[node].campaign()
        self.deliver()
        assert self.cores[node].role is Role.LEADER
        return self.cores[node]

    def leaders(self) -> list[NodeId]:
        return [i for i in self.ids if self.cores[i].role is Role.LEADER and i not in self.down]

    def sent_of(self, kind: MessageType, to: NodeId | None = None) -> list[Message]:
        return [m for m in self.sent if m.type is kind and (to is None or m.to == to)]


def _decode_state(data: bytes) -> list[bytes]:
    return data.split(b"\n") if data else []


def _encode_state(state: list[bytes]) -> bytes:
    return b"\n".join(state)


def _log(core: RaftCore) -> list[tuple[int, int]]:
    return [(e.index, e.term) for e in core.entries(core.first_index, core.last_index + 1)]


def _core(node: NodeId = 1, voters: Iterable[NodeId] = (1, 2, 3), **kw: object) -> RaftCore:
    return RaftCore(Config(node, frozenset(voters), **kw), random.Random(node), **{})  # type: ignore[arg-type]


def _drain(core: RaftCore) -> list[Message]:
    messages: list[Message] = []
    while core.has_ready():
        ready = core.ready()
        messages.extend(ready.messages)
        core.advance(ready)
    return messages


def _msg(kind: MessageType, to: NodeId, from_: NodeId, term: int, **kw: object) -> Message:
    return Message(kind, to, from_, term, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ elections


def test_single_voter_elects_itself_and_commits_at_once() -> None:
    """A one-node cluster becomes leader on its first election and commits a proposal without any message."""
    net = Network([1])
    net.tick(1, 20)
    core = net.cores[1]
    assert core.role is Role.LEADER and core.term == 1
    # The log starts with the bootstrap membership and the leader's no-op.
    assert [e.type for e in core.entries(1, 3)] == [EntryType.CONF_CHANGE, EntryType.NORMAL]
    term, index = core.propose(b"x")
    net.deliver()
    assert (term, index) == (1, 3)
    assert core.commit_index == 3 and net.state[1] == [b"x"]
    assert not net.sent


def test_three_nodes_elect_exactly_one_leader_by_ticking() -> None:
    """Ticking a fresh three-node cluster elects one leader that every node follows."""
    net = Network([1, 2, 3])
    net.tick_all(40)
    assert len(net.leaders()) == 1
    leader = net.leaders()[0]
    for core in net.cores.values():
        assert core.leader_id == leader
        assert core.term == net.cores[leader].term


def test_higher_term_makes_leader_and_candidate_step_down() -> None:
    """Any message with a higher term turns a leader or candidate into a follower of that term."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    term = leader.term
    leader.step(_msg(MessageType.APPEND_RESPONSE, 1, 2, term + 3))
    assert leader.role is Role.FOLLOWER and leader.term == term + 3 and leader.vote == NONE

    candidate = _core(1, pre_vote=False)
    candidate.campaign()
    assert candidate.role is Role.CANDIDATE and candidate.term == 1
    candidate.step(_msg(MessageType.HEARTBEAT, 1, 3, 4))
    assert candidate.role is Role.FOLLOWER and candidate.term == 4 and candidate.leader_id == 3


def test_node_casts_one_vote_per_term() -> None:
    """A node grants its vote to one candidate per term (again to the same one), and refuses the others."""
    core = _core(1, pre_vote=False)
    core.step(_msg(MessageType.VOTE, 1, 2, 5))
    core.step(_msg(MessageType.VOTE, 1, 3, 5))
    core.step(_msg(MessageType.VOTE, 1, 2, 5))
    answers = [(m.to, m.reject) for m in _drain(core)]
    assert answers == [(2, False), (3, True), (2, False)]
    assert core.vote == 2 and core.hard_state == HardState(5, 2, 0)
    # A vote in a new term is a new vote.
    core.step(_msg(MessageType.VOTE, 1, 3, 6))
    assert [(m.to, m.reject, m.term) for m in _drain(core)] == [(3, False, 6)]


def test_vote_only_for_candidate_with_log_at_least_as_up_to_date() -> None:
    """Votes go only to candidates whose last (term, index) is at least ours (§5.4.1)."""
    entries = [Entry(1, 1), Entry(2, 2), Entry(2, 3)]
    cases = [
        (1, 10, True),  # lower last term loses, however long the log
        (2, 2, True),  # same term, shorter log loses
        (2, 3, False),  # same term, same length wins
        (2, 4, False),
        (3, 1, False),  # higher last term wins, however short
    ]
    for last_term, last_index, rejected in cases:
        core = RaftCore(
            Config(1, frozenset({1, 2, 3}), pre_vote=False),
            random.Random(1),
            hard_state=HardState(2, NONE, 0),
            entries=entries,
        )
        core.step(_msg(MessageType.VOTE, 1, 2, 3, log_term=last_term, index=last_index))
        [answer] = _drain(core)
        assert answer.type is MessageType.VOTE_RESPONSE
        assert answer.reject is rejected, (last_term, last_index)
        assert core.vote == (NONE if rejected else 2)


def test_leader_only_commits_earlier_term_entries_through_its_own() -> None:
    """Figure 8: an entry of an older term on a majority is not committed until one of the leader's term is."""
    # Node 1 holds (2, term 2) from an earlier leadership; it wins term 3 and
    # appends its no-op (3, term 3).
    core = RaftCore(
        Config(1, frozenset({1, 2, 3}), pre_vote=False),
        random.Random(1),
        hard_state=HardState(2, 1, 1),
        entries=[Entry(1, 1), Entry(2, 2)],
    )
    core.campaign()
    core.step(_msg(MessageType.VOTE_RESPONSE, 1, 2, 3))
    assert core.role is Role.LEADER and _log(core) == [(1, 1), (2, 2), (3, 3)]
    _drain(core)
    # Node 2 acknowledges index 2: a majority holds it, but it is of term 2.
    core.step(_msg(MessageType.APPEND_RESPONSE, 1, 2, 3, index=2))
    assert core.commit_index == 1
    # Once the term-3 entry is on a majority, everything before it commits too.
    core.step(_msg(MessageType.APPEND_RESPONSE, 1, 2, 3, index=3))
    assert core.commit_index == 3


def test_figure_8_old_term_entry_on_majority_is_not_committed_and_may_be_replaced() -> None:
    """Figure 8 run: an older-term entry on a majority stays uncommitted, and a later leader safely replaces it."""
    net = Network([1, 2, 3, 4, 5], pre_vote=False, check_quorum=False)
    one = net.elect(1)  # term 1; its first entries are committed everywhere
    base = one.last_index
    at = base + 1
    # (a) Entry `at` (term 1) reaches node 2 only.
    net.isolate(1)
    net.cut_links -= {(1, 2), (2, 1)}
    one.propose(b"old")
    net.deliver()
    assert net.cores[2].term_at(at) == 1 and net.cores[3].last_index == base
    # (b) Node 1 crashes; node 5 wins term 2 with 3 and 4; its entries never leave it.
    net.heal()
    net.down.add(1)
    net.cut(5, 2)
    net.filter = lambda m: m.from_ == 5 and m.type is MessageType.APPEND
    five = net.cores[5]
    five.campaign()
    net.deliver()
    assert five.role is Role.LEADER and five.term == 2
    five.propose(b"new")
    net.deliver()
    # (c) Node 5 crashes; node 1 restarts and wins term 3. Its old entry reaches
    # 2, 3 and 4, but its own term-3 no-op is lost on the way.
    net.heal()
    net.down.add(5)
    one = net.restart(1)
    net.rewrite = lambda m: attrs.evolve(m, entries=tuple(e for e in m.entries if e.term != 3))
    one.campaign()
    net.deliver()
    one.campaign()
    net.deliver()
    assert one.role is Role.LEADER and one.term == 3
    assert all(net.cores[i].term_at(at) == 1 for i in (1, 2, 3, 4))
    assert one.commit_index == base, "an older-term entry was committed by counting replicas"
    # (d) Node 1 crashes; node 5 comes back and wins term 4 (its last term, 2,
    # beats theirs) and overwrites entry `at` everywhere, which is only safe
    # because it was never committed.
    net.heal()
    net.down.add(1)
    five = net.restart(5)
    five.campaign()
    net.deliver()
    five.campaign()
    net.deliver()
    assert five.role is Role.LEADER and five.term == 4
    assert all(net.cores[i].term_at(at) == 2 for i in (2, 3, 4, 5))
    net.down.clear()
    net.tick(5, 2)
    for node in net.ids:
        assert net.state[node] == [b"new"], node
        assert b"old" not in {m for e in net.disks[node].entries for m in [e.data]}


def test_leader_never_overwrites_its_log() -> None:
    """A leader only appends: conflicting APPENDs, snapshots, rejections and stale messages leave its log intact."""
    net = Network([1, 2, 3])
    net.elect(1)
    net.cores[1].transfer_leader(2)
    net.deliver()
    net.cores[2].transfer_leader(1)
    net.deliver()
    leader = net.cores[1]
    assert leader.role is Role.LEADER and leader.term == 3
    net.isolate(1)
    for data in (b"a", b"b", b"c"):
        leader.propose(data)
    net.deliver()
    commit, term = leader.commit_index, leader.term
    before = _log(leader)
    assert before[-1][0] > commit
    # Entries of term 2 that conflict with its uncommitted term-3 tail.
    bogus = (Entry(2, commit + 1), Entry(2, commit + 2, data=b"z"))
    leader.step(
        _msg(
            MessageType.APPEND,
            1,
            2,
            term,
            index=commit,
            log_term=leader.term_at(commit),
            entries=bogus,
            commit=commit + 2,
        )
    )
    snapshot = Snapshot(attrs.evolve(leader.snapshot_metadata, index=commit + 5, term=term))
    leader.step(_msg(MessageType.SNAPSHOT, 1, 3, term, snapshot=snapshot))
    leader.step(
        _msg(MessageType.APPEND_RESPONSE, 1, 2, term, index=commit, reject=True, reject_hint=0)
    )
    leader.step(_msg(MessageType.APPEND, 1, 2, term - 1, index=0, entries=(Entry(term - 1, 1),)))
    leader.propose(b"d")
    net.deliver()
    after = _log(leader)
    assert leader.role is Role.LEADER and leader.commit_index == commit
    assert after[: len(before)] == before and len(after) == len(before) + 1


def test_pre_vote_keeps_a_rejoining_partitioned_node_from_bumping_terms() -> None:
    """A node cut off and campaigning does not raise its term, so rejoining does not depose the leader."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    term = leader.term
    net.isolate(3)
    net.tick(3, 200)
    assert net.cores[3].term == term
    assert net.cores[3].role is Role.PRE_CANDIDATE
    net.heal()
    net.tick_all(3)
    assert leader.role is Role.LEADER and leader.term == term
    assert net.cores[3].role is Role.FOLLOWER and net.cores[3].leader_id == 1


def test_without_pre_vote_a_rejoining_node_disrupts_the_leader() -> None:
    """The contrast case: with pre-vote off the partitioned node's term grows and forces a new election."""
    net = Network([1, 2, 3], pre_vote=False)
    leader = net.elect(1)
    term = leader.term
    net.isolate(3)
    net.tick(3, 200)
    assert net.cores[3].term > term
    net.heal()
    net.tick_all(3)
    assert leader.term > term


def test_check_quorum_makes_an_isolated_leader_step_down() -> None:
    """A leader that hears from no quorum for an election timeout becomes a follower."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    net.isolate(1)
    net.tick(1, 9)
    assert leader.role is Role.LEADER
    net.tick(1, 11)
    assert leader.role is Role.FOLLOWER and leader.leader_id == NONE
    with pytest.raises(NotLeader):
        leader.propose(b"x")


def test_followers_in_lease_ignore_votes_but_not_transfer_campaigns() -> None:
    """A follower that heard from its leader recently ignores (pre-)votes, unless they come from a transfer."""
    net = Network([1, 2, 3])
    net.elect(1)
    follower = net.cores[2]
    term = follower.term
    follower.step(_msg(MessageType.VOTE, 2, 3, term + 1, log_term=9, index=9))
    follower.step(_msg(MessageType.PRE_VOTE, 2, 3, term + 1, log_term=9, index=9))
    assert follower.term == term and not _drain(follower)
    follower.step(
        _msg(MessageType.VOTE, 2, 3, term + 1, log_term=9, index=9, context=CAMPAIGN_TRANSFER)
    )
    assert follower.term == term + 1 and follower.vote == 3


def test_learner_and_removed_node_never_campaign() -> None:
    """Nodes outside the voters never start an election, however long they wait."""
    learner = RaftCore(Config(4, frozenset({1, 2, 3})), random.Random(4))
    newcomer = RaftCore(Config(5, frozenset()), random.Random(5))
    for _ in range(100):
        learner.tick()
        newcomer.tick()
    learner.campaign()
    assert learner.role is Role.FOLLOWER and newcomer.role is Role.FOLLOWER
    assert not _drain(learner) and not _drain(newcomer)


# ------------------------------------------------------------------ replication


def test_proposals_replicate_and_apply_in_order_everywhere() -> None:
    """Committed proposals reach every node's state machine in the same order."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    for i in range(20):
        leader.propose(b"v%d" % i)
    net.deliver()
    expected = [b"v%d" % i for i in range(20)]
    for node in net.ids:
        assert net.state[node] == expected
        assert net.cores[node].commit_index == leader.last_index


def test_followers_refuse_proposals_and_reads_with_a_leader_hint() -> None:
    """Proposals, conf changes, reads and transfers on a follower fail fast with NotLeader naming the leader."""
    net = Network([1, 2, 3])
    net.elect(1)
    follower = net.cores[2]
    for call in (
        lambda: follower.propose(b"x"),
        lambda: follower.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4)),
        lambda: follower.read_index(b"r"),
        lambda: follower.transfer_leader(3),
    ):
        with pytest.raises(NotLeader) as failure:
            call()
        assert failure.value.leader_hint == 1


def test_follower_truncates_a_deposed_leaders_uncommitted_tail() -> None:
    """A follower's conflicting uncommitted entries are replaced by the new leader's, and Ready says so."""
    net = Network([1, 2, 3])
    old = net.elect(1)
    net.isolate(1)
    for i in range(3):
        old.propose(b"lost%d" % i)
    net.deliver()
    net.heal()
    net.down.add(1)
    net.tick_all(30)
    [new] = net.leaders()
    net.cores[new].propose(b"kept")
    net.deliver()
    net.down.clear()
    old.step(
        _msg(MessageType.HEARTBEAT, 1, new, net.cores[new].term, commit=0)
    )  # wake it with the new term
    net.tick_all(3)
    assert _log(old) == _log(net.cores[new])
    assert net.disks[1].entries == net.cores[new].entries(1, net.cores[new].last_index + 1)
    assert net.state[1] == [b"kept"]


def test_fast_backtracking_needs_few_round_trips_for_a_long_divergent_log() -> None:
    """A follower with 200 divergent entries is brought in line in a handful of rejections, not 200."""
    common = [Entry(1, 1)]
    leader_log = common + [Entry(3, i) for i in range(2, 102)]
    follower_log = common + [Entry(2, i) for i in range(2, 202)]
    leader = RaftCore(
        Config(1, frozenset({1, 2}), pre_vote=False),
        random.Random(1),
        hard_state=HardState(3, 1, 1),
        entries=leader_log,
    )
    follower = RaftCore(
        Config(2, frozenset({1, 2}), pre_vote=False),
        random.Random(2),
        hard_state=HardState(2, NONE, 1),
        entries=follower_log,
    )
    leader.campaign()
    [vote] = _drain(leader)
    follower.step(vote)
    for m in _drain(follower):
        leader.step(m)
    assert leader.role is Role.LEADER
    rejections = 0
    pending = _drain(leader)
    while pending:
        replies = []
        for m in pending:
            (follower if m.to == 2 else leader).step(m)
        for core in (follower, leader):
            for reply in _drain(core):
                rejections += reply.reject
                replies.append(reply)
        pending = replies
    assert _log(follower) == _log(leader)
    assert rejections <= 3


def test_flow_control_caps_appends_in_flight() -> None:
    """With the follower's answers held back, the leader pipelines at most max_inflight_msgs APPENDs to it."""
    net = Network([1, 2], max_inflight_msgs=3, max_size_per_msg=1)
    leader = net.elect(1)
    net.sent.clear()
    held: list[Message] = []

    def hold(m: Message) -> bool:
        if m.type is MessageType.APPEND_RESPONSE:
            held.append(m)
            return True
        return False

    net.filter = hold
    for i in range(10):
        leader.propose(b"e%d" % i)
    net.deliver()
    assert len(net.sent_of(MessageType.APPEND, to=2)) == 3
    progress = leader.progress(2)
    assert progress is not None and progress.state is ProgressState.REPLICATE
    assert len(progress.inflights) == 3
    net.filter = None
    net.queue.extend(held)
    net.deliver()
    assert net.cores[2].last_index == leader.last_index
    assert leader.commit_index == leader.last_index


def test_a_leader_cut_off_from_its_quorum_stops_taking_proposals_at_the_byte_limit() -> None:
    """max_uncommitted_size bounds what an isolated leader holds; commits make room again."""
    net = Network([1, 2, 3], max_uncommitted_size=100)
    leader = net.elect(1)
    net.isolate(1)
    leader.propose(b"x" * 150)  # nothing waits yet: one proposal always goes, however big
    with pytest.raises(ProposalDropped, match="waiting to commit"):
        leader.propose(b"y")
    net.heal()
    for _ in range(3):
        leader.tick()
    net.deliver()
    assert leader.role is Role.LEADER and leader.commit_index == leader.last_index
    for _ in range(3):
        leader.propose(b"z" * 30)
    with pytest.raises(ProposalDropped):
        leader.propose(b"z" * 30)


def test_reads_a_leader_cannot_confirm_stop_at_max_pending_reads() -> None:
    """An isolated leader holds at most max_pending_reads unanswered reads, then refuses more."""
    net = Network([1, 2, 3], max_pending_reads=3)
    leader = net.elect(1)
    net.isolate(1)
    for i in range(3):
        leader.read_index(b"r%d" % i)
    with pytest.raises(ProposalDropped, match="reads are waiting"):
        leader.read_index(b"one too many")
    net.heal()
    net.deliver()
    leader.read_index(b"after")
    net.deliver()
    assert leader.role is Role.LEADER


def test_max_size_per_msg_splits_but_always_sends_one_entry() -> None:
    """APPENDs carry at most max_size_per_msg bytes of data, yet one oversized entry still goes."""
    net = Network([1, 2], max_size_per_msg=10)
    leader = net.elect(1)
    net.cut(1, 2)
    for _ in range(4):
        leader.propose(b"x" * 6)
    leader.propose(b"y" * 50)
    net.heal()
    net.sent.clear()
    net.tick(1)
    sizes = [
        sum(len(e.data) for e in m.entries) for m in net.sent_of(MessageType.APPEND) if m.entries
    ]
    assert sizes and max(sizes[:-1]) <= 10 and sizes[-1] == 50
    assert net.cores[2].last_index == leader.last_index


def test_lost_appends_are_recovered_by_heartbeats() -> None:
    """Dropped APPENDs do not wedge a follower: the heartbeat round resends what it lacks."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    net.filter = lambda m: m.type is MessageType.APPEND and m.to == 3
    leader.propose(b"a")
    net.deliver()
    assert net.cores[3].last_index < leader.last_index
    net.filter = None
    net.tick(1, 2)
    assert net.cores[3].last_index == leader.last_index
    assert net.state[3] == [b"a"]


# ------------------------------------------------------------------ reads


def test_read_index_confirms_leadership_with_a_heartbeat_round() -> None:
    """A ReadIndex answers with the commit index once a quorum acknowledges the heartbeat carrying its context."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    leader.propose(b"a")
    net.deliver()
    net.sent.clear()
    leader.read_index(b"r1")
    net.deliver()
    assert net.read_states[1] == [ReadState(leader.commit_index, b"r1")]
    assert all(m.context == b"r1" for m in net.sent_of(MessageType.HEARTBEAT))


def test_read_index_is_not_answered_by_an_isolated_leader() -> None:
    """A leader cut off from its quorum never answers a read (it might be deposed)."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    net.isolate(1)
    leader.read_index(b"r")
    net.tick(1, 5)
    assert net.read_states[1] == []


def test_read_index_waits_for_the_leader_to_commit_in_its_term() -> None:
    """A fresh leader queues reads until its no-op commits, then answers with an index at least that."""
    net = Network([1, 2, 3])
    leader = net.cores[1]
    net.filter = lambda m: m.type is MessageType.APPEND_RESPONSE
    leader.campaign()
    net.deliver()
    assert leader.role is Role.LEADER and leader.commit_index == 0
    leader.read_index(b"early")
    net.deliver()
    assert net.read_states[1] == []
    net.filter = None
    net.tick(1)
    assert net.read_states[1] == [ReadState(leader.last_index, b"early")]


def test_single_voter_answers_reads_at_once() -> None:
    """With one voter the leader is its own quorum: a read is answered without any message."""
    net = Network([1])
    leader = net.elect(1)
    leader.read_index(b"r")
    net.deliver()
    assert net.read_states[1] == [ReadState(leader.commit_index, b"r")]


# ------------------------------------------------------------------ leadership transfer


def test_transfer_to_a_caught_up_follower() -> None:
    """Transferring leadership sends TIMEOUT_NOW to the target, which wins the next term at once."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    term = leader.term
    leader.transfer_leader(2)
    net.deliver()
    assert net.cores[2].role is Role.LEADER and net.cores[2].term == term + 1
    assert leader.role is Role.FOLLOWER and leader.leader_id == 2


def test_transfer_catches_a_lagging_target_up_first_and_drops_proposals_meanwhile() -> None:
    """A lagging target is first brought up to date; proposals are refused while the transfer runs."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    net.cut(1, 3)
    leader.propose(b"a")
    net.deliver()
    leader.transfer_leader(3)
    with pytest.raises(ProposalDropped):
        leader.propose(b"b")
    net.heal()
    net.tick(1)
    assert net.cores[3].role is Role.LEADER
    assert net.state[3] == [b"a"]


def test_transfer_is_abandoned_after_an_election_timeout() -> None:
    """If the target never answers, the leader gives up after an election timeout and takes proposals again."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    net.down.add(3)
    leader.transfer_leader(3)
    assert leader.lead_transferee == 3
    net.tick(1, 10)
    assert leader.lead_transferee == NONE and leader.role is Role.LEADER
    leader.propose(b"ok")
    with pytest.raises(ValueError):
        leader.transfer_leader(9)


# ------------------------------------------------------------------ snapshots


def test_snapshot_installs_on_a_follower_whose_next_entry_was_compacted() -> None:
    """After compaction, a lagging follower gets InstallSnapshot, restores from it and catches up."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    net.down.add(3)
    for i in range(10):
        leader.propose(b"v%d" % i)
    net.deliver()
    snapshot = leader.compact(leader.applied_index, _encode_state(net.state[1]))
    net.disks[1].compact(snapshot)
    assert leader.first_index == snapshot.metadata.index + 1
    with pytest.raises(CompactedError):
        leader.term_at(1)
    leader.propose(b"after")
    net.down.clear()
    net.tick(1, 3)
    follower = net.cores[3]
    assert net.snapshots_received[3] == 1
    assert follower.snapshot_metadata == snapshot.metadata
    assert follower.conf_state == ConfState(frozenset({1, 2, 3}))
    assert net.state[3] == net.state[1] == [b"v%d" % i for i in range(10)] + [b"after"]
    assert net.disks[3].snapshot == snapshot


def test_a_lost_snapshot_is_sent_again() -> None:
    """Dropping the InstallSnapshot does not wedge replication: the leader sends it again later."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    net.down.add(3)
    for i in range(5):
        leader.propose(b"v%d" % i)
    net.deliver()
    leader.compact(leader.applied_index, _encode_state(net.state[1]))
    net.down.clear()
    net.filter = lambda m: m.type is MessageType.SNAPSHOT
    net.tick(1, 3)
    progress = leader.progress(3)
    assert progress is not None and progress.state is ProgressState.SNAPSHOT
    net.filter = None
    net.tick(1, 15)
    assert net.snapshots_received[3] == 1
    assert net.state[3] == net.state[1]


def test_compact_refuses_unapplied_indexes() -> None:
    """The application can only compact what it has applied."""
    net = Network([1])
    leader = net.elect(1)
    with pytest.raises(ValueError):
        leader.compact(leader.applied_index + 1, b"")


def test_restart_from_hard_state_snapshot_and_entries() -> None:
    """A node rebuilt from its disk keeps term, vote, log and snapshot, re-applies committed entries and rejoins."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    for i in range(6):
        leader.propose(b"v%d" % i)
    net.deliver()
    follower = net.cores[2]
    snap = follower.compact(follower.applied_index - 2, _encode_state(net.state[2][:-2]))
    net.disks[2].compact(snap)
    before = (follower.term, follower.vote, _log(follower), follower.commit_index)
    restarted = net.restart(2)
    assert (restarted.term, restarted.vote, _log(restarted)) == before[:3]
    assert restarted.applied_index == snap.metadata.index
    assert restarted.snapshot_metadata == snap.metadata
    assert restarted.hard_state == net.disks[2].hard_state
    net.pump(2)
    assert net.state[2] == [b"v%d" % i for i in range(6)]
    leader.propose(b"more")
    net.deliver()
    assert net.state[2][-1] == b"more"


# ------------------------------------------------------------------ membership


def test_learner_receives_entries_but_does_not_count_for_commit() -> None:
    """A learner is replicated to, yet commit needs a quorum of voters only."""
    net = Network([1, 2])
    leader = net.elect(1)
    newcomer = net.add_node(3)
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 3))
    net.deliver()
    assert leader.conf_state == ConfState(frozenset({1, 2}), frozenset({3}))
    assert newcomer.conf_state == leader.conf_state
    net.down.add(2)
    leader.propose(b"x")
    net.deliver()
    assert newcomer.last_index == leader.last_index
    assert leader.commit_index < leader.last_index  # the learner's copy does not count
    net.down.clear()
    net.tick(1)
    assert net.state[3] == [b"x"]
    newcomer.campaign()
    net.tick(3, 50)
    assert newcomer.role is Role.FOLLOWER


def test_promote_learner_then_remove_a_voter() -> None:
    """A learner promoted with ADD_VOTER counts for quorum; a removed voter no longer does."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    net.add_node(4)
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    with pytest.raises(ProposalDropped):
        leader.propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, 4))
    net.deliver()
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, 4))
    net.deliver()
    assert leader.conf_state.voters == {1, 2, 3, 4}
    leader.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 2))
    net.deliver()
    assert all(net.cores[i].conf_state.voters == {1, 3, 4} for i in (1, 3, 4))
    assert leader.progress(2) is None
    # Quorum is now two of {1, 3, 4}: with 3 down, 1 and 4 still commit.
    net.down.add(3)
    leader.propose(b"y")
    net.deliver()
    assert leader.commit_index == leader.last_index
    assert net.state[4][-1] == b"y"


def test_conf_change_validation() -> None:
    """Nonsensical membership changes are refused with ValueError before they reach the log."""
    net = Network([1, 2])
    leader = net.elect(1)
    for change in (
        ConfChange(ConfChangeType.ADD_VOTER, 2),
        ConfChange(ConfChangeType.ADD_LEARNER, 1),
        ConfChange(ConfChangeType.REMOVE_NODE, 7),
    ):
        with pytest.raises(ValueError):
            leader.propose_conf_change(change)
    solo = Network([1])
    with pytest.raises(ValueError):
        solo.elect(1).propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 1))


def test_conf_change_takes_effect_on_append_and_reverts_on_truncation() -> None:
    """A follower uses a membership change as soon as it appends it, and forgets it if the entry is truncated."""
    core = RaftCore(Config(2, frozenset({1, 2, 3})), random.Random(2))
    change = ConfChange(ConfChangeType.ADD_VOTER, 4).encode()
    core.step(
        _msg(
            MessageType.APPEND,
            2,
            1,
            1,
            index=0,
            entries=(Entry(1, 1), Entry(1, 2, EntryType.CONF_CHANGE, change)),
        )
    )
    assert core.conf_state.voters == {1, 2, 3, 4} and core.commit_index == 0
    core.step(_msg(MessageType.APPEND, 2, 3, 2, index=1, log_term=1, entries=(Entry(2, 2),)))
    assert core.conf_state.voters == {1, 2, 3}
    assert _log(core) == [(1, 1), (2, 2)]


def test_leader_removing_itself_steps_down_once_committed() -> None:
    """A leader that removes itself keeps leading until the change commits, then hands over and stops campaigning."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    leader.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 1))
    net.deliver()
    assert leader.role is Role.FOLLOWER
    assert all(net.cores[i].conf_state.voters == {2, 3} for i in (1, 2, 3))
    net.tick_all(40)
    leaders = net.leaders()
    assert len(leaders) == 1 and leaders[0] != 1
    net.cores[leaders[0]].propose(b"z")
    net.deliver()
    assert net.state[2] == net.state[3] == [b"z"]
    assert leader.role is Role.FOLLOWER


def test_ready_reports_soft_and_hard_state_changes_and_sync_needs() -> None:
    """Ready carries role/leader and hard state only when they change; must_sync follows entries, term and vote."""
    core = _core(1, voters=(1,))
    core.campaign()
    ready = core.ready()
    assert ready.soft_state is not None and ready.soft_state.role is Role.LEADER
    assert ready.hard_state == HardState(1, 1, 2)
    bootstrap = Entry(1, 1, EntryType.CONF_CHANGE, ConfChange(ConfChangeType.ADD_VOTER, 1).encode())
    assert ready.entries == (bootstrap, Entry(1, 2)) and ready.must_sync
    assert ready.committed_entries == (bootstrap, Entry(1, 2))
    core.advance(ready)
    assert not core.has_ready()
    core.propose(b"a")
    ready = core.ready()
    assert ready.soft_state is None and ready.hard_state == HardState(1, 1, 3)
    assert ready.must_sync and ready.committed_entries == (Entry(1, 3, data=b"a"),)
    core.advance(ready)
    assert core.applied_index == 3
    assert not core.has_ready()


def test_stale_and_misaddressed_messages_are_ignored() -> None:
    """Messages for another node, from itself or from an older term never change a core."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    state = (leader.term, leader.role, _log(leader), leader.commit_index)
    leader.step(_msg(MessageType.APPEND, 2, 3, 99))
    leader.step(_msg(MessageType.VOTE, 1, 1, 99))
    leader.step(_msg(MessageType.VOTE_RESPONSE, 1, 2, 0))
    leader.step(_msg(MessageType.READ_INDEX, 1, 2, leader.term))
    assert (leader.term, leader.role, _log(leader), leader.commit_index) == state


def test_malformed_appends_are_ignored_and_leave_the_log_whole() -> None:
    """An APPEND no leader could send (a gap, a falling term, a term past the leader's) changes nothing."""
    core = RaftCore(Config(2, frozenset({1, 2, 3})), random.Random(2))
    for entries, log_term in (
        ((Entry(1, 1), Entry(1, 3)), 0),  # index 2 missing
        ((Entry(2, 1), Entry(1, 2)), 0),  # terms fall
        ((Entry(5, 1),), 0),  # an entry from after the sender's term
        ((Entry(1, 1),), 2),  # an entry older than the one it follows
    ):
        core.step(
            _msg(MessageType.APPEND, 2, 1, 2, index=0, log_term=log_term, entries=entries, commit=1)
        )
        assert _log(core) == [] and core.commit_index == 0
    assert not any(m.type is MessageType.APPEND_RESPONSE for m in _drain(core))
    # The same leader's well-formed APPEND is taken as usual.
    core.step(_msg(MessageType.APPEND, 2, 1, 2, index=0, entries=(Entry(1, 1), Entry(2, 2))))
    assert _log(core) == [(1, 1), (2, 2)]


def test_new_node_learns_membership_from_a_snapshot() -> None:
    """A node added after compaction gets the membership from the snapshot's conf state, then the change itself."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    for i in range(4):
        leader.propose(b"v%d" % i)
    net.deliver()
    net.disks[1].compact(leader.compact(leader.applied_index, _encode_state(net.state[1])))
    newcomer = net.add_node(4)
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    net.tick(1, 3)
    assert net.snapshots_received[4] == 1
    assert newcomer.conf_state == ConfState(frozenset({1, 2, 3}), frozenset({4}))
    assert net.state[4] == [b"v%d" % i for i in range(4)]


def test_conf_change_waits_for_the_leader_to_commit_in_its_term() -> None:
    """A fresh leader refuses membership changes until its own no-op has committed."""
    net = Network([1, 2, 3])
    net.filter = lambda m: m.type is MessageType.APPEND_RESPONSE
    leader = net.elect(1)
    with pytest.raises(ProposalDropped):
        leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    net.filter = None
    net.tick(1)
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))


def test_report_unreachable_stops_pipelining_to_the_peer() -> None:
    """When the transport reports a peer unreachable, the leader drops back to probing it one APPEND at a time."""
    net = Network([1, 2, 3])
    leader = net.elect(1)
    progress = leader.progress(2)
    assert progress is not None and progress.state is ProgressState.REPLICATE
    leader.report_unreachable(2)
    assert progress.state is ProgressState.PROBE
    net.down.add(2)
    net.sent.clear()
    leader.propose(b"a")
    leader.propose(b"b")
    net.deliver()
    assert len([m for m in net.sent_of(MessageType.APPEND, to=2) if m.entries]) == 1
    net.down.clear()
    net.tick(1)
    assert net.cores[2].last_index == leader.last_index
