"""The local object store: pack-ready Git objects in one LMDB environment.

Each record is keyed by the 20-byte binary object id.  Its value is a
fixed header, the 20-byte delta base when the entry is a delta, then the
zlib bytes exactly as they go into a pack, so assembly copies them out
without inflating anything.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import attrs
import lmdb
from zope.interface import implementer

from gitstratum.core.objects import ObjectType, PackReadyObject
from gitstratum.core.oid import ObjectID, from_bin, to_bin
from gitstratum.storage._lmdb import open_env
from gitstratum.storage.interfaces import IObjectStore, StorageError

__all__ = ["LMDBObjectStore", "CorruptRecord", "encode_record", "decode_record"]

# type, flags, delta depth, object size, payload (data) size
_HEADER = struct.Struct(">BBHQQ")
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


def decode_record(oid: ObjectID, value: bytes | memoryview) -> PackReadyObject:
    """Rebuild the record stored under *oid* from its value (copying the bytes out)."""
    view = memoryview(value)
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
    return PackReadyObject(
        oid=oid,
        type=obj_type,
        size=size,
        data_size=data_size,
        compressed=bytes(view[offset:]),
        delta_base=base,
        depth=depth,
    )


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

    def __attrs_post_init__(self) -> None:
        self._env = open_env(self.path, map_size=self.map_size, max_dbs=4)
        self._db = self._env.open_db(b"objects")

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
            return decode_record(from_bin(key), value)

    def get_many(self, oids: Iterable[ObjectID]) -> dict[ObjectID, PackReadyObject]:
        keys = sorted({to_bin(o) for o in oids})
        out: dict[ObjectID, PackReadyObject] = {}
        with self._env.begin(db=self._db, buffers=True) as txn:
            cursor = txn.cursor()
            for key in keys:
                if cursor.set_key(key):
                    oid = from_bin(key)
                    out[oid] = decode_record(oid, cursor.value())
        return out

    def put_many(self, objects: Iterable[PackReadyObject]) -> int:
        # Records are written as they come rather than sorted first, so a
        # long iterable is never held whole in memory; LMDB spills dirty
        # pages of a large transaction to the file itself.
        written = 0
        with self._env.begin(db=self._db, write=True) as txn:
            for obj in objects:
                if txn.put(to_bin(obj.oid), encode_record(obj), overwrite=False):
                    written += 1
        return written

    def delete_many(self, oids: Iterable[ObjectID]) -> int:
        keys = sorted({to_bin(o) for o in oids})
        deleted = 0
        with self._env.begin(db=self._db, write=True) as txn:
            for key in keys:
                if txn.delete(key):
                    deleted += 1
        return deleted

    def count(self) -> int:
        """How many records are stored (for metrics and tests)."""
        with self._env.begin(db=self._db) as txn:
            return txn.stat(self._db)["entries"]
