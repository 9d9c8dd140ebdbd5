"""Write a pack stream entry by entry, copying stored compressed bytes verbatim.

The writer never holds the pack: each ``add_*`` call returns the bytes of one
entry for the caller to send (or tee into the cache) and only the running
SHA-1, the offset and the offset of each entry by object id are kept.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

from dulwich.object_format import DEFAULT_OBJECT_FORMAT
from dulwich.pack import pack_object_header

from gitstratum.core.objects import OFS_DELTA, REF_DELTA, ObjectType, PackReadyObject
from gitstratum.core.oid import ObjectID, to_bin

__all__ = ["PackWriter", "PackWriterError", "PACK_SIGNATURE", "PACK_VERSION"]

PACK_SIGNATURE = b"PACK"
PACK_VERSION = 2
_HEADER = struct.Struct(">4sLL")


class PackWriterError(RuntimeError):
    """The writer was driven out of order: a programming error in the caller."""


class PackWriter:
    """Emit a version 2 pack of exactly ``num_objects`` entries.

    Call ``header()`` once, then one ``add_stored``/``add_whole`` per object,
    then ``trailer()`` once.  Every returned chunk is already counted in the
    trailer's SHA-1, so the caller must send them all, in order.
    """

    def __init__(self, num_objects: int):
        if not 0 <= num_objects < 1 << 32:
            raise ValueError(f"a pack cannot hold {num_objects} objects")
        self.num_objects = num_objects
        self._sha = hashlib.sha1()
        self._offset = 0
        self._written = 0
        self._offsets: dict[ObjectID, int] = {}
        self._state = "new"  # new -> entries -> done

    @property
    def offset(self) -> int:
        """Bytes emitted so far (the offset the next entry starts at)."""
        return self._offset

    @property
    def written(self) -> int:
        """Entries emitted so far."""
        return self._written

    def header(self) -> bytes:
        """The 12-byte pack header; must be the first call."""
        if self._state != "new":
            raise PackWriterError("pack header written twice")
        self._state = "entries"
        return self._emit(_HEADER.pack(PACK_SIGNATURE, PACK_VERSION, self.num_objects))

    def offset_of(self, oid: ObjectID) -> int | None:
        """Where the entry for *oid* starts in this pack, or None when not yet written."""
        return self._offsets.get(oid)

    def add_stored(
        self,
        obj: PackReadyObject,
        *,
        ofs_base_offset: int | None = None,
        ref_base: bool = False,
    ) -> list[bytes]:
        """Emit *obj*'s stored compressed bytes unchanged.

        A delta record needs exactly one of ``ofs_base_offset`` (the offset
        of its base's entry earlier in this pack, giving an OFS_DELTA) or
        ``ref_base=True`` (a REF_DELTA naming the base by id).  A whole record
        takes neither.
        """
        if obj.delta_base is None:
            if ofs_base_offset is not None or ref_base:
                raise PackWriterError(f"{obj.oid.decode()} is not a delta; it has no base")
            head = pack_object_header(obj.type, None, obj.data_size, DEFAULT_OBJECT_FORMAT)
        elif ofs_base_offset is not None:
            if ref_base:
                raise PackWriterError("a delta entry is either OFS_DELTA or REF_DELTA, not both")
            if not _HEADER.size <= ofs_base_offset < self._offset:
                raise PackWriterError(
                    f"delta base offset {ofs_base_offset} is not an earlier entry of this pack"
                )
            head = pack_object_header(
                OFS_DELTA,
                self._offset - ofs_base_offset,
                obj.data_size,
                DEFAULT_OBJECT_FORMAT,
            )
        elif ref_base:
            head = pack_object_header(
                REF_DELTA, to_bin(obj.delta_base), obj.data_size, DEFAULT_OBJECT_FORMAT
            )
        else:
            raise PackWriterError(
                f"{obj.oid.decode()} is a delta: give ofs_base_offset or ref_base=True"
            )
        return self._entry(obj.oid, bytes(head), obj.compressed)

    def add_whole(self, oid: ObjectID, type: ObjectType, raw: bytes, level: int) -> list[bytes]:
        """Compress *raw* (the full body of *oid*) at zlib *level* and emit it whole."""
        head = pack_object_header(type, None, len(raw), DEFAULT_OBJECT_FORMAT)
        return self._entry(oid, bytes(head), zlib.compress(raw, level))

    def trailer(self) -> bytes:
        """The SHA-1 of everything emitted; the last call."""
        if self._state != "entries":
            raise PackWriterError(
                "pack trailer written twice" if self._state == "done" else "pack has no header"
            )
        if self._written != self.num_objects:
            raise PackWriterError(
                f"pack announced {self.num_objects} objects but {self._written} were written"
            )
        self._state = "done"
        return self._emit(self._sha.digest())

    def _entry(self, oid: ObjectID, head: bytes, compressed: bytes) -> list[bytes]:
        if self._state != "entries":
            raise PackWriterError(
                "pack entry after the trailer" if self._state == "done" else "pack has no header"
            )
        if self._written >= self.num_objects:
            raise PackWriterError(f"pack announced {self.num_objects} objects; one more written")
        self._written += 1
        self._offsets.setdefault(oid, self._offset)
        self._emit(head)
        self._emit(compressed)
        return [head, compressed]

    def _emit(self, data: bytes) -> bytes:
        self._sha.update(data)
        self._offset += len(data)
        return data
