"""The local object store: pack-ready Git objects in one LMDB environment.

Each record is keyed by the 20-byte binary object id.  Its value is a
fixed header, the 20-byte delta base when the entry is a delta, then the
zlib bytes exactly as they go into a pack, so assembly copies them out
without inflating anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import struct
import threading
from collections.abc import Iterable

import attrs
import lmdb
from zope.interface import implementer

from gitstratum.core.objects import ObjectType, PackReadyObject
from gitstratum.core.oid import ObjectID, from_bin, to_bin
from gitstratum.lmdbutil import open_env
from gitstratum.storage.interfaces import IObjectStore, ObjectStat, StorageError

__all__ = ["LMDBObjectStore", "CorruptRecord", "encode_record", "decode_record"]

# type, flags, delta depth, object size, payload (data) size
_HEADER = struct.Struct(">BBHQQ")
# after the header (and base) in the headers table: the stored payload length
_STORED = struct.Struct(">Q")
_FLAG_DELTA = 0x01
_MAX_DEPTH = 0xFFFF


class CorruptRecord(StorageError):
    """A stored record does not decode; the store's file is damaged."""


def encode_record(obj: PackReadyObject) -> bytes:
    """The stored value of *obj*: header, optional binary base id, compressed bytes."""
    if not 0 <= obj.depth <= _MAX_DEPTH:
        raise ValueError(f"delta depth {obj.depth} out of range for {obj.oid.decode()}")
    if obj.delta_base is None:
        return _HEADER.pack(obj.type, 0, obj.depth, obj.size, obj.data_size) + obj.compressed
    return (
        _HEADER.pack(obj.type, _FLAG_DELTA, obj.depth, obj.size, obj.data_size)
        + to_bin(obj.delta_base)
        + obj.compressed
    )


def _decode_header(
    oid: ObjectID, view: memoryview
) -> tuple[ObjectType, int, int, int, ObjectID | None, int]:
    """(type, depth, size, data_size, base, payload offset) of a stored value."""
    if len(view) < _HEADER.size:
        raise CorruptRecord(f"object {oid.decode()}: record truncated")
    type_num, flags, depth, size, data_size = _HEADER.unpack_from(view)
    try:
        obj_type = ObjectType(type_num)
    except ValueError:
        raise CorruptRecord(f"object {oid.decode()}: bad type {type_num}") from None
    offset = _HEADER.size
    base: ObjectID | None = None
    if flags & _FLAG_DELTA:
        if len(view) < offset + 20:
            raise CorruptRecord(f"object {oid.decode()}: record truncated")
        base = from_bin(bytes(view[offset : offset + 20]))
        offset += 20
    return obj_type, depth, size, data_size, base, offset


def decode_record(oid: ObjectID, value: bytes | memoryview) -> PackReadyObject:
    """Rebuild the record stored under *oid* from its value (copying the bytes out)."""
    view = memoryview(value)
    obj_type, depth, size, data_size, base, offset = _decode_header(oid, view)
    return PackReadyObject(
        oid=oid,
        type=obj_type,
        size=size,
        data_size=data_size,
        compressed=bytes(view[offset:]),
        delta_base=base,
        depth=depth,
    )


class _PageReleaser:
    """Drops this process's mapping of LMDB pages after large reads.

    LMDB reads through a shared read-only mmap of ``data.mdb``, and Linux
    counts every page touched there in the process's RSS until the mapping
    goes.  Streaming a multi-gigabyte pack would therefore look like a
    multi-gigabyte process.  ``MADV_DONTNEED`` on a read-only file mapping
    only drops page-table entries (the data stays in the page cache and the
    next read faults it back in), so it is safe while other threads read.
    py-lmdb does not expose the map address, so it is found in
    /proc/self/maps; where any of this is unavailable it does nothing.
    """

    threshold = 16 << 20

    def __init__(self, data_file: str):
        self._data_file = os.path.realpath(data_file)
        self._lock = threading.Lock()
        self._pending = 0
        self._madvise = None
        libc_name = ctypes.util.find_library("c")
        if libc_name and hasattr(mmap, "MADV_DONTNEED") and os.path.exists("/proc/self/maps"):
            libc = ctypes.CDLL(libc_name, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._madvise = libc.madvise

    def read(self, nbytes: int) -> None:
        """Count bytes read; past the threshold, release the mapping's pages."""
        if self._madvise is None:
            return
        with self._lock:
            self._pending += nbytes
            if self._pending < self.threshold:
                return
            self._pending = 0
        self.release()

    def release(self) -> None:
        if self._madvise is None:
            return
        with open("/proc/self/maps") as maps:
            for line in maps:
                if line.rstrip().endswith(self._data_file):
                    span = line.split(None, 1)[0]
                    start, end = (int(x, 16) for x in span.split("-"))
                    self._madvise(start, end - start, mmap.MADV_DONTNEED)


@implementer(IObjectStore)
@attrs.define(eq=False)
class LMDBObjectStore:
    """IObjectStore over one LMDB environment in directory ``path``.

    Every call opens its own transaction, so the store may be used from
    many threads at once; a read call sees one consistent snapshot.
    """

    path: str
    map_size: int = attrs.field(default=1 << 40, kw_only=True)
    _env: lmdb.Environment = attrs.field(init=False)
    _db: lmdb._Database = attrs.field(init=False)
    _headers: lmdb._Database = attrs.field(init=False)
    _pages: _PageReleaser = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._env = open_env(self.path, map_size=self.map_size, max_dbs=4)
        self._db = self._env.open_db(b"objects")
        # Each record's header again, on its own: py-lmdb faults in a whole
        # value when it is read, so stat_many reads these instead of records.
        self._headers = self._env.open_db(b"headers")
        self._pages = _PageReleaser(os.path.join(self.path, "data.mdb"))

    def close(self) -> None:
        """Release the environment; the store is unusable afterwards."""
        self._env.close()

    def contains(self, oids: Iterable[ObjectID]) -> set[ObjectID]:
        keys = sorted({to_bin(o) for o in oids})
        found: set[ObjectID] = set()
        with self._env.begin(db=self._db, buffers=True) as txn:
            cursor = txn.cursor()
            for key in keys:
                if cursor.set_key(key):
                    found.add(from_bin(key))
        return found

    def get(self, oid: ObjectID) -> PackReadyObject | None:
        key = to_bin(oid)
        with self._env.begin(db=self._db, buffers=True) as txn:
            value = txn.get(key)
            if value is None:
                return None
            record = decode_record(from_bin(key), value)
        self._pages.read(len(record.compressed))
        return record

    def get_many(self, oids: Iterable[ObjectID]) -> dict[ObjectID, PackReadyObject]:
        keys = sorted({to_bin(o) for o in oids})
        out: dict[ObjectID, PackReadyObject] = {}
        nbytes = 0
        with self._env.begin(db=self._db, buffers=True) as txn:
            cursor = txn.cursor()
            for key in keys:
                if cursor.set_key(key):
                    oid = from_bin(key)
                    record = out[oid] = decode_record(oid, cursor.value())
                    nbytes += len(record.compressed)
        self._pages.read(nbytes)
        return out

    def stat_many(self, oids: Iterable[ObjectID]) -> dict[ObjectID, ObjectStat]:
        keys = sorted({to_bin(o) for o in oids})
        out: dict[ObjectID, ObjectStat] = {}
        with self._env.begin(db=self._headers, buffers=True) as txn:
            cursor = txn.cursor()
            for key in keys:
                if cursor.set_key(key):
                    oid = from_bin(key)
                    view = cursor.value()
                    obj_type, _, size, _, base, offset = _decode_header(oid, view)
                    (stored,) = _STORED.unpack_from(view, offset)
                    out[oid] = ObjectStat(obj_type, size, stored, base)
        return out

    def put_many(self, objects: Iterable[PackReadyObject]) -> int:
        # Records are written as they come rather than sorted first, so a
        # long iterable is never held whole in memory; LMDB spills dirty
        # pages of a large transaction to the file itself.
        written = 0
        with self._env.begin(db=self._db, write=True) as txn:
            for obj in objects:
                key = to_bin(obj.oid)
                record = encode_record(obj)
                if txn.put(key, record, overwrite=False):
                    header_len = len(record) - len(obj.compressed)
                    stat = record[:header_len] + _STORED.pack(len(obj.compressed))
                    txn.put(key, stat, db=self._headers)
                    written += 1
        return written

    def delete_many(self, oids: Iterable[ObjectID]) -> int:
        keys = sorted({to_bin(o) for o in oids})
        deleted = 0
        with self._env.begin(db=self._db, write=True) as txn:
            for key in keys:
                if txn.delete(key):
                    txn.delete(key, db=self._headers)
                    deleted += 1
        return deleted

    def count(self) -> int:
        """How many records are stored (for metrics and tests)."""
        with self._env.begin(db=self._db) as txn:
            return txn.stat(self._db)["entries"]
