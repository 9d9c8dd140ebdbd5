"""Opening LMDB environments one way for every store (objects, metadata, Raft logs, the pack
cache index), and the prefix walks they share.

A neutral adapter helper: storage, raft and cache all import it, and it imports nothing of ours.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import lmdb

__all__ = ["open_env", "iter_prefix", "delete_prefix", "MAX_KEY_SIZE"]

#: LMDB's compiled-in key limit (mdb_env_get_maxkeysize on a default build).
MAX_KEY_SIZE = 511


def open_env(path: str, *, map_size: int, max_dbs: int) -> lmdb.Environment:
    """Open (creating if needed) the environment in directory *path*.

    ``readahead=False`` because point reads of random keys dominate and
    readahead would evict hot pages; the files are created 0600 (the stores
    hold private repositories); ``writemap=False`` so a stray write
    through a buffer can never corrupt the file.  Commits are synchronous
    (LMDB's default ``sync=True``), so a returned write is durable.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    return lmdb.open(
        path,
        mode=0o600,  # data.mdb and lock.mdb: the server's user's alone, whatever the umask
        subdir=True,
        max_dbs=max_dbs,
        map_size=map_size,
        readahead=False,
        writemap=False,
        max_readers=1024,
    )


def iter_prefix(
    txn: lmdb.Transaction, db: lmdb._Database, prefix: bytes
) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) for every key of *db* starting with *prefix*, in key order."""
    cursor = txn.cursor(db)
    if not cursor.set_range(prefix):
        return
    for key, value in cursor:
        key = bytes(key)
        if not key.startswith(prefix):
            return
        yield key, bytes(value)


def delete_prefix(txn: lmdb.Transaction, db: lmdb._Database, prefix: bytes) -> int:
    """Delete every key of *db* starting with *prefix*; return how many went."""
    cursor = txn.cursor(db)
    deleted = 0
    if not cursor.set_range(prefix):
        return 0
    # Cursor.delete moves to the next record, so no explicit step is needed;
    # past the last record the cursor is unpositioned and key() is empty.
    while True:
        key = bytes(cursor.key())
        if not key or not key.startswith(prefix) or not cursor.delete():
            return deleted
        deleted += 1
