"""The values every part of the Raft library shares: entries, messages, hard state, snapshots, ready batches.

These are plain frozen values with no behaviour.  The pure core
(``gitstratum.raft.core``) produces and consumes them; the log
(``gitstratum.raft.log``) stores entries, hard state and snapshots; the codec
and transport (``gitstratum.raft.codec``, ``gitstratum.raft.transport``)
carry messages; the simulator and the driver move them between cores.

Node ids are positive integers; ``NONE`` (0) means "no node" (no vote cast,
no known leader).
"""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "NONE",
    "NodeId",
    "EntryType",
    "Entry",
    "HardState",
    "ConfChangeType",
    "ConfChange",
    "ConfState",
    "SnapshotMetadata",
    "Snapshot",
    "MessageType",
    "Message",
    "Role",
    "SoftState",
    "ReadState",
    "Ready",
    "RaftError",
    "NotLeader",
    "ProposalDropped",
    "CompactedError",
]

NodeId = int
NONE: NodeId = 0


class EntryType(enum.IntEnum):
    """What a log entry carries."""

    #: application data (``data`` is handed to the state machine); an empty
    #: ``data`` is the no-op a new leader appends to commit its term
    NORMAL = 0
    #: a membership change: ``data`` is ``ConfChange.encode()``
    CONF_CHANGE = 1


@attrs.frozen
class Entry:
    """One log entry."""

    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""


@attrs.frozen
class HardState:
    """What must be on disk before any message that depends on it is sent."""

    term: int = 0
    vote: NodeId = NONE
    commit: int = 0


class ConfChangeType(enum.IntEnum):
    """A single-server membership change."""

    ADD_VOTER = 0
    ADD_LEARNER = 1
    REMOVE_NODE = 2


@attrs.frozen
class ConfChange:
    """One membership change, proposed through the log like any entry."""

    type: ConfChangeType
    node_id: NodeId

    def encode(self) -> bytes:
        """A fixed 9-byte form: the type, then the node id as 8 big-endian bytes."""
        return bytes([int(self.type)]) + self.node_id.to_bytes(8, "big")

    @classmethod
    def decode(cls, data: bytes) -> ConfChange:
        """The inverse of ``encode``; ``ValueError`` for anything else."""
        if len(data) != 9:
            raise ValueError(f"bad conf change: {len(data)} bytes")
        return cls(ConfChangeType(data[0]), int.from_bytes(data[1:], "big"))


@attrs.frozen
class ConfState:
    """The membership: who votes and who only replicates."""

    voters: frozenset[NodeId] = frozenset()
    learners: frozenset[NodeId] = frozenset()


@attrs.frozen
class SnapshotMetadata:
    """Where a snapshot sits in the log, and the membership as of that point."""

    index: int = 0
    term: int = 0
    conf_state: ConfState = ConfState()


@attrs.frozen
class Snapshot:
    """Application state up to and including ``metadata.index``; ``data`` is opaque to Raft."""

    metadata: SnapshotMetadata = SnapshotMetadata()
    data: bytes = b""

    @property
    def is_empty(self) -> bool:
        return self.metadata.index == 0


class MessageType(enum.IntEnum):
    """Every message the cores exchange (etcd-raft's set, less local-only ones)."""

    APPEND = 1
    APPEND_RESPONSE = 2
    VOTE = 3
    VOTE_RESPONSE = 4
    PRE_VOTE = 5
    PRE_VOTE_RESPONSE = 6
    HEARTBEAT = 7
    HEARTBEAT_RESPONSE = 8
    SNAPSHOT = 9  # InstallSnapshot: ``snapshot`` holds the whole snapshot
    READ_INDEX = 10  # a follower asking the leader for a read index (``context``)
    READ_INDEX_RESPONSE = 11  # the leader's answer: ``index`` and the same ``context``
    TIMEOUT_NOW = 12  # leadership transfer: campaign now, ignoring the lease


@attrs.frozen
class Message:
    """One Raft message; fields a type does not use keep their defaults.

    The field meanings follow etcd-raft's ``raftpb.Message``: ``log_term``
    and ``index`` locate the entry preceding ``entries`` (APPEND) or the
    candidate's last entry (VOTE, PRE_VOTE); ``reject_hint`` and
    ``log_term`` in a rejecting APPEND_RESPONSE carry the fast-backtracking
    hint; ``context`` carries a ReadIndex request id or a campaign reason.
    """

    type: MessageType
    to: NodeId
    from_: NodeId
    term: int = 0
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    context: bytes = b""


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@attrs.frozen
class SoftState:
    """What need not be persisted but the driver wants to know: who leads, and our role."""

    leader: NodeId = NONE
    role: Role = Role.FOLLOWER


@attrs.frozen
class ReadState:
    """A ReadIndex answer: once ``index`` is applied, a read tagged ``context`` is linearizable."""

    index: int
    context: bytes


@attrs.frozen
class Ready:
    """One batch of work for the driver, in etcd's order.

    1. Persist ``snapshot`` (if any), then append ``entries`` and save
       ``hard_state`` (if any); fsync when ``must_sync``.
    2. Send ``messages``.
    3. Restore the state machine from ``snapshot`` (if any), then apply
       ``committed_entries`` in order and answer ``read_states`` whose index
       is applied.
    4. Call ``core.advance(ready)``.

    ``entries`` may start at an index already in the stored log: the stored
    log must then be truncated from that index before appending (a follower
    overwriting a deposed leader's uncommitted tail).
    """

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    committed_entries: tuple[Entry, ...] = ()
    messages: tuple[Message, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    must_sync: bool = False


class RaftError(Exception):
    """Base for the errors the core raises to its caller."""


class NotLeader(RaftError):
    """This node cannot take the request because it is not the leader; ``leader_hint`` may be ``NONE``."""

    def __init__(self, leader_hint: NodeId = NONE) -> None:
        super().__init__(
            f"not the leader (leader is {leader_hint})"
            if leader_hint
            else "not the leader (no leader known)"
        )
        self.leader_hint = leader_hint


class ProposalDropped(RaftError):
    """The proposal was refused: a leadership transfer is in progress, or a conf change is already pending."""


class CompactedError(RaftError):
    """The requested log index was compacted into a snapshot."""
