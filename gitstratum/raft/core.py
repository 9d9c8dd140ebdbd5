"""The pure Raft state machine: elections, replication, commit, reads, transfer, snapshots, membership.

In the style of etcd-raft's ``RawNode``: the caller feeds it ``tick()``,
``step(message)`` and proposals, then takes a ``Ready`` batch (hard state
and entries to persist, messages to send, entries to apply), carries it
out and calls ``advance``.  Nothing here touches a clock, a socket, a
disk or the module-level ``random``; the randomized election timeout
comes from the injected ``rng``, so a seed fixes every decision.

The log lives in memory (the entries after the latest snapshot); the
driver keeps the durable copy.  Membership changes are single-server and
take effect as soon as the entry is appended (Raft dissertation §4.1), so
the membership is folded from the log incrementally and only rebuilt on
truncation, compaction and restore.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Sequence

import attrs

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
    Ready,
    Role,
    Snapshot,
    SnapshotMetadata,
    SoftState,
)

__all__ = ["Config", "RaftCore", "ProgressState", "Progress", "CAMPAIGN_TRANSFER"]

#: ``context`` of a VOTE sent by a leadership-transfer campaign: voters
#: grant it even inside a leader lease (the old leader asked for it).
CAMPAIGN_TRANSFER = b"transfer"

_EMPTY_SNAPSHOT = Snapshot()


@attrs.frozen
class Config:
    """How one core behaves; ``voters`` is the bootstrap membership when there is no snapshot."""

    id: NodeId
    voters: frozenset[NodeId] = frozenset()
    #: the election timeout is drawn from [election_tick, 2 * election_tick)
    election_tick: int = 10
    heartbeat_tick: int = 1
    #: bytes of entry data per APPEND (one entry is always sent, however big)
    max_size_per_msg: int = 1 << 20
    #: pipelined APPENDs in flight per follower before the leader waits
    max_inflight_msgs: int = 256
    max_committed_size_per_ready: int = 1 << 22
    #: bytes of proposed, not yet committed entry data a leader holds before
    #: it refuses proposals (ProposalDropped); 0 for no limit.  One proposal
    #: is always taken when nothing is uncommitted, however big.
    max_uncommitted_size: int = 1 << 26
    #: ReadIndex requests a leader holds unanswered before it refuses more
    #: (ProposalDropped); 0 for no limit
    max_pending_reads: int = 4096
    pre_vote: bool = True
    check_quorum: bool = True

    def __attrs_post_init__(self) -> None:
        if self.id <= NONE:
            raise ValueError(f"node id must be >= 1, not {self.id}")
        if self.election_tick <= self.heartbeat_tick or self.heartbeat_tick < 1:
            raise ValueError("election_tick must exceed heartbeat_tick, which must be >= 1")
        if self.max_inflight_msgs < 1:
            raise ValueError("max_inflight_msgs must be >= 1")
        if self.max_uncommitted_size < 0 or self.max_pending_reads < 0:
            raise ValueError("max_uncommitted_size and max_pending_reads cannot be negative")


class ProgressState(enum.Enum):
    """How the leader is feeding one follower (etcd's tracker states)."""

    #: one APPEND at a time until the follower's match is found
    PROBE = "probe"
    #: optimistic pipelining, bounded by the inflight window
    REPLICATE = "replicate"
    #: waiting for an InstallSnapshot to land
    SNAPSHOT = "snapshot"


@attrs.define
class Progress:
    """The leader's view of one follower's log."""

    match: int = 0
    next: int = 1
    state: ProgressState = ProgressState.PROBE
    #: in PROBE, an APPEND is out and unanswered
    probe_sent: bool = False
    pending_snapshot: int = 0
    #: ticks spent in SNAPSHOT state, so a lost snapshot is sent again
    snapshot_elapsed: int = 0
    #: heard from since the last check-quorum round
    recent_active: bool = False
    #: last index of each pipelined APPEND not yet acknowledged, oldest first
    inflights: deque[int] = attrs.field(factory=deque)

    def become_probe(self) -> None:
        # After a snapshot, probe just past it: if it landed, that matches;
        # if it was lost, the rejection hint sends us back to a snapshot.
        if self.state is ProgressState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.pending_snapshot = 0
        self.inflights.clear()

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.probe_sent = False
        self.pending_snapshot = 0
        self.inflights.clear()

    def become_snapshot(self, index: int) -> None:
        self.state = ProgressState.SNAPSHOT
        self.pending_snapshot = index
        self.snapshot_elapsed = 0
        self.probe_sent = False
        self.inflights.clear()

    def maybe_update(self, index: int) -> bool:
        """Record an acknowledgement up to ``index``; False if it tells us nothing new."""
        updated = False
        if self.match < index:
            self.match = index
            self.probe_sent = False
            updated = True
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decrease_to(self, rejected: int, match_hint: int) -> bool:
        """Step ``next`` back after a rejection of the APPEND at ``rejected``; False if stale."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def free_up_to(self, index: int) -> None:
        while self.inflights and self.inflights[0] <= index:
            self.inflights.popleft()

    def is_paused(self, max_inflight: int) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return len(self.inflights) >= max_inflight
        return True


@attrs.define
class _ReadRequest:
    index: int
    acks: set[NodeId]


def _apply_change(conf: ConfState, change: ConfChange) -> ConfState:
    node = change.node_id
    if change.type is ConfChangeType.ADD_VOTER:
        return ConfState(conf.voters | {node}, conf.learners - {node})
    if change.type is ConfChangeType.ADD_LEARNER:
        return ConfState(conf.voters - {node}, conf.learners | {node})
    return ConfState(conf.voters - {node}, conf.learners - {node})


def _decode_change(entry: Entry) -> ConfChange | None:
    try:
        return ConfChange.decode(entry.data)
    except ValueError:
        # A malformed change cannot come from our own leaders; treat it as a no-op
        # rather than wedge every replica on it.
        return None


def _well_formed_append(m: Message) -> bool:
    """Whether an APPEND's entries follow its (index, log_term) as a leader's log does.

    Consecutive indexes from ``m.index + 1``, terms never falling, none
    below ``m.log_term`` and none above the leader's ``m.term``.
    """
    index, term = m.index, m.log_term
    for entry in m.entries:
        if entry.index != index + 1 or not term <= entry.term <= m.term:
            return False
        index, term = entry.index, entry.term
    return True


class RaftCore:
    """One Raft peer as a deterministic state machine; see the module docstring."""

    def __init__(
        self,
        config: Config,
        rng: random.Random,
        *,
        hard_state: HardState = HardState(),
        snapshot: Snapshot | None = None,
        entries: Sequence[Entry] = (),
    ) -> None:
        self._config = config
        self._rng = rng
        self._id = config.id
        snap = snapshot if snapshot is not None and not snapshot.is_empty else _EMPTY_SNAPSHOT
        self._snapshot = snap
        offset = snap.metadata.index
        self._log: list[Entry] = [e for e in entries if e.index > offset]
        for position, entry in enumerate(self._log):
            if entry.index != offset + 1 + position:
                raise ValueError(f"log entries are not contiguous at index {entry.index}")
        self._conf_base = (
            snap.metadata.conf_state if not snap.is_empty else ConfState(config.voters)
        )
        self._conf_history: list[tuple[int, ConfState]] = []
        self._fold_conf(self._log)

        self._term = hard_state.term
        self._vote = hard_state.vote
        self._commit = max(hard_state.commit, offset)
        if self._commit > self.last_index:
            raise ValueError(
                f"hard state commit {self._commit} is past the last log index {self.last_index}:"
                " the log was truncated or lost"
            )
        self._applied = offset
        self._unstable_from = self.last_index + 1
        self._pending_snapshot: Snapshot | None = None

        self._role = Role.FOLLOWER
        self._leader_id: NodeId = NONE
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = config.election_tick
        self._votes: dict[NodeId, bool] = {}
        self._progress: dict[NodeId, Progress] = {}
        self._lead_transferee: NodeId = NONE
        self._reads_waiting_commit: list[bytes] = []
        self._uncommitted_size = 0
        self._reads: dict[bytes, _ReadRequest] = {}
        self._read_queue: deque[bytes] = deque()

        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._prev_hard_state = hard_state
        self._prev_soft_state = SoftState()
        self._reset_randomized_timeout()

    # ------------------------------------------------------------ views

    @property
    def id(self) -> NodeId:
        return self._id

    @property
    def term(self) -> int:
        return self._term

    @property
    def vote(self) -> NodeId:
        return self._vote

    @property
    def role(self) -> Role:
        return self._role

    @property
    def leader_id(self) -> NodeId:
        return self._leader_id

    @property
    def commit_index(self) -> int:
        return self._commit

    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def first_index(self) -> int:
        return self._snapshot.metadata.index + 1

    @property
    def last_index(self) -> int:
        return self._snapshot.metadata.index + len(self._log)

    @property
    def snapshot_metadata(self) -> SnapshotMetadata:
        return self._snapshot.metadata

    @property
    def conf_state(self) -> ConfState:
        return self._conf_history[-1][1] if self._conf_history else self._conf_base

    @property
    def hard_state(self) -> HardState:
        return HardState(self._term, self._vote, self._commit)

    @property
    def lead_transferee(self) -> NodeId:
        """The node a leadership transfer in progress is handing over to (``NONE`` if none)."""
        return self._lead_transferee

    def progress(self, node: NodeId) -> Progress | None:
        """The leader's replication progress for ``node`` (``None`` off the leader or for unknown nodes)."""
        return self._progress.get(node)

    def term_at(self, index: int) -> int:
        """The term of the entry at ``index``; 0 past the end; ``CompactedError`` below the snapshot."""
        offset = self._snapshot.metadata.index
        if index == offset:
            return self._snapshot.metadata.term
        if index < offset:
            raise CompactedError(f"index {index} is compacted (snapshot at {offset})")
        if index > offset + len(self._log):
            return 0
        return self._log[index - offset - 1].term

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """The entries in [lo, hi), clipped at the end of the log."""
        offset = self._snapshot.metadata.index
        if lo <= offset:
            raise CompactedError(f"index {lo} is compacted (snapshot at {offset})")
        return self._log[lo - offset - 1 : max(hi - offset - 1, 0)]

    # ------------------------------------------------------------ inputs

    def tick(self) -> None:
        """Advance logical time by one tick."""
        if self._role is Role.LEADER:
            self._tick_leader()
        else:
            self._election_elapsed += 1
            if self._promotable() and self._election_elapsed >= self._randomized_timeout:
                self._election_elapsed = 0
                self._start_election(transfer=False)

    def campaign(self) -> None:
        """Start an election now (with pre-vote when configured); ignored by leaders and non-voters."""
        if self._role is not Role.LEADER and self._promotable():
            self._start_election(transfer=False)

    def propose(self, data: bytes) -> tuple[int, int]:
        """Append ``data`` as a NORMAL entry; return its (term, index).

        ProposalDropped when ``max_uncommitted_size`` bytes already wait to
        commit: a leader cut off from its quorum must not grow without bound.
        """
        self._check_can_propose()
        limit = self._config.max_uncommitted_size
        if limit and self._uncommitted_size and self._uncommitted_size + len(data) > limit:
            raise ProposalDropped(
                f"{self._uncommitted_size} bytes of proposals are waiting to commit"
                f" (max_uncommitted_size {limit})"
            )
        self._uncommitted_size += len(data)
        return self._propose_entry(EntryType.NORMAL, data)

    def propose_conf_change(self, change: ConfChange) -> tuple[int, int]:
        """Append a single-server membership change; it takes effect on append."""
        self._check_can_propose()
        last_conf = self._conf_history[-1][0] if self._conf_history else 0
        if last_conf > self._commit:
            raise ProposalDropped("a membership change is still uncommitted")
        if self.term_at(self._commit) != self._term:
            raise ProposalDropped("the new leader has not committed an entry of its term yet")
        conf = self.conf_state
        node = change.node_id
        if node <= NONE:
            raise ValueError(f"bad node id {node}")
        if change.type is ConfChangeType.ADD_VOTER and node in conf.voters:
            raise ValueError(f"node {node} is already a voter")
        if change.type is ConfChangeType.ADD_LEARNER and node in conf.learners | conf.voters:
            raise ValueError(f"node {node} is already a member")
        if change.type is ConfChangeType.REMOVE_NODE:
            if node not in conf.voters | conf.learners:
                raise ValueError(f"node {node} is not a member")
            if conf.voters == {node}:
                raise ValueError(f"cannot remove node {node}, the last voter")
        return self._propose_entry(EntryType.CONF_CHANGE, change.encode())

    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read point; the answer comes as a ``ReadState`` tagged ``context``."""
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader_id)
        limit = self._config.max_pending_reads
        pending = len(self._reads_waiting_commit) + len(self._reads)
        if limit and pending >= limit:
            raise ProposalDropped(f"{pending} reads are waiting (max_pending_reads {limit})")
        if self.term_at(self._commit) != self._term:
            # Our commit index may lag the true one until our own no-op commits.
            self._reads_waiting_commit.append(context)
            return
        self._start_read(context)

    def transfer_leader(self, to: NodeId) -> None:
        """Hand leadership to voter ``to``: catch it up, then tell it to campaign at once."""
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader_id)
        if to not in self.conf_state.voters:
            raise ValueError(f"node {to} is not a voter and cannot lead")
        if to == self._id or to == self._lead_transferee:
            return
        self._lead_transferee = to
        # The transfer must finish within an election timeout or be abandoned.
        self._election_elapsed = 0
        progress = self._progress[to]
        if progress.match == self.last_index:
            self._send(Message(MessageType.TIMEOUT_NOW, to, self._id, self._term))
        else:
            self._send_append(to)

    def report_unreachable(self, node: NodeId) -> None:
        """The transport could not reach ``node``: stop pipelining to it (and retry a snapshot)."""
        progress = self._progress.get(node)
        if self._role is Role.LEADER and progress is not None:
            if progress.state is not ProgressState.PROBE:
                progress.become_probe()

    def compact(self, index: int, data: bytes) -> Snapshot:
        """Keep the application state ``data`` as of ``index`` as our snapshot and drop the entries it covers.

        ``index`` must be applied; at or below the current snapshot this is a
        no-op returning the current snapshot.
        """
        if index > self._applied:
            raise ValueError(f"cannot compact to {index}: only {self._applied} is applied")
        offset = self._snapshot.metadata.index
        if index <= offset:
            return self._snapshot
        conf = self._conf_at(index)
        snapshot = Snapshot(SnapshotMetadata(index, self.term_at(index), conf), data)
        del self._log[: index - offset]
        self._snapshot = snapshot
        self._conf_base = conf
        self._conf_history = [item for item in self._conf_history if item[0] > index]
        self._unstable_from = max(self._unstable_from, index + 1)
        return snapshot

    def step(self, m: Message) -> None:
        """Take one message from a peer; stale, misaddressed or odd messages are ignored."""
        if m.to != self._id or m.from_ == self._id or m.from_ <= NONE:
            return
        if m.term > self._term:
            if m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
                force = m.context == CAMPAIGN_TRANSFER
                in_lease = (
                    self._config.check_quorum
                    and self._leader_id != NONE
                    and self._election_elapsed < self._config.election_tick
                )
                if in_lease and not force:
                    # We heard from a live leader recently: this candidate is disruptive.
                    return
            if m.type is MessageType.PRE_VOTE:
                pass  # a pre-vote never changes our term
            elif m.type is MessageType.PRE_VOTE_RESPONSE and not m.reject:
                pass  # the pre-vote's term is our next one; we move to it when we win
            elif m.type in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
                self._become_follower(m.term, m.from_)
            else:
                self._become_follower(m.term, NONE)
        elif m.term < self._term:
            if m.type in (MessageType.APPEND, MessageType.HEARTBEAT) and (
                self._config.check_quorum or self._config.pre_vote
            ):
                # A stale leader cut off by a partition: tell it our term so it
                # steps down, since pre-vote keeps us from raising it by campaigning.
                self._send(Message(MessageType.APPEND_RESPONSE, m.from_, self._id, self._term))
            elif m.type is MessageType.PRE_VOTE:
                self._send(
                    Message(
                        MessageType.PRE_VOTE_RESPONSE, m.from_, self._id, self._term, reject=True
                    )
                )
            return

        if m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
            self._handle_vote_request(m)
        elif self._role is Role.LEADER:
            self._step_leader(m)
        elif self._role is Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    # ------------------------------------------------------------ output

    def has_ready(self) -> bool:
        """Whether ``ready()`` has anything for the driver."""
        prev_hard, prev_soft = self._prev_hard_state, self._prev_soft_state
        return bool(
            self._msgs
            or self._read_states
            or self._pending_snapshot is not None
            or self._unstable_from <= self.last_index
            or self._commit > self._applied
            or self._commit != prev_hard.commit
            or self._term != prev_hard.term
            or self._vote != prev_hard.vote
            or self._leader_id != prev_soft.leader
            or self._role is not prev_soft.role
        )

    def ready(self) -> Ready:
        """The next batch of work; carry it out, then call ``advance`` with it."""
        soft = SoftState(self._leader_id, self._role)
        hard = self.hard_state
        offset = self._snapshot.metadata.index
        entries = tuple(self._log[max(self._unstable_from - offset - 1, 0) :])
        snapshot = self._pending_snapshot
        start = self._applied + 1
        if snapshot is not None:
            start = max(start, snapshot.metadata.index + 1)
        committed: list[Entry] = []
        size = 0
        limit = self._config.max_committed_size_per_ready
        for index in range(start, self._commit + 1):
            entry = self._log[index - offset - 1]
            size += len(entry.data)
            if committed and size > limit:
                break
            committed.append(entry)
        prev = self._prev_hard_state
        must_sync = (
            bool(entries)
            or snapshot is not None
            or (hard.term, hard.vote)
            != (
                prev.term,
                prev.vote,
            )
        )
        ready = Ready(
            soft_state=soft if soft != self._prev_soft_state else None,
            hard_state=hard if hard != prev else None,
            entries=entries,
            snapshot=snapshot,
            committed_entries=tuple(committed),
            messages=tuple(self._msgs),
            read_states=tuple(self._read_states),
            must_sync=must_sync,
        )
        self._msgs = []
        self._read_states = []
        return ready

    def advance(self, ready: Ready) -> None:
        """The driver has persisted, sent and applied ``ready``."""
        if ready.soft_state is not None:
            self._prev_soft_state = ready.soft_state
        if ready.hard_state is not None:
            self._prev_hard_state = ready.hard_state
        if ready.entries:
            last = ready.entries[-1]
            # Entries truncated and rewritten since ready() are still unstable;
            # a matching term at the last one means the whole prefix matches.
            if last.index >= self.first_index - 1 and self.term_at(last.index) == last.term:
                self._unstable_from = max(self._unstable_from, last.index + 1)
        if ready.snapshot is not None:
            if ready.snapshot is self._pending_snapshot:
                self._pending_snapshot = None
            self._applied = max(self._applied, ready.snapshot.metadata.index)
        if ready.committed_entries:
            self._applied = max(self._applied, ready.committed_entries[-1].index)

    # ------------------------------------------------------------ log helpers

    def _last_term(self) -> int:
        return self._log[-1].term if self._log else self._snapshot.metadata.term

    def _conf_at(self, index: int) -> ConfState:
        conf = self._conf_base
        for at, state in self._conf_history:
            if at > index:
                break
            conf = state
        return conf

    def _fold_conf(self, entries: Sequence[Entry]) -> bool:
        changed = False
        for entry in entries:
            if entry.type is EntryType.CONF_CHANGE:
                change = _decode_change(entry)
                if change is not None:
                    self._conf_history.append((entry.index, _apply_change(self.conf_state, change)))
                    changed = True
        return changed

    def _append(self, entries: Sequence[Entry]) -> None:
        self._log.extend(entries)
        if self._fold_conf(entries):
            self._on_conf_change()

    def _truncate_from(self, index: int) -> None:
        offset = self._snapshot.metadata.index
        del self._log[index - offset - 1 :]
        self._unstable_from = min(self._unstable_from, index)
        reverted = False
        while self._conf_history and self._conf_history[-1][0] >= index:
            self._conf_history.pop()
            reverted = True
        if reverted:
            self._on_conf_change()

    def _is_up_to_date(self, last_term: int, last_index: int) -> bool:
        mine = self._last_term()
        return last_term > mine or (last_term == mine and last_index >= self.last_index)

    def _find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The last index <= ``index`` whose term is <= ``term``, and that term (0 if compacted)."""
        if index > self.last_index:
            return index, 0
        offset = self._snapshot.metadata.index
        while True:
            if index < offset:
                return index, 0
            at = self.term_at(index)
            if at <= term:
                return index, at
            index -= 1

    # ------------------------------------------------------------ roles

    def _promotable(self) -> bool:
        return self._id in self.conf_state.voters

    def _quorum(self) -> int:
        return len(self.conf_state.voters) // 2 + 1

    def _reset_randomized_timeout(self) -> None:
        tick = self._config.election_tick
        self._randomized_timeout = self._rng.randrange(tick, 2 * tick)

    def _reset(self, term: int) -> None:
        if term != self._term:
            self._term = term
            self._vote = NONE
        self._leader_id = NONE
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._reset_randomized_timeout()
        self._votes = {}
        self._progress = {}
        self._lead_transferee = NONE
        self._uncommitted_size = 0
        self._reads_waiting_commit = []
        self._reads = {}
        self._read_queue.clear()

    def _become_follower(self, term: int, leader: NodeId) -> None:
        self._reset(term)
        self._role = Role.FOLLOWER
        self._leader_id = leader

    def _start_election(self, *, transfer: bool) -> None:
        if self._config.pre_vote and not transfer:
            self._reset(self._term)
            self._role = Role.PRE_CANDIDATE
            self._solicit(MessageType.PRE_VOTE, self._term + 1, b"")
        else:
            self._reset(self._term + 1)
            self._vote = self._id
            self._role = Role.CANDIDATE
            self._solicit(MessageType.VOTE, self._term, CAMPAIGN_TRANSFER if transfer else b"")

    def _solicit(self, kind: MessageType, term: int, context: bytes) -> None:
        self._votes = {self._id: True}
        if self._tally_won():
            self._on_vote_won()
            return
        last_index, last_term = self.last_index, self._last_term()
        for voter in sorted(self.conf_state.voters):
            if voter != self._id:
                self._send(
                    Message(
                        kind,
                        voter,
                        self._id,
                        term,
                        log_term=last_term,
                        index=last_index,
                        context=context,
                    )
                )

    def _tally_won(self) -> bool:
        voters = self.conf_state.voters
        granted = sum(1 for node, ok in self._votes.items() if ok and node in voters)
        return granted >= self._quorum()

    def _tally_lost(self) -> bool:
        voters = self.conf_state.voters
        rejected = sum(1 for node, ok in self._votes.items() if not ok and node in voters)
        return rejected >= self._quorum()

    def _on_vote_won(self) -> None:
        if self._role is Role.PRE_CANDIDATE:
            # A quorum would vote for us: now run the real election.
            self._reset(self._term + 1)
            self._vote = self._id
            self._role = Role.CANDIDATE
            self._solicit(MessageType.VOTE, self._term, b"")
        else:
            self._become_leader()

    def _become_leader(self) -> None:
        self._reset(self._term)
        self._role = Role.LEADER
        self._leader_id = self._id
        self._vote = self._id
        last = self.last_index
        conf = self.conf_state
        for node in conf.voters | conf.learners:
            if node != self._id:
                self._progress[node] = Progress(match=0, next=last + 1)
        entries: list[Entry] = []
        if last == 0:
            # The first leader of a fresh cluster writes the bootstrap voters into
            # the log (as etcd's bootstrap does), so a node joining later with no
            # membership of its own learns the whole of it from the entries.
            for node in sorted(conf.voters):
                change = ConfChange(ConfChangeType.ADD_VOTER, node).encode()
                entries.append(Entry(self._term, len(entries) + 1, EntryType.CONF_CHANGE, change))
        # The no-op lets us commit (and so learn the commit index) in our term.
        entries.append(Entry(self._term, last + len(entries) + 1))
        self._append(entries)
        if not self._maybe_commit():
            self._broadcast_append()

    def _on_conf_change(self) -> None:
        if self._role is not Role.LEADER:
            return
        conf = self.conf_state
        members = conf.voters | conf.learners
        for node in members:
            if node != self._id and node not in self._progress:
                self._progress[node] = Progress(match=0, next=self.last_index)
        for node in list(self._progress):
            if node not in members:
                del self._progress[node]
                if node == self._lead_transferee:
                    self._lead_transferee = NONE
        if self._lead_transferee not in conf.voters:
            self._lead_transferee = NONE

    # ------------------------------------------------------------ sending

    def _send(self, m: Message) -> None:
        if m.to != self._id:
            self._msgs.append(m)

    def _send_append(self, to: NodeId, *, send_if_empty: bool = True) -> bool:
        progress = self._progress[to]
        if progress.is_paused(self._config.max_inflight_msgs):
            return False
        prev_index = progress.next - 1
        if prev_index < self._snapshot.metadata.index:
            self._send(
                Message(
                    MessageType.SNAPSHOT,
                    to,
                    self._id,
                    self._term,
                    snapshot=self._snapshot,
                )
            )
            progress.become_snapshot(self._snapshot.metadata.index)
            return True
        prev_term = self.term_at(prev_index)
        offset = self._snapshot.metadata.index
        start = prev_index - offset
        limit = self._config.max_size_per_msg
        size = 0
        end = start
        while end < len(self._log):
            size += len(self._log[end].data)
            if end > start and size > limit:
                break
            end += 1
        entries = tuple(self._log[start:end])
        if not entries and not send_if_empty:
            return False
        self._send(
            Message(
                MessageType.APPEND,
                to,
                self._id,
                self._term,
                log_term=prev_term,
                index=prev_index,
                entries=entries,
                commit=self._commit,
            )
        )
        if progress.state is ProgressState.REPLICATE:
            if entries:
                progress.next = entries[-1].index + 1
                progress.inflights.append(entries[-1].index)
        elif progress.state is ProgressState.PROBE:
            progress.probe_sent = True
        return True

    def _broadcast_append(self) -> None:
        for node in self._progress:
            self._send_append(node)

    def _broadcast_heartbeat(self, context: bytes) -> None:
        for node, progress in self._progress.items():
            self._send(
                Message(
                    MessageType.HEARTBEAT,
                    node,
                    self._id,
                    self._term,
                    commit=min(progress.match, self._commit),
                    context=context,
                )
            )

    # ------------------------------------------------------------ leader

    def _check_can_propose(self) -> None:
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader_id)
        if self._lead_transferee != NONE:
            raise ProposalDropped(f"leadership is being transferred to {self._lead_transferee}")

    def _propose_entry(self, kind: EntryType, data: bytes) -> tuple[int, int]:
        index = self.last_index + 1
        self._append([Entry(self._term, index, kind, data)])
        if not self._maybe_commit():
            self._broadcast_append()
        return self._term, index

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        for progress in self._progress.values():
            if progress.state is ProgressState.SNAPSHOT:
                progress.snapshot_elapsed += 1
        if self._election_elapsed >= self._config.election_tick:
            self._election_elapsed = 0
            if self._config.check_quorum:
                voters = self.conf_state.voters
                active = sum(
                    1
                    for node in voters
                    if node == self._id
                    or (node in self._progress and self._progress[node].recent_active)
                )
                for progress in self._progress.values():
                    progress.recent_active = False
                if active < self._quorum():
                    self._become_follower(self._term, NONE)
                    return
            if self._lead_transferee != NONE:
                self._lead_transferee = NONE
        if self._heartbeat_elapsed >= self._config.heartbeat_tick:
            self._heartbeat_elapsed = 0
            context = self._read_queue[-1] if self._read_queue else b""
            self._broadcast_heartbeat(context)

    def _maybe_commit(self) -> bool:
        """Advance commit to what a quorum of voters holds, if that entry is of our term."""
        voters = self.conf_state.voters
        if not voters:
            return False
        last = self.last_index
        matches = sorted(
            (last if node == self._id else self._progress[node].match for node in voters),
            reverse=True,
        )
        candidate = matches[self._quorum() - 1]
        if candidate <= self._commit or self.term_at(candidate) != self._term:
            return False
        was_in_term = self.term_at(self._commit) == self._term
        if self._uncommitted_size:
            done = sum(len(e.data) for e in self.entries(self._commit + 1, candidate + 1))
            self._uncommitted_size = max(0, self._uncommitted_size - done)
        self._commit = candidate
        if not was_in_term and self._reads_waiting_commit:
            waiting, self._reads_waiting_commit = self._reads_waiting_commit, []
            for context in waiting:
                self._start_read(context)
        self._broadcast_append()
        last_conf = self._conf_history[-1][0] if self._conf_history else 0
        if self._id not in voters and last_conf <= self._commit:
            self._step_down_removed()
        return True

    def _step_down_removed(self) -> None:
        # Hand over to the most caught-up voter so the cluster need not wait
        # out an election timeout.
        best = max(
            (node for node in self.conf_state.voters if node in self._progress),
            key=lambda node: (self._progress[node].match, -node),
            default=NONE,
        )
        if best != NONE and self._progress[best].match == self.last_index:
            self._send(Message(MessageType.TIMEOUT_NOW, best, self._id, self._term))
        self._become_follower(self._term, NONE)

    def _start_read(self, context: bytes) -> None:
        if context in self._reads:
            return
        request = _ReadRequest(self._commit, {self._id})
        self._reads[context] = request
        self._read_queue.append(context)
        if self._read_acked(request):
            self._release_reads(context)
        else:
            self._broadcast_heartbeat(context)

    def _read_acked(self, request: _ReadRequest) -> bool:
        voters = self.conf_state.voters
        return sum(1 for node in request.acks if node in voters) >= self._quorum()

    def _release_reads(self, upto: bytes) -> None:
        while self._read_queue:
            context = self._read_queue.popleft()
            request = self._reads.pop(context)
            self._read_states.append(ReadState(request.index, context))
            if context == upto:
                return

    def _step_leader(self, m: Message) -> None:
        progress = self._progress.get(m.from_)
        if progress is None:
            return
        if m.type is MessageType.APPEND_RESPONSE:
            progress.recent_active = True
            self._handle_append_response(m, progress)
        elif m.type is MessageType.HEARTBEAT_RESPONSE:
            progress.recent_active = True
            progress.probe_sent = False
            if progress.state is ProgressState.REPLICATE and (
                len(progress.inflights) >= self._config.max_inflight_msgs
            ):
                # Responses to the window may have been lost: let one more through.
                progress.inflights.popleft()
            if (
                progress.state is ProgressState.SNAPSHOT
                and progress.snapshot_elapsed >= self._config.election_tick
            ):
                # The follower is alive but the snapshot never landed: send it again.
                progress.become_probe()
            if progress.match < self.last_index:
                self._send_append(m.from_)
            if m.context and m.context in self._reads:
                request = self._reads[m.context]
                request.acks.add(m.from_)
                if self._read_acked(request):
                    self._release_reads(m.context)

    def _handle_append_response(self, m: Message, progress: Progress) -> None:
        if m.reject:
            probe = m.reject_hint
            if m.log_term > 0:
                probe = self._find_conflict_by_term(m.reject_hint, m.log_term)[0]
            if progress.maybe_decrease_to(m.index, probe):
                if progress.state is ProgressState.REPLICATE:
                    progress.become_probe()
                self._send_append(m.from_)
            return
        was_paused = progress.is_paused(self._config.max_inflight_msgs)
        if progress.maybe_update(m.index):
            if progress.state is ProgressState.PROBE:
                progress.become_replicate()
            elif (
                progress.state is ProgressState.SNAPSHOT and progress.match + 1 >= self.first_index
            ):
                progress.become_probe()
                progress.become_replicate()
            elif progress.state is ProgressState.REPLICATE:
                progress.free_up_to(m.index)
            if not self._maybe_commit() and was_paused:
                self._send_append(m.from_)
            # Pipeline: keep filling the window while there is something to send.
            while self._role is Role.LEADER and m.from_ in self._progress:
                if not self._send_append(m.from_, send_if_empty=False):
                    break
            if (
                self._role is Role.LEADER
                and m.from_ == self._lead_transferee
                and progress.match == self.last_index
            ):
                self._send(Message(MessageType.TIMEOUT_NOW, m.from_, self._id, self._term))
        elif progress.state is ProgressState.REPLICATE:
            progress.free_up_to(m.index)

    # ------------------------------------------------------------ follower / candidate

    def _handle_vote_request(self, m: Message) -> None:
        pre = m.type is MessageType.PRE_VOTE
        can_vote = (
            self._vote == m.from_
            or (self._vote == NONE and self._leader_id == NONE)
            or (pre and m.term > self._term)
        )
        response = MessageType.PRE_VOTE_RESPONSE if pre else MessageType.VOTE_RESPONSE
        if can_vote and self._is_up_to_date(m.log_term, m.index):
            # Answer in the candidate's term so a pre-candidate can count it.
            self._send(Message(response, m.from_, self._id, m.term))
            if not pre:
                self._election_elapsed = 0
                self._vote = m.from_
        else:
            self._send(Message(response, m.from_, self._id, self._term, reject=True))

    def _step_follower(self, m: Message) -> None:
        if m.type in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
            self._election_elapsed = 0
            self._leader_id = m.from_
            if m.type is MessageType.APPEND:
                self._handle_append(m)
            elif m.type is MessageType.HEARTBEAT:
                self._handle_heartbeat(m)
            else:
                self._handle_snapshot(m)
        elif m.type is MessageType.TIMEOUT_NOW and m.from_ == self._leader_id:
            if self._promotable():
                self._start_election(transfer=True)

    def _step_candidate(self, m: Message) -> None:
        if m.type in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
            # Someone won this term; follow it.
            self._become_follower(self._term, m.from_)
            self._step_follower(m)
            return
        expected = (
            MessageType.PRE_VOTE_RESPONSE
            if self._role is Role.PRE_CANDIDATE
            else MessageType.VOTE_RESPONSE
        )
        if m.type is not expected:
            return
        if self._role is Role.PRE_CANDIDATE and not m.reject and m.term != self._term + 1:
            return
        self._votes.setdefault(m.from_, not m.reject)
        if self._tally_won():
            self._on_vote_won()
        elif self._tally_lost():
            self._become_follower(self._term, NONE)

    def _handle_append(self, m: Message) -> None:
        if m.index < self._commit:
            self._send(
                Message(
                    MessageType.APPEND_RESPONSE, m.from_, self._id, self._term, index=self._commit
                )
            )
            return
        entries = m.entries
        if not _well_formed_append(m):
            # No leader sends this; taking it would break the log's contiguity
            # (and halt the driver when it persists the gap), so drop it.
            return
        if m.index <= self.last_index and self.term_at(m.index) == m.log_term:
            last_new = m.index + len(entries)
            conflict = 0
            for entry in entries:
                if entry.index > self.last_index or self.term_at(entry.index) != entry.term:
                    conflict = entry.index
                    break
            if conflict:
                if conflict <= self._commit:
                    return  # never rewrite a committed entry, whoever asks
                if conflict <= self.last_index:
                    self._truncate_from(conflict)
                self._append(entries[conflict - m.index - 1 :])
            self._commit_to(min(m.commit, last_new))
            self._send(
                Message(MessageType.APPEND_RESPONSE, m.from_, self._id, self._term, index=last_new)
            )
            return
        hint_index, hint_term = self._find_conflict_by_term(
            min(m.index, self.last_index), m.log_term
        )
        self._send(
            Message(
                MessageType.APPEND_RESPONSE,
                m.from_,
                self._id,
                self._term,
                index=m.index,
                reject=True,
                reject_hint=hint_index,
                log_term=hint_term,
            )
        )

    def _commit_to(self, index: int) -> None:
        index = min(index, self.last_index)
        if index > self._commit:
            self._commit = index

    def _handle_heartbeat(self, m: Message) -> None:
        self._commit_to(m.commit)
        self._send(
            Message(
                MessageType.HEARTBEAT_RESPONSE, m.from_, self._id, self._term, context=m.context
            )
        )

    def _handle_snapshot(self, m: Message) -> None:
        snapshot = m.snapshot
        if snapshot is None or snapshot.is_empty:
            return
        meta = snapshot.metadata
        if meta.index > self._commit:
            if meta.index <= self.last_index and self.term_at(meta.index) == meta.term:
                # We already hold everything it covers: just learn the commit.
                self._commit = meta.index
            else:
                self._restore(snapshot)
        # After a restore our commit is the snapshot's index; either way it is
        # what we now hold for certain.
        self._send(
            Message(MessageType.APPEND_RESPONSE, m.from_, self._id, self._term, index=self._commit)
        )

    def _restore(self, snapshot: Snapshot) -> None:
        self._log = []
        self._snapshot = snapshot
        self._pending_snapshot = snapshot
        self._conf_base = snapshot.metadata.conf_state
        self._conf_history = []
        self._commit = snapshot.metadata.index
        self._unstable_from = snapshot.metadata.index + 1
