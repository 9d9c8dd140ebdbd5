"""Index a received pack: verify it, resolve its deltas and keep every entry pack-ready.

This is receive-pack's ``git index-pack``.  It is blocking and meant for a
worker thread.  Memory stays bounded by per-entry metadata, never bodies:

* pass 1 streams the spooled pack once in large reads, parsing each entry
  header, inflating it (after checking its declared size against the limits)
  to find where it ends, hashing whole objects and hashing the pack itself
  for the trailer;
* pass 2 resolves deltas the way index-pack does: from each base it walks
  the tree of deltas built on it with an explicit stack.  A frame is popped
  before its last child is resolved, so a long chain holds one body at a
  time, and when the bodies held for pending siblings exceed
  ``base_cache_bytes`` the oldest are dropped and rebuilt from the spool
  when needed again.

Deltas are kept as they arrived: an OFS_DELTA or REF_DELTA entry becomes a
delta record against its base's id, so the stored compression is reused when
the objects are served.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import BinaryIO

import attrs
from dulwich.errors import ApplyDeltaError
from dulwich.pack import apply_delta

from gitstratum.core.limits import Limits
from gitstratum.core.objects import OFS_DELTA, REF_DELTA, ObjectType, PackReadyObject
from gitstratum.core.oid import ObjectID, from_bin, to_bin

__all__ = [
    "PackError",
    "PackTooLarge",
    "ObjectTooLarge",
    "DeltaTooDeep",
    "DeltaCycle",
    "MissingBases",
    "IndexedObject",
    "IndexedPack",
    "PackIndexer",
    "BaseLookup",
    "ObjectCallback",
]

#: ``base_lookup(oid) -> (type, body, stored depth)`` for a thin-pack base, or None
BaseLookup = Callable[[ObjectID], "tuple[ObjectType, bytes, int] | None"]
#: ``on_object(oid, type, body)``, called once per object of the pack
ObjectCallback = Callable[[ObjectID, ObjectType, bytes], None]

_HEADER = struct.Struct(">4sLL")
_TRAILER_LEN = 20
_READ_SIZE = 1 << 20
_ZLIB_SLICE = 1 << 16
_MAX_ENTRY_HEADER = 64  # type+size varint (<= 10), then an ofs varint (<= 10) or a 20-byte id
_DELTA_CACHE_BYTES = 32 << 20
_TYPE_NAMES = {t.value: t.type_name for t in ObjectType}


class PackError(ValueError):
    """The pack is corrupt, truncated or breaks a limit; nothing of it may be stored."""


class PackTooLarge(PackError):
    """The pack as a whole (bytes, objects or inflated size) exceeds a limit."""


class ObjectTooLarge(PackError):
    """One object inflates to more than the per-object limit."""


class DeltaTooDeep(PackError):
    """A delta chain would be longer than the configured maximum."""


class DeltaCycle(PackError):
    """Deltas in the pack are based, directly or through others, on themselves."""


class MissingBases(PackError):
    """Deltas whose bases are neither in the pack nor in the store.

    ``oids`` holds the missing base ids.
    """

    def __init__(self, message: str, oids: frozenset[ObjectID]):
        super().__init__(message)
        self.oids = oids


@attrs.frozen
class IndexedObject:
    """Where one object of a received pack lies in the spool, and how it is stored.

    ``offset`` is the absolute spool offset of the entry's zlib data and
    ``comp_len`` its length; ``data_size`` is the inflated length of that
    data (the delta itself for a delta record), ``size`` the object's own.
    """

    oid: ObjectID
    type: ObjectType
    size: int
    data_size: int
    delta_base: ObjectID | None
    depth: int
    offset: int
    comp_len: int


class IndexedPack:
    """The result of indexing: every object's metadata, with bodies left in the spool.

    The spool must stay open and unchanged while this is used.  Reads are
    serialised with a lock, so several threads may share one instance.
    """

    def __init__(
        self,
        spool: BinaryIO,
        objects: Mapping[ObjectID, IndexedObject],
        external_bases: frozenset[ObjectID],
        base_lookup: BaseLookup,
    ):
        self.objects = objects
        self.external_bases = external_bases
        self._spool = spool
        self._base_lookup = base_lookup
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.objects)

    def pack_ready(self, oid: ObjectID) -> PackReadyObject:
        """The record for *oid*, compressed bytes exactly as they arrived; KeyError if absent."""
        entry = self.objects[oid]
        return _pack_ready(entry, self._read_at(entry.offset, entry.comp_len))

    def iter_pack_ready(self, batch_bytes: int = 8 << 20) -> Iterator[list[PackReadyObject]]:
        """Every record in pack order, in lists of at most *batch_bytes* compressed bytes.

        A single record larger than *batch_bytes* comes in a list of its own.
        """
        batch: list[IndexedObject] = []
        total = 0
        for entry in sorted(self.objects.values(), key=lambda e: e.offset):
            if batch and total + entry.comp_len > batch_bytes:
                yield self._read_batch(batch)
                batch, total = [], 0
            batch.append(entry)
            total += entry.comp_len
        if batch:
            yield self._read_batch(batch)

    def read_object(self, oid: ObjectID) -> tuple[ObjectType, bytes]:
        """The full body of *oid*, rebuilt from the spool (and the store for thin bases)."""
        chain: list[IndexedObject] = []
        entry = self.objects[oid]
        while True:
            if entry.delta_base is None:
                body = _inflate(self._read_at(entry.offset, entry.comp_len), entry.data_size)
                break
            chain.append(entry)
            base = self.objects.get(entry.delta_base)
            if base is None:
                found = self._base_lookup(entry.delta_base)
                if found is None:
                    raise PackError(
                        f"delta base {entry.delta_base.decode()} is no longer available"
                    )
                body = found[1]
                break
            entry = base
        for delta_entry in reversed(chain):
            delta = _inflate(
                self._read_at(delta_entry.offset, delta_entry.comp_len), delta_entry.data_size
            )
            body = _join(apply_delta(body, delta))
        return self.objects[oid].type, body

    def _read_at(self, offset: int, length: int) -> bytes:
        with self._lock:
            self._spool.seek(offset)
            data = self._spool.read(length)
        if len(data) != length:
            raise PackError(f"spooled pack shrank: {length} bytes wanted at offset {offset}")
        return data

    def _read_batch(self, batch: list[IndexedObject]) -> list[PackReadyObject]:
        start = batch[0].offset
        span = batch[-1].offset + batch[-1].comp_len - start
        if span > 2 * sum(e.comp_len for e in batch) + 4096:
            # Sparse (dropped duplicates in between): read each entry on its own.
            return [_pack_ready(e, self._read_at(e.offset, e.comp_len)) for e in batch]
        data = self._read_at(start, span)
        return [
            _pack_ready(e, data[e.offset - start : e.offset - start + e.comp_len]) for e in batch
        ]


def _pack_ready(entry: IndexedObject, compressed: bytes) -> PackReadyObject:
    return PackReadyObject(
        oid=entry.oid,
        type=entry.type,
        size=entry.size,
        data_size=entry.data_size,
        compressed=compressed,
        delta_base=entry.delta_base,
        depth=entry.depth,
    )


def _join(chunks: list[bytes]) -> bytes:
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _inflate(compressed: bytes, size: int) -> bytes:
    try:
        data = zlib.decompress(compressed, bufsize=max(size, 1))
    except zlib.error as e:
        raise PackError(f"corrupt zlib stream in spooled pack: {e}") from None
    if len(data) != size:
        raise PackError("spooled pack changed under the index")
    return data


def _no_base(oid: ObjectID) -> tuple[ObjectType, bytes, int] | None:
    return None


def _object_hash(type_num: int, size: int) -> hashlib._Hash:
    return hashlib.sha1(b"%s %d\x00" % (_TYPE_NAMES[type_num], size))


def _delta_sizes(delta: bytes) -> tuple[int, int, int]:
    """(source size, target size, offset of the first instruction) of a delta."""
    pos = 0
    sizes = []
    for _ in range(2):
        value = shift = 0
        while True:
            if pos >= len(delta) or shift > 63:
                raise ApplyDeltaError("delta truncated in size header")
            c = delta[pos]
            pos += 1
            value |= (c & 0x7F) << shift
            shift += 7
            if not c & 0x80:
                break
        sizes.append(value)
    return sizes[0], sizes[1], pos


def _insert_only_target(delta: bytes) -> bytes | None:
    """The target of a delta made only of inserts (it needs no base), else None."""
    try:
        _, target_size, pos = _delta_sizes(delta)
    except ApplyDeltaError:
        return None
    out = []
    while pos < len(delta):
        op = delta[pos]
        if op & 0x80 or op == 0:
            return None
        out.append(delta[pos + 1 : pos + 1 + op])
        pos += 1 + op
    target = b"".join(out)
    return target if len(target) == target_size else None


class _Frame:
    """A resolved object on the resolution stack whose children are still to be done."""

    __slots__ = ("entry", "oid", "type", "body", "depth", "children", "next")

    def __init__(
        self,
        entry: int,
        oid: ObjectID,
        type: int,
        body: bytes,
        depth: int,
        children: list[int],
    ):
        self.entry = entry  # index in the pack, or -1 for a thin base from the store
        self.oid = oid
        self.type = type
        self.body: bytes | None = body
        self.depth = depth
        self.children = children
        self.next = 0


class PackIndexer:
    """Index the pack that runs from the spool's current position to its end.

    ``base_lookup(oid)`` gives ``(type, body, stored depth)`` of an object the
    repository already holds, for the REF_DELTA bases of a thin pack; it is
    called only for bases that the pack itself does not provide.
    ``base_cache_bytes`` bounds the bodies held while resolving siblings.
    """

    def __init__(
        self,
        spool: BinaryIO,
        limits: Limits,
        base_lookup: BaseLookup = _no_base,
        *,
        base_cache_bytes: int = 96 << 20,
    ):
        self._spool = spool
        self._limits = limits
        self._base_lookup = base_lookup
        self._base_cache_bytes = base_cache_bytes
        self._start = spool.tell()
        self._ran = False
        # Per entry, in pack order (so offsets ascend and bisect finds a start).
        self._starts: list[int] = []  # entry header offset
        self._data: list[int] = []  # zlib data offset
        self._comp: list[int] = []  # zlib data length
        self._kind: list[int] = []  # pack type number
        self._dsize: list[int] = []  # inflated entry data size
        self._size: list[int] = []  # object size (a delta's target size)
        self._base: list[int | bytes | None] = []  # base entry index or binary base id
        self._oid: list[ObjectID | None] = []
        self._src: list[int] = []  # entry whose body a delta was applied to; -1 a thin base
        self._ofs_children: dict[int, list[int]] = {}
        self._ref_children: dict[bytes, list[int]] = {}
        self._delta_cache: dict[int, bytes] = {}
        self._delta_cache_bytes = 0
        self._objects: dict[ObjectID, IndexedObject] = {}
        self._external: dict[ObjectID, int] = {}  # thin base -> its stored depth
        self._resolved = 0
        self._on_object: ObjectCallback | None = None

    def run(self, on_object: ObjectCallback | None = None) -> IndexedPack:
        """Verify and index the pack; call *on_object* once per object, bases first.

        Whole objects are reported during the first pass, before the trailer
        is checked, and deltas as they are resolved; the result only exists
        once everything has been verified.  Raises a PackError subclass for
        anything wrong with the pack; an exception raised by *on_object*
        propagates unchanged.
        """
        if self._ran:
            raise RuntimeError("a PackIndexer runs once")
        self._ran = True
        self._on_object = on_object
        self._pass_one()
        self._pass_two()
        return IndexedPack(self._spool, self._objects, frozenset(self._external), self._base_lookup)

    # -- pass 1: stream every entry ------------------------------------------

    def _pass_one(self) -> None:
        limits = self._limits
        spool = self._spool
        end = spool.seek(0, 2)
        length = end - self._start
        if length > limits.max_pack_bytes:
            raise PackTooLarge(
                f"pack exceeds maximum allowed size ({length} > {limits.max_pack_bytes} bytes)"
            )
        if length < _HEADER.size + _TRAILER_LEN:
            raise PackError(f"early EOF: pack truncated ({length} bytes)")
        spool.seek(self._start)
        head = spool.read(_HEADER.size)
        signature, version, count = _HEADER.unpack(head)
        if signature != b"PACK":
            raise PackError("pack signature mismatch")
        if version not in (2, 3):
            raise PackError(f"pack version {version} unsupported")
        if count > limits.max_pack_objects:
            raise PackTooLarge(f"pack has too many objects ({count} > {limits.max_pack_objects})")
        data_end = end - _TRAILER_LEN
        reader = _Reader(spool, self._start + _HEADER.size, data_end)
        reader.sha.update(head)
        inflated_total = 0
        for _ in range(count):
            inflated_total += self._read_entry(reader)
            if inflated_total > limits.max_inflated_bytes:
                raise PackTooLarge(f"pack inflates to more than {limits.max_inflated_bytes} bytes")
        if reader.tell() != data_end:
            raise PackError(
                f"pack has junk at the end ({data_end - reader.tell()} bytes after "
                f"the {count} objects announced)"
            )
        spool.seek(data_end)
        trailer = spool.read(_TRAILER_LEN)
        if trailer != reader.sha.digest():
            raise PackError("pack is corrupted (SHA1 mismatch)")

    def _read_entry(self, reader: _Reader) -> int:
        """Parse, inflate and record one entry; return the object's inflated size."""
        start = reader.tell()
        reader.fill(_MAX_ENTRY_HEADER)
        buf, p = reader.buf, reader.pos
        limit = len(buf)
        if p >= limit:
            raise PackError(f"early EOF: pack truncated before the object at offset {start}")
        c = buf[p]
        p += 1
        kind = (c >> 4) & 7
        size = c & 15
        shift = 4
        while c & 0x80:
            if p >= limit or shift > 60:
                raise PackError(f"bad object header at offset {start}")
            c = buf[p]
            p += 1
            size |= (c & 0x7F) << shift
            shift += 7
        base: int | bytes | None = None
        if kind == OFS_DELTA:
            if p >= limit:
                raise PackError(f"early EOF: pack truncated in the object at offset {start}")
            c = buf[p]
            p += 1
            rel = c & 0x7F
            while c & 0x80:
                if p >= limit or rel >= 1 << 56:
                    raise PackError(f"offset value overflow for delta base object at {start}")
                c = buf[p]
                p += 1
                rel = ((rel + 1) << 7) | (c & 0x7F)
            base = self._ofs_base(start, rel)
        elif kind == REF_DELTA:
            if p + 20 > limit:
                raise PackError(f"early EOF: pack truncated in the object at offset {start}")
            base = buf[p : p + 20]
            p += 20
        elif kind not in _TYPE_NAMES:
            raise PackError(f"unknown object type {kind} at offset {start}")
        if size > self._limits.max_object_bytes:
            raise ObjectTooLarge(
                f"object at offset {start} is {size} bytes, larger than the "
                f"{self._limits.max_object_bytes}-byte limit"
            )
        reader.pos = p
        data_start = reader.tell()
        index = len(self._starts)
        if base is None:
            hasher = _object_hash(kind, size)
            body = self._inflate_stream(reader, start, size, hasher, self._on_object is not None)
            oid_bin = hasher.digest()
            oid = from_bin(oid_bin)
            obj_size = size
        else:
            hasher = None
            body = self._inflate_stream(reader, start, size, None, True)
            try:
                _, obj_size, _ = _delta_sizes(body)
            except ApplyDeltaError:
                raise PackError(f"corrupt delta header in the object at offset {start}") from None
            if obj_size > self._limits.max_object_bytes:
                raise ObjectTooLarge(
                    f"object at offset {start} is {obj_size} bytes, larger than the "
                    f"{self._limits.max_object_bytes}-byte limit"
                )
        self._starts.append(start)
        self._data.append(data_start)
        self._comp.append(reader.tell() - data_start)
        self._kind.append(kind)
        self._dsize.append(size)
        self._size.append(obj_size)
        self._base.append(base)
        self._src.append(-1)
        if base is None:
            self._oid.append(oid)
            self._resolved += 1
            if oid not in self._objects:
                self._objects[oid] = IndexedObject(
                    oid,
                    ObjectType(kind),
                    size,
                    size,
                    None,
                    0,
                    data_start,
                    reader.tell() - data_start,
                )
                if self._on_object is not None:
                    self._on_object(oid, ObjectType(kind), body)
        else:
            self._oid.append(None)
            if isinstance(base, int):
                self._ofs_children.setdefault(base, []).append(index)
            else:
                self._ref_children.setdefault(base, []).append(index)
            if self._delta_cache_bytes + len(body) <= _DELTA_CACHE_BYTES:
                # Most deltas are small: keeping them saves pass 2 a read and an inflate.
                self._delta_cache[index] = body
                self._delta_cache_bytes += len(body)
        return obj_size

    def _ofs_base(self, start: int, rel: int) -> int:
        if rel == 0:
            raise DeltaCycle(
                f"delta offset 0 is invalid: the object at offset {start} is its own base"
            )
        target = start - rel
        if target < self._start + _HEADER.size:
            raise PackError(f"delta base offset is out of bound for the object at offset {start}")
        i = bisect.bisect_left(self._starts, target)
        if i == len(self._starts) or self._starts[i] != target:
            raise PackError(
                f"delta base offset {target} of the object at offset {start} "
                "is not the start of an object"
            )
        return i

    def _inflate_stream(
        self,
        reader: _Reader,
        start: int,
        size: int,
        hasher: hashlib._Hash | None,
        keep: bool,
    ) -> bytes:
        """Inflate the zlib stream at the reader's position, consuming exactly it."""
        d = zlib.decompressobj()
        chunks: list[bytes] = []
        got = 0
        # Feed little more than the stream can be, so zlib's copy of what follows is small.
        feed = size + (size >> 8) + 64
        while True:
            avail = len(reader.buf) - reader.pos
            if avail <= 0:
                if not reader.fill(1):
                    raise PackError(f"early EOF: pack truncated in the object at offset {start}")
                avail = len(reader.buf) - reader.pos
            n = min(avail, feed)
            feed = max(feed, _ZLIB_SLICE)
            with memoryview(reader.buf) as view, view[reader.pos : reader.pos + n] as piece:
                try:
                    out = d.decompress(piece, size + 1 - got)
                except zlib.error as e:
                    raise PackError(
                        f"corrupt zlib stream in the object at offset {start}: {e}"
                    ) from None
            got += len(out)
            if got > size or d.unconsumed_tail:
                raise PackError(
                    f"object at offset {start} inflates to more than the {size} bytes in its header"
                )
            if hasher is not None:
                hasher.update(out)
            if keep:
                chunks.append(out)
            if d.eof:
                reader.pos += n - len(d.unused_data)
                break
            reader.pos += n
        if got != size:
            raise PackError(
                f"object at offset {start} inflates to {got} bytes, its header says {size}"
            )
        return b"".join(chunks) if keep else b""

    # -- pass 2: resolve deltas --------------------------------------------------

    def _pass_two(self) -> None:
        kinds = self._kind
        for i in range(len(kinds)):
            if kinds[i] >= OFS_DELTA:
                continue
            oid = self._oid[i]
            assert oid is not None
            children = self._ofs_children.pop(i, [])
            if self._objects[oid].offset == self._data[i]:
                children += self._ref_children.pop(to_bin(oid), [])
            if children:
                body = self._read_entry_data(i)
                self._walk(_Frame(i, oid, kinds[i], body, 0, children))
        missing: set[bytes] = set()
        for i in range(len(kinds)):
            if kinds[i] != REF_DELTA or self._oid[i] is not None:
                continue
            base = self._base[i]
            assert isinstance(base, bytes)
            if base in missing or base not in self._ref_children:
                continue
            base_oid = from_bin(base)
            found = self._base_lookup(base_oid)
            if found is None:
                missing.add(base)
                continue
            base_type, body, depth = found
            self._external[base_oid] = depth
            children = self._ref_children.pop(base)
            self._walk(_Frame(-1, base_oid, int(base_type), body, depth, children))
        unresolved = len(kinds) - self._resolved
        if unresolved:
            self._fail_unresolved(unresolved, {b for b in missing if b in self._ref_children})

    def _walk(self, root: _Frame) -> None:
        stack = [root]
        held = len(root.body or b"")
        max_depth = self._limits.max_delta_depth
        while stack:
            # A frame is pushed only with children and popped as its last one is taken.
            frame = stack[-1]
            child = frame.children[frame.next]
            frame.next += 1
            base_body = frame.body
            last = frame.next == len(frame.children)
            if base_body is None:
                base_body = self._rebuild(frame)
                if not last:
                    frame.body = base_body
                    held += len(base_body)
            if last:
                # Drop the frame before its last child so a chain holds one body at a time.
                stack.pop()
                held -= len(frame.body or b"")
            depth = frame.depth + 1
            if depth > max_depth:
                raise DeltaTooDeep(
                    f"delta chain too deep at offset {self._starts[child]} ({depth} > {max_depth})"
                )
            body = self._apply(child, base_body, frame.entry)
            oid_bin, oid, kept_depth, is_new = self._record(
                child, frame.type, body, frame.oid, depth
            )
            children = self._ofs_children.pop(child, [])
            if is_new:
                children += self._ref_children.pop(oid_bin, [])
            if children:
                stack.append(_Frame(child, oid, frame.type, body, kept_depth, children))
                held += len(body)
                if held > self._base_cache_bytes:
                    held = self._evict(stack, held)

    def _evict(self, stack: list[_Frame], held: int) -> int:
        # The oldest frames are the ones whose bodies are needed last.
        for frame in stack[:-1]:
            if held <= self._base_cache_bytes:
                break
            if frame.body is not None:
                held -= len(frame.body)
                frame.body = None
        return held

    def _rebuild(self, frame: _Frame) -> bytes:
        """A dropped body, rebuilt from its whole (or thin) ancestor.

        Bodies are dropped from the bottom of the stack up and only the top
        frame ever gets one back, so no held frame is an ancestor of a
        dropped one: the rebuild starts from the root of the chain.
        """
        if frame.entry < 0:
            found = self._base_lookup(frame.oid)
            if found is None:
                raise PackError(f"thin-pack base {frame.oid.decode()} vanished from the store")
            return found[1]
        chain: list[int] = []
        i = frame.entry
        while True:
            if self._kind[i] < OFS_DELTA:
                body = self._read_entry_data(i)
                break
            chain.append(i)
            src = self._src[i]
            if src < 0:
                base_bin = self._base[i]
                assert isinstance(base_bin, bytes)
                found = self._base_lookup(from_bin(base_bin))
                if found is None:
                    raise PackError(f"thin-pack base {from_bin(base_bin).decode()} vanished")
                body = found[1]
                break
            i = src
        for i in reversed(chain):
            body = self._apply(i, body, self._src[i])
        return body

    def _apply(self, index: int, base_body: bytes, src: int) -> bytes:
        delta = self._delta_cache.pop(index, None)
        if delta is None:
            delta = self._read_entry_data(index)
        else:
            self._delta_cache_bytes -= len(delta)
        try:
            body = _join(apply_delta(base_body, delta))
        except ApplyDeltaError as e:
            raise PackError(
                f"bad delta in the object at offset {self._starts[index]}: {e}"
            ) from None
        if len(body) != self._size[index]:
            raise PackError(
                f"delta at offset {self._starts[index]} gave {len(body)} bytes, "
                f"its header says {self._size[index]}"
            )
        self._src[index] = src
        return body

    def _record(
        self, index: int, type_num: int, body: bytes, base: ObjectID, depth: int
    ) -> tuple[bytes, ObjectID, int, bool]:
        """Hash a resolved delta and keep it unless its id is already known."""
        if not body and type_num != ObjectType.BLOB:
            raise PackError(
                f"delta at offset {self._starts[index]} resolves to an empty "
                f"{_TYPE_NAMES[type_num].decode()}"
            )
        hasher = _object_hash(type_num, len(body))
        hasher.update(body)
        oid_bin = hasher.digest()
        oid = from_bin(oid_bin)
        self._oid[index] = oid
        self._resolved += 1
        known = self._objects.get(oid)
        if known is not None:
            return oid_bin, oid, known.depth, False
        if oid in self._external:
            # The store already holds it; recording it against a base would loop.
            return oid_bin, oid, self._external[oid], False
        self._objects[oid] = IndexedObject(
            oid,
            ObjectType(type_num),
            len(body),
            self._dsize[index],
            base,
            depth,
            self._data[index],
            self._comp[index],
        )
        if self._on_object is not None:
            self._on_object(oid, ObjectType(type_num), body)
        return oid_bin, oid, depth, True

    def _read_entry_data(self, index: int) -> bytes:
        self._spool.seek(self._data[index])
        compressed = self._spool.read(self._comp[index])
        return _inflate(compressed, self._dsize[index])

    def _fail_unresolved(self, unresolved: int, missing: set[bytes]) -> None:
        """Raise DeltaCycle when a cycle is proven, else MissingBases.

        A pack cannot show a cycle directly: a REF_DELTA names its base by
        the id of a body nobody can compute without that base.  One kind is
        provable: an unresolved delta made only of inserts needs no base, so
        its body (under each of the four types) can be hashed, and when that
        id is one of the missing bases the deltas depend on each other.
        Anything else is reported as missing bases, as git does.
        """
        for i in range(len(self._kind)):
            if self._oid[i] is not None:
                continue
            delta = self._delta_cache.get(i)
            target = _insert_only_target(delta if delta is not None else self._read_entry_data(i))
            if target is None:
                continue
            for type_num in _TYPE_NAMES:
                hasher = _object_hash(type_num, len(target))
                hasher.update(target)
                if hasher.digest() in missing:
                    raise DeltaCycle(
                        f"pack has {unresolved} unresolved deltas: delta cycle through "
                        f"{hasher.hexdigest()} (the object at offset {self._starts[i]})"
                    )
        oids = frozenset(from_bin(b) for b in missing)
        named = ", ".join(sorted(o.decode() for o in oids)[:5])
        more = f" and {len(oids) - 5} more" if len(oids) > 5 else ""
        raise MissingBases(
            f"pack has {unresolved} unresolved deltas (missing bases: {named}{more})", oids
        )


class _Reader:
    """Sequential reads of ``[pos, end)`` of the spool in large pieces, hashing what it reads."""

    def __init__(self, f: BinaryIO, start: int, end: int):
        self.f = f
        self.buf = b""
        self.pos = 0  # index into buf of the next unread byte
        self.base = start  # spool offset of buf[0]
        self.end = end
        self.sha = hashlib.sha1()
        f.seek(start)
        self._next = start  # spool offset of the next read

    def tell(self) -> int:
        return self.base + self.pos

    def fill(self, need: int) -> bool:
        """Make at least *need* unread bytes available if the pack has them; False at the end."""
        have = len(self.buf) - self.pos
        if have >= need:
            return True
        pieces = [self.buf[self.pos :]]
        while have < need and self._next < self.end:
            data = self.f.read(min(self.end - self._next, max(_READ_SIZE, need - have)))
            if not data:
                raise PackError("spooled pack shrank while it was read")
            self.sha.update(data)
            self._next += len(data)
            have += len(data)
            pieces.append(data)
        self.base += self.pos
        self.buf = b"".join(pieces)
        self.pos = 0
        return have > 0
