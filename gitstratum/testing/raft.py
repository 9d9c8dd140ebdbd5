"""An in-memory stand-in for what a Raft driver makes durable, for tests that drive pure cores.

The real log is ``gitstratum.raft.log.LMDBRaftLog``; tests of the core that
only need the persisted state (to restart a core from it, or to model a crash
that loses what was not synced) keep it here instead.
"""

from __future__ import annotations

import attrs

from gitstratum.raft.types import Entry, HardState, Ready, Snapshot

__all__ = ["MemoryDisk"]


@attrs.define
class MemoryDisk:
    """A node's persisted hard state, snapshot and entries, with ``IRaftLog``'s truncation rules."""

    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    entries: list[Entry] = attrs.Factory(list)

    def save(self, ready: Ready) -> None:
        """Persist a Ready as a driver would: snapshot, then entries (truncating), then hard state."""
        if ready.snapshot is not None:
            self.snapshot = ready.snapshot
            self.entries = []
        if ready.entries:
            first = ready.entries[0].index
            if self.entries:
                del self.entries[max(first - self.entries[0].index, 0) :]
            self.entries.extend(ready.entries)
        if ready.hard_state is not None:
            self.hard_state = ready.hard_state

    def compact(self, snapshot: Snapshot) -> None:
        """Keep *snapshot* and drop the entries it covers."""
        self.snapshot = snapshot
        self.entries = [e for e in self.entries if e.index > snapshot.metadata.index]

    def copy(self) -> MemoryDisk:
        return MemoryDisk(self.hard_state, self.snapshot, list(self.entries))
