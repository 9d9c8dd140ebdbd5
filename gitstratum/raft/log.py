"""The durable Raft log: hard state, entries and the latest snapshot in one LMDB environment.

Every write since the last ``sync`` goes into one open LMDB write
transaction, and ``sync`` commits it.  That makes a batch atomic and makes
the crash guarantee exact: after a crash (or ``close`` without ``sync``),
``load`` returns precisely the state as of the last ``sync`` that returned;
a crash during ``sync`` leaves either the previous state or the new one,
never a mix.  Reads (``load``) before ``sync`` see the unsynced writes,
because they run in that same transaction.

The commit is LMDB's durable one (the default ``sync=True`` and
``metasync=True``): one fdatasync of the data pages, then a write of the
meta page that points at them through a descriptor opened ``O_DSYNC``.
That ordered pair is the barrier that makes a commit atomic on power loss,
so it stays.  ``metasync=False`` would keep the file consistent but could
undo the last commit after an OS crash (a vote or an acknowledged entry
forgotten); ``sync=False`` plus one ``env.sync()`` could leave the meta
page on disk pointing at pages that never reached it.  The saving Raft
needs is in batching: everything since the last sync is one transaction
and one flush, however many calls it took.

An LMDB write transaction belongs to the thread that began it, so the
writes between two syncs must come from one thread (the reactor thread, as
``IRaftLog`` says); crossing threads raises ``RuntimeError``.
"""

from __future__ import annotations

import functools
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from typing import Concatenate, ParamSpec

import attrs
import lmdb
from zope.interface import implementer

from gitstratum.lmdbutil import delete_prefix, iter_prefix, open_env
from gitstratum.raft.interfaces import IRaftLog
from gitstratum.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMetadata,
)

__all__ = ["LMDBRaftLog", "CorruptRaftLog", "FORMAT_VERSION"]

#: The on-disk layout version, checked on open.
FORMAT_VERSION = 2

#: Snapshot data is stored in chunks of this size, so a large snapshot is
#: many ordinary overflow runs rather than one huge contiguous one that the
#: free list struggles to place.
SNAPSHOT_CHUNK = 1 << 20

_INDEX = struct.Struct(">Q")
_ENTRY = struct.Struct(">QBI")  # term, type, CRC-32 of (index, term, type, data), then the data
_HARD = struct.Struct(">QQQ")  # term, vote, commit
_SNAP = struct.Struct(">QQQI")  # index, term, data length, data CRC-32, then the conf state
_COUNT = struct.Struct(">I")
_FORMAT = struct.Struct(">I")

_HARD_KEY = b"hard"
_FORMAT_KEY = b"format"
_SNAP_META_KEY = b"meta"
_SNAP_DATA_PREFIX = b"data"


class CorruptRaftLog(Exception):
    """The stored log is not one this code wrote: a wrong format version or a hole in the entries."""


def _entry_crc(index: int, term: int, entry_type: int, data: bytes | memoryview) -> int:
    # The index is in the sum, so a value found under the wrong key fails too.
    return zlib.crc32(data, zlib.crc32(_ENTRY_KEYED.pack(index, term, entry_type)))


_ENTRY_KEYED = struct.Struct(">QQB")


def _encode_entry(entry: Entry) -> bytes:
    crc = _entry_crc(entry.index, entry.term, int(entry.type), entry.data)
    return _ENTRY.pack(entry.term, int(entry.type), crc) + entry.data


def _decode_entry(index: int, value: bytes | memoryview) -> Entry:
    term, entry_type, crc = _ENTRY.unpack_from(value)
    data = bytes(value[_ENTRY.size :])
    if _entry_crc(index, term, entry_type, data) != crc:
        raise CorruptRaftLog(f"raft log entry {index} fails its checksum")
    return Entry(term, index, EntryType(entry_type), data)


def _encode_ids(ids: frozenset[int]) -> bytes:
    ordered = sorted(ids)
    return _COUNT.pack(len(ordered)) + b"".join(_INDEX.pack(i) for i in ordered)


def _decode_ids(value: bytes | memoryview, pos: int) -> tuple[frozenset[int], int]:
    (n,) = _COUNT.unpack_from(value, pos)
    pos += _COUNT.size
    ids = frozenset(_INDEX.unpack_from(value, pos + i * _INDEX.size)[0] for i in range(n))
    return ids, pos + n * _INDEX.size


def _encode_snapshot_meta(snapshot: Snapshot) -> bytes:
    meta = snapshot.metadata
    return (
        _SNAP.pack(meta.index, meta.term, len(snapshot.data), zlib.crc32(snapshot.data))
        + _encode_ids(meta.conf_state.voters)
        + _encode_ids(meta.conf_state.learners)
    )


_P = ParamSpec("_P")


def _writes(
    method: Callable[Concatenate[LMDBRaftLog, _P], None],
) -> Callable[Concatenate[LMDBRaftLog, _P], None]:
    """On an LMDB error (a full map, a disk error) abandon the unsynced batch, which LMDB cannot
    continue, so the log is again what was last synced, and re-raise."""

    @functools.wraps(method)
    def wrapper(self: LMDBRaftLog, *args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            method(self, *args, **kwargs)
        except lmdb.Error:
            self._abandon()
            raise

    return wrapper


@implementer(IRaftLog)
@attrs.define(eq=False)
class LMDBRaftLog:
    """``IRaftLog`` in the LMDB environment in directory ``path`` (created if missing)."""

    path: str
    map_size: int = attrs.field(default=1 << 34, kw_only=True)
    _env: lmdb.Environment = attrs.field(init=False)
    _entries: lmdb._Database = attrs.field(init=False)
    _state: lmdb._Database = attrs.field(init=False)
    _snapshots: lmdb._Database = attrs.field(init=False)
    _txn: lmdb.Transaction | None = attrs.field(init=False, default=None)
    _txn_thread: int = attrs.field(init=False, default=0)
    # The logical log, kept so appends and compactions are checked when called:
    _snap_index: int = attrs.field(init=False, default=0)
    _last_index: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._env = open_env(self.path, map_size=self.map_size, max_dbs=3)
        self._entries = self._env.open_db(b"entries")
        self._state = self._env.open_db(b"state")
        self._snapshots = self._env.open_db(b"snapshot")
        with self._env.begin(write=True) as txn:
            stored = txn.get(_FORMAT_KEY, db=self._state)
            if stored is None:
                txn.put(_FORMAT_KEY, _FORMAT.pack(FORMAT_VERSION), db=self._state)
            elif _FORMAT.unpack(stored)[0] != FORMAT_VERSION:
                self._env.close()
                raise CorruptRaftLog(
                    f"raft log {self.path} has format {_FORMAT.unpack(stored)[0]}, "
                    f"this code reads format {FORMAT_VERSION}"
                )
        self._read_bounds()

    # -- IRaftLog -----------------------------------------------------------

    def load(self) -> tuple[HardState, Snapshot | None, Sequence[Entry]]:
        """Hard state, latest snapshot (or ``None``) and the entries after it, unsynced writes included."""
        if self._txn is not None:
            return self._load(self._write_txn())
        with self._env.begin() as txn:
            return self._load(txn)

    @_writes
    def append(self, entries: Sequence[Entry]) -> None:
        """Append ``entries`` (consecutive indexes), first dropping any stored entries from the first index on.

        Entries at or below the snapshot index are already covered by it and
        are skipped.  ``ValueError`` if the entries are not consecutive or
        would leave a hole after the last stored entry.
        """
        for previous, entry in zip(entries, entries[1:], strict=False):
            if entry.index != previous.index + 1:
                raise ValueError(
                    f"raft log append: entries not consecutive ({previous.index} then {entry.index})"
                )
        fresh = [e for e in entries if e.index > self._snap_index]
        if not fresh:
            return
        first = fresh[0].index
        if first > self._last_index + 1:
            raise ValueError(
                f"raft log append: entry {first} would leave a hole after the last stored entry {self._last_index}"
            )
        txn = self._write_txn()
        if first <= self._last_index:
            self._delete_entries_from(txn, first)
        for entry in fresh:
            txn.put(_INDEX.pack(entry.index), _encode_entry(entry), db=self._entries, append=True)
        self._last_index = fresh[-1].index

    @_writes
    def set_hard_state(self, hard_state: HardState) -> None:
        """Replace the stored hard state."""
        self._write_txn().put(
            _HARD_KEY,
            _HARD.pack(hard_state.term, hard_state.vote, hard_state.commit),
            db=self._state,
        )

    @_writes
    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Store a received snapshot; keep the entries after it only if the log agrees at its index.

        ``ValueError`` if it is older than the stored snapshot.
        """
        meta = snapshot.metadata
        self._check_not_stale(snapshot, "apply")
        txn = self._write_txn()
        stored = txn.get(_INDEX.pack(meta.index), db=self._entries)
        keeps_tail = stored is not None and _ENTRY.unpack_from(stored)[0] == meta.term
        if keeps_tail:
            self._delete_entries_through(txn, meta.index)
        else:
            self._delete_entries_from(txn, 0)
            self._last_index = meta.index
        self._put_snapshot(txn, snapshot)

    @_writes
    def compact(self, snapshot: Snapshot) -> None:
        """Store a snapshot the application made at a stored index and drop the entries it covers.

        ``ValueError`` if it is older than the stored snapshot, past the last
        stored entry, or disagrees with the stored entry's term at its index.
        """
        meta = snapshot.metadata
        self._check_not_stale(snapshot, "compact to")
        if meta.index > self._last_index:
            raise ValueError(
                f"raft log compact: snapshot index {meta.index} is past the last stored entry {self._last_index}"
            )
        txn = self._write_txn()
        if meta.index > self._snap_index:
            stored = txn.get(_INDEX.pack(meta.index), db=self._entries)
            assert stored is not None, f"raft log has no entry {meta.index} below its last index"
            stored_term = _ENTRY.unpack_from(stored)[0]
            if stored_term != meta.term:
                raise ValueError(
                    f"raft log compact: snapshot term {meta.term} at index {meta.index}, "
                    f"but the stored entry has term {stored_term}"
                )
        self._delete_entries_through(txn, meta.index)
        self._put_snapshot(txn, snapshot)

    @_writes
    def sync(self) -> None:
        """Commit every write since the last sync in one durable LMDB transaction; a no-op if there are none."""
        if self._txn is None:
            return
        self._write_txn().commit()
        self._txn = None

    def close(self) -> None:
        """Release the environment, discarding unsynced writes exactly as a crash would; call ``sync`` first to keep them."""
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        self._env.close()

    # -- helpers ------------------------------------------------------------

    def _write_txn(self) -> lmdb.Transaction:
        if self._txn is None:
            self._txn = self._env.begin(write=True)
            self._txn_thread = threading.get_ident()
        elif self._txn_thread != threading.get_ident():
            raise RuntimeError(
                "raft log used from two threads between syncs: an LMDB write transaction "
                "belongs to the thread that began it"
            )
        return self._txn

    def _abandon(self) -> None:
        if self._txn is not None:
            txn, self._txn = self._txn, None
            txn.abort()
        self._read_bounds()

    def _read_bounds(self) -> None:
        """Set the logical snapshot and last index from what is committed."""
        with self._env.begin() as txn:
            stored = self._read_snapshot_meta(txn)
            self._snap_index = stored[0].index if stored is not None else 0
            cursor = txn.cursor(self._entries)
            self._last_index = _INDEX.unpack(cursor.key())[0] if cursor.last() else self._snap_index

    def _check_not_stale(self, snapshot: Snapshot, verb: str) -> None:
        if snapshot.metadata.index < self._snap_index:
            raise ValueError(
                f"raft log cannot {verb} snapshot {snapshot.metadata.index}: "
                f"it is older than the stored snapshot {self._snap_index}"
            )

    def _delete_entries_from(self, txn: lmdb.Transaction, index: int) -> None:
        cursor = txn.cursor(self._entries)
        if cursor.set_range(_INDEX.pack(index)):
            # Cursor.delete moves to the next record; past the last one the
            # cursor is unpositioned and key() is empty.
            while cursor.key() and cursor.delete():
                pass
        self._last_index = max(index - 1, self._snap_index)

    def _delete_entries_through(self, txn: lmdb.Transaction, index: int) -> None:
        cursor = txn.cursor(self._entries)
        if cursor.first():
            while cursor.key() and _INDEX.unpack(cursor.key())[0] <= index:
                if not cursor.delete():
                    break
        self._last_index = max(self._last_index, index)

    def _put_snapshot(self, txn: lmdb.Transaction, snapshot: Snapshot) -> None:
        delete_prefix(txn, self._snapshots, _SNAP_DATA_PREFIX)
        txn.put(_SNAP_META_KEY, _encode_snapshot_meta(snapshot), db=self._snapshots)
        data = memoryview(snapshot.data)
        for n, start in enumerate(range(0, len(data), SNAPSHOT_CHUNK)):
            txn.put(
                _SNAP_DATA_PREFIX + _COUNT.pack(n),
                data[start : start + SNAPSHOT_CHUNK],
                db=self._snapshots,
            )
        self._snap_index = snapshot.metadata.index

    def _read_snapshot_meta(
        self, txn: lmdb.Transaction
    ) -> tuple[SnapshotMetadata, int, int] | None:
        """The stored snapshot's metadata, data length and data CRC-32, or ``None`` if there is none."""
        value = txn.get(_SNAP_META_KEY, db=self._snapshots)
        if value is None:
            return None
        index, term, length, crc = _SNAP.unpack_from(value)
        voters, pos = _decode_ids(value, _SNAP.size)
        learners, _ = _decode_ids(value, pos)
        return SnapshotMetadata(index, term, ConfState(voters, learners)), length, crc

    def _load(self, txn: lmdb.Transaction) -> tuple[HardState, Snapshot | None, list[Entry]]:
        raw = txn.get(_HARD_KEY, db=self._state)
        hard_state = HardState(*_HARD.unpack(raw)) if raw is not None else HardState()
        snapshot = None
        stored = self._read_snapshot_meta(txn)
        if stored is not None:
            meta, length, crc = stored
            data = b"".join(v for _, v in iter_prefix(txn, self._snapshots, _SNAP_DATA_PREFIX))
            if len(data) != length:
                raise CorruptRaftLog(
                    f"raft log {self.path}: snapshot data is {len(data)} bytes, its metadata says {length}"
                )
            if zlib.crc32(data) != crc:
                raise CorruptRaftLog(f"raft log {self.path}: snapshot data fails its checksum")
            snapshot = Snapshot(meta, data)
        expected = self._snap_index + 1
        entries = []
        for key, value in txn.cursor(self._entries).iternext():
            index = _INDEX.unpack(key)[0]
            if index != expected:
                raise CorruptRaftLog(
                    f"raft log {self.path}: expected entry {expected}, found entry {index}"
                )
            entries.append(_decode_entry(index, value))
            expected += 1
        if snapshot is not None and snapshot.is_empty:
            snapshot = None
        return hard_state, snapshot, entries
