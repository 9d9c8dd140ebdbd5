"""The LMDB Raft log: appends and truncation, hard state, snapshots, compaction, and what survives a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from gitstratum.raft.interfaces import IRaftLog
from gitstratum.raft.log import SNAPSHOT_CHUNK, CorruptRaftLog, LMDBRaftLog
from gitstratum.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMetadata,
)

_MAP = 1 << 26


def _log(tmp_path: Path) -> LMDBRaftLog:
    return LMDBRaftLog(str(tmp_path / "raft"), map_size=_MAP)


def _entries(first: int, last: int, term: int) -> list[Entry]:
    return [
        Entry(term, i, EntryType.NORMAL, f"e{i}t{term}".encode()) for i in range(first, last + 1)
    ]


def _snapshot(index: int, term: int, data: bytes = b"state") -> Snapshot:
    conf = ConfState(voters=frozenset({1, 2, 3}), learners=frozenset({4}))
    return Snapshot(SnapshotMetadata(index, term, conf), data)


@pytest.fixture
def log(tmp_path: Path):
    log = _log(tmp_path)
    yield log
    log.close()


def test_provides_the_interface(log: LMDBRaftLog) -> None:
    """LMDBRaftLog satisfies IRaftLog as declared."""
    assert verifyObject(IRaftLog, log)


def test_empty_log_loads_defaults(log: LMDBRaftLog) -> None:
    """A fresh log has the zero hard state, no snapshot and no entries."""
    assert log.load() == (HardState(), None, [])


def test_append_then_load(log: LMDBRaftLog) -> None:
    """Appended entries come back in order with their terms, types and data."""
    entries = [*_entries(1, 3, 1), Entry(2, 4, EntryType.CONF_CHANGE, b"\x00" * 9)]
    log.append(entries)
    log.sync()
    assert log.load()[2] == entries


def test_append_at_a_stored_index_truncates(log: LMDBRaftLog) -> None:
    """Appending from an index already stored drops that entry and everything after it first."""
    log.append(_entries(1, 5, 1))
    log.append(_entries(3, 4, 2))
    log.sync()
    assert log.load()[2] == _entries(1, 2, 1) + _entries(3, 4, 2)


def test_append_rejects_holes_and_non_consecutive_batches(log: LMDBRaftLog) -> None:
    """A batch that skips an index, or starts past the end of the log, is refused."""
    log.append(_entries(1, 2, 1))
    with pytest.raises(ValueError, match="would leave a hole after the last stored entry 2"):
        log.append(_entries(4, 5, 1))
    with pytest.raises(ValueError, match="not consecutive"):
        log.append([Entry(1, 3), Entry(1, 5)])
    assert log.load()[2] == _entries(1, 2, 1)


def test_append_empty_is_a_no_op(log: LMDBRaftLog) -> None:
    """Appending nothing changes nothing and leaves nothing to sync."""
    log.append([])
    assert log.load() == (HardState(), None, [])


def test_hard_state_round_trip(tmp_path: Path) -> None:
    """The last hard state set and synced is the one loaded, across a reopen."""
    log = _log(tmp_path)
    log.set_hard_state(HardState(term=3, vote=2, commit=1))
    log.set_hard_state(HardState(term=5, vote=3, commit=4))
    log.sync()
    log.close()
    log = _log(tmp_path)
    assert log.load()[0] == HardState(term=5, vote=3, commit=4)
    log.close()


def test_compact_keeps_entries_after_the_snapshot(log: LMDBRaftLog) -> None:
    """Compaction stores the snapshot and drops exactly the entries it covers."""
    log.append(_entries(1, 10, 1))
    log.compact(_snapshot(6, 1))
    log.sync()
    hard, snapshot, entries = log.load()
    assert snapshot == _snapshot(6, 1)
    assert entries == _entries(7, 10, 1)


def test_compact_refuses_inconsistent_snapshots(log: LMDBRaftLog) -> None:
    """A compaction past the log's end, with the wrong term, or older than the stored snapshot is refused."""
    log.append(_entries(1, 5, 2))
    with pytest.raises(ValueError, match="past the last stored entry 5"):
        log.compact(_snapshot(6, 2))
    with pytest.raises(
        ValueError, match="snapshot term 1 at index 3, but the stored entry has term 2"
    ):
        log.compact(_snapshot(3, 1))
    log.compact(_snapshot(4, 2))
    with pytest.raises(ValueError, match="older than the stored snapshot 4"):
        log.compact(_snapshot(3, 2))
    assert log.load()[1] == _snapshot(4, 2)


def test_apply_snapshot_keeps_a_matching_tail(log: LMDBRaftLog) -> None:
    """A received snapshot whose index and term match a stored entry keeps the entries after it."""
    log.append(_entries(1, 8, 1))
    log.apply_snapshot(_snapshot(5, 1))
    log.sync()
    assert log.load()[1:] == (_snapshot(5, 1), _entries(6, 8, 1))


def test_apply_snapshot_drops_a_conflicting_log(log: LMDBRaftLog) -> None:
    """A received snapshot that disagrees with the stored entry at its index replaces the whole log."""
    log.append(_entries(1, 8, 1))
    log.apply_snapshot(_snapshot(5, 2))
    log.sync()
    assert log.load()[1:] == (_snapshot(5, 2), [])
    # The log now continues right after the snapshot.
    log.append(_entries(6, 6, 2))
    assert log.load()[2] == _entries(6, 6, 2)


def test_apply_snapshot_past_the_end_replaces_the_log(log: LMDBRaftLog) -> None:
    """A snapshot beyond the last entry (a lagging follower) leaves an empty log after it."""
    log.append(_entries(1, 3, 1))
    log.apply_snapshot(_snapshot(20, 4))
    log.sync()
    assert log.load()[1:] == (_snapshot(20, 4), [])
    with pytest.raises(ValueError, match="hole after the last stored entry 20"):
        log.append(_entries(22, 22, 4))


def test_append_below_the_snapshot_skips_covered_entries(log: LMDBRaftLog) -> None:
    """Entries the snapshot already covers are skipped; only those after it are stored."""
    log.apply_snapshot(_snapshot(5, 1))
    log.append(_entries(3, 7, 1))
    assert log.load()[2] == _entries(6, 7, 1)


def test_large_snapshot_round_trips_in_chunks(tmp_path: Path) -> None:
    """A snapshot of several chunks is stored and read back byte for byte, and a smaller one replaces it."""
    log = _log(tmp_path)
    big = bytes(range(256)) * ((3 * SNAPSHOT_CHUNK) // 256 + 7)
    log.append(_entries(1, 2, 1))
    log.compact(_snapshot(2, 1, big))
    log.sync()
    log.close()
    log = _log(tmp_path)
    assert log.load()[1] == _snapshot(2, 1, big)
    log.append(_entries(3, 4, 1))
    log.compact(_snapshot(4, 1, b"small"))
    log.sync()
    assert log.load()[1] == _snapshot(4, 1, b"small")
    log.close()


def test_reopen_keeps_everything_synced(tmp_path: Path) -> None:
    """Hard state, snapshot and entries all survive close and reopen after a sync."""
    log = _log(tmp_path)
    log.append(_entries(1, 6, 1))
    log.set_hard_state(HardState(term=2, vote=1, commit=5))
    log.compact(_snapshot(3, 1))
    log.append(_entries(7, 8, 2))
    log.sync()
    expected = log.load()
    log.close()
    log = _log(tmp_path)
    assert log.load() == expected
    assert expected == (HardState(2, 1, 5), _snapshot(3, 1), _entries(4, 6, 1) + _entries(7, 8, 2))
    # The reopened log knows where it ends: the next append must follow entry 8.
    with pytest.raises(ValueError, match="last stored entry 8"):
        log.append(_entries(10, 10, 2))
    log.close()


def test_unsynced_writes_are_visible_before_sync(log: LMDBRaftLog) -> None:
    """load() sees writes not yet synced (they are in the open transaction)."""
    log.append(_entries(1, 2, 1))
    log.set_hard_state(HardState(1, 1, 0))
    assert log.load() == (HardState(1, 1, 0), None, _entries(1, 2, 1))


def test_close_without_sync_loses_exactly_the_unsynced_writes(tmp_path: Path) -> None:
    """A simulated crash (close without sync) keeps the last synced state and nothing after it."""
    log = _log(tmp_path)
    log.append(_entries(1, 3, 1))
    log.set_hard_state(HardState(1, 1, 2))
    log.sync()
    log.append(_entries(3, 5, 2))  # truncates entry 3, unsynced
    log.set_hard_state(HardState(2, 2, 4))
    log.compact(_snapshot(2, 1))
    log.close()
    log = _log(tmp_path)
    assert log.load() == (HardState(1, 1, 2), None, _entries(1, 3, 1))
    log.close()


def test_killed_process_keeps_exactly_what_was_synced(tmp_path: Path) -> None:
    """A real SIGKILL after sync and more unsynced writes leaves exactly the synced state on disk."""
    path = tmp_path / "raft"
    script = textwrap.dedent(
        f"""
        import os, signal
        from gitstratum.raft.log import LMDBRaftLog
        from gitstratum.raft.types import Entry, HardState
        log = LMDBRaftLog({str(path)!r}, map_size={_MAP})
        log.append([Entry(1, i, data=b"synced") for i in range(1, 4)])
        log.set_hard_state(HardState(1, 1, 3))
        log.sync()
        log.append([Entry(2, i, data=b"lost") for i in range(3, 9)])
        log.set_hard_state(HardState(2, 2, 3))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), timeout=60)
    assert result.returncode == -signal.SIGKILL
    log = LMDBRaftLog(str(path), map_size=_MAP)
    assert log.load() == (
        HardState(1, 1, 3),
        None,
        [Entry(1, i, data=b"synced") for i in range(1, 4)],
    )
    log.close()


def test_sync_with_nothing_written_is_harmless(log: LMDBRaftLog) -> None:
    """sync() with no pending writes does nothing and the log stays usable."""
    log.sync()
    log.sync()
    log.append(_entries(1, 1, 1))
    log.sync()
    assert log.load()[2] == _entries(1, 1, 1)


def test_writes_from_two_threads_between_syncs_are_refused(log: LMDBRaftLog) -> None:
    """An LMDB write transaction cannot cross threads, so a second thread's write raises clearly."""
    log.append(_entries(1, 1, 1))
    errors: list[BaseException] = []

    def other() -> None:
        try:
            log.set_hard_state(HardState(1, 0, 0))
        except RuntimeError as e:
            errors.append(e)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "two threads" in str(errors[0])
    log.sync()


def test_wrong_format_version_is_refused(tmp_path: Path) -> None:
    """A log written in another on-disk format is refused on open instead of being misread."""
    import lmdb

    log = _log(tmp_path)
    log.close()
    env = lmdb.open(str(tmp_path / "raft"), max_dbs=3, map_size=_MAP)
    with env.begin(write=True) as txn:
        txn.put(b"format", (99).to_bytes(4, "big"), db=env.open_db(b"state", txn=txn))
    env.close()
    with pytest.raises(CorruptRaftLog, match="has format 99"):
        _log(tmp_path)


def _flip_a_byte(tmp_path: Path, db: bytes, key_prefix: bytes, offset: int) -> None:
    """Flip one byte of the stored value whose key starts with *key_prefix*, as a bad disk would."""
    import lmdb

    env = lmdb.open(str(tmp_path / "raft"), max_dbs=3, map_size=_MAP)
    with env.begin(write=True) as txn:
        handle = env.open_db(db, txn=txn)
        (key,) = [k for k, _ in txn.cursor(handle) if k.startswith(key_prefix)]
        value = bytearray(txn.get(key, db=handle))
        value[offset] ^= 0x01
        txn.put(key, bytes(value), db=handle)
    env.close()


def _load_is_refused(tmp_path: Path, match: str) -> None:
    log = _log(tmp_path)
    try:
        with pytest.raises(CorruptRaftLog, match=match):
            log.load()
    finally:
        log.close()


def test_a_corrupted_entry_is_refused_on_load(tmp_path: Path) -> None:
    """A flipped bit in a stored entry fails its checksum when the log is loaded, never applied."""
    log = _log(tmp_path)
    log.append([Entry(1, 1, data=b"put a=1"), Entry(1, 2, data=b"put b=2")])
    log.sync()
    log.close()
    _flip_a_byte(tmp_path, b"entries", (2).to_bytes(8, "big"), -1)
    _load_is_refused(tmp_path, "entry 2 fails its checksum")


def test_a_corrupted_snapshot_is_refused_on_load(tmp_path: Path) -> None:
    """A flipped bit in stored snapshot data fails its checksum when the log is loaded."""
    log = _log(tmp_path)
    log.apply_snapshot(_snapshot(5, 1, b"the whole state"))
    log.sync()
    log.close()
    _flip_a_byte(tmp_path, b"snapshot", b"data", 0)
    _load_is_refused(tmp_path, "snapshot data fails its checksum")


# A model of the log: the list of entries after the snapshot, checked against LMDB.
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 6), st.integers(1, 4), st.integers(1, 5)),
        st.tuples(st.just("compact"), st.integers(0, 6)),
        st.tuples(st.just("snapshot"), st.integers(0, 6), st.integers(1, 5)),
        st.tuples(st.just("sync")),
        st.tuples(st.just("crash")),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(_ops)
def test_log_matches_a_model_through_crashes(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple]
) -> None:
    """Any sequence of appends, compactions, snapshots, syncs and crashes loads what a simple model predicts."""
    path = str(tmp_path_factory.mktemp("raft"))
    log = LMDBRaftLog(path, map_size=_MAP)
    # model: (snapshot or None, entries after it), live and as of the last sync
    live: tuple[Snapshot | None, list[Entry]] = (None, [])
    synced = live
    for op in ops:
        snap, entries = live
        snap_index = snap.metadata.index if snap else 0
        last = entries[-1].index if entries else snap_index
        if op[0] == "append":
            _, back, count, term = op
            first = max(last + 1 - back, snap_index + 1)
            new = _entries(first, first + count - 1, term)
            log.append(new)
            live = (snap, [e for e in entries if e.index < first] + new)
        elif op[0] == "compact":
            index = last - op[1]
            if index <= snap_index:
                continue
            term = next(e.term for e in entries if e.index == index)
            log.compact(_snapshot(index, term))
            live = (_snapshot(index, term), [e for e in entries if e.index > index])
        elif op[0] == "snapshot":
            index, term = last - op[1] + 3, op[2]
            if index < max(snap_index, 1):
                continue
            log.apply_snapshot(_snapshot(index, term))
            matching = any(e.index == index and e.term == term for e in entries)
            kept = [e for e in entries if e.index > index] if matching else []
            live = (_snapshot(index, term), kept)
        elif op[0] == "sync":
            log.sync()
            synced = live
        else:
            log.close()
            log = LMDBRaftLog(path, map_size=_MAP)
            live = synced
        assert log.load()[1:] == live
    log.close()


def test_full_map_abandons_only_the_unsynced_batch(tmp_path: Path) -> None:
    """When LMDB runs out of map space the failing batch is discarded and the log stays usable."""
    import lmdb

    log = LMDBRaftLog(str(tmp_path / "small"), map_size=1 << 20)
    log.append(_entries(1, 2, 1))
    log.sync()
    with pytest.raises(lmdb.MapFullError):
        log.append([Entry(1, 3, data=bytes(256 << 10)), Entry(1, 4, data=bytes(1 << 20))])
        log.sync()
    assert log.load() == (HardState(), None, _entries(1, 2, 1))
    log.append(_entries(3, 3, 2))
    log.sync()
    assert log.load()[2] == _entries(1, 2, 1) + _entries(3, 3, 2)
    log.close()
