"""The seams of the Raft library: the durable log, the transport, and the replicated state machine.

The driver (``gitstratum.raft.node``) is written against these, so the
simulator, the tests and the real processes can supply their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from zope.interface import Attribute, Interface

from gitstratum.raft.types import Entry, HardState, Message, NodeId, Snapshot

__all__ = ["IRaftLog", "IRaftTransport", "IStateMachine"]


class IRaftLog(Interface):
    """Durable Raft state: hard state, log entries and the latest snapshot.

    Writes are buffered until ``sync``; a crash loses anything not synced.
    All methods block (LMDB); they are fast enough for the reactor thread at
    Raft's batch sizes, and the driver calls them there.
    """

    def load() -> tuple[HardState, Snapshot | None, Sequence[Entry]]:
        """Everything needed to rebuild a core after a restart: hard state,
        the latest snapshot (``None`` if there is none) and the entries after it."""

    def append(entries: Sequence[Entry]) -> None:
        """Append ``entries``; if the first one's index is already stored, drop
        the stored entries from that index on first (truncation)."""

    def set_hard_state(hard_state: HardState) -> None:
        """Replace the stored hard state."""

    def apply_snapshot(snapshot: Snapshot) -> None:
        """Store ``snapshot`` (metadata and data) and drop every entry up to
        ``snapshot.metadata.index``; entries after it are dropped too unless
        they match in term (as a received InstallSnapshot demands)."""

    def compact(snapshot: Snapshot) -> None:
        """Store a snapshot the application made itself and drop the entries it covers."""

    def sync() -> None:
        """Make every write so far durable (one fsync)."""

    def close() -> None:
        """Release the environment."""


class IRaftTransport(Interface):
    """Carries messages between nodes; delivery is best-effort (Raft tolerates loss)."""

    def send(messages: Sequence[Message]) -> None:
        """Queue ``messages`` for their ``to`` nodes; never blocks, never raises for an unreachable peer."""

    def set_receiver(receiver: Callable[[Message], None]) -> None:
        """Deliver every incoming message to ``receiver`` (on the reactor thread)."""

    def set_peers(peers: dict[NodeId, str]) -> None:
        """Replace the known peer addresses (endpoint strings, for example ``tcp:127.0.0.2:7000``)."""

    unreachable = Attribute(
        "A callable hook, ``(NodeId) -> None``, the transport calls when a peer "
        "cannot be reached, so the driver can tell the core (``report_unreachable``)."
    )


class IStateMachine(Interface):
    """The application Raft replicates."""

    def apply(index: int, data: bytes) -> object:
        """Apply one committed NORMAL entry and return its result (handed to the proposer)."""

    def query(request: bytes) -> object:
        """Answer a read against the current applied state (called once a read index is applied)."""

    def snapshot() -> bytes:
        """Serialize the applied state (for compaction and InstallSnapshot)."""

    def restore(data: bytes) -> None:
        """Replace the state with a snapshot's data."""
