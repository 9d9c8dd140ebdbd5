"""Build an outgoing pack from the store's pack-ready records, copying their bytes.

This is the miss path of upload-pack: a blocking generator, run in the thread
pool, that reads records in batches and yields the pack in chunks.  A stored
entry goes out verbatim whenever its delta base is in this pack (put earlier
if need be) or, for a thin pack, the client already has the base.  Only when
neither holds is the delta chain resolved through the store and the object
compressed afresh.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Container, Iterable, Iterator, Sequence

from dulwich.errors import ApplyDeltaError
from dulwich.pack import apply_delta

from gitstratum.core.objects import PackReadyObject
from gitstratum.core.oid import ObjectID
from gitstratum.core.pack import PackWriter
from gitstratum.storage.interfaces import IObjectStore

__all__ = ["generate_pack", "resolve_object", "MissingObject", "CorruptObject", "BodyCache"]

#: longer than any chain the store accepts (its depth field is 16 bits)
_MAX_CHAIN = 1 << 16


class MissingObject(LookupError):
    """An object the pack needs is not in the object store."""

    def __init__(self, oid: ObjectID, why: str = ""):
        super().__init__(f"unable to read {oid.decode()}{why}: object missing from the store")
        self.oid = oid


class CorruptObject(ValueError):
    """A stored record cannot be inflated or its delta chain cannot be applied."""


class BodyCache:
    """Least-recently-used object bodies, bounded by their total size in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.size = 0
        self._bodies: OrderedDict[ObjectID, bytes] = OrderedDict()

    def get(self, oid: ObjectID) -> bytes | None:
        body = self._bodies.get(oid)
        if body is not None:
            self._bodies.move_to_end(oid)
        return body

    def put(self, oid: ObjectID, body: bytes) -> None:
        if len(body) > self.max_bytes or oid in self._bodies:
            return
        self._bodies[oid] = body
        self.size += len(body)
        while self.size > self.max_bytes:
            _, old = self._bodies.popitem(last=False)
            self.size -= len(old)


def generate_pack(
    store: IObjectStore,
    oids: Sequence[ObjectID],
    *,
    ofs_delta: bool,
    client_has: Container[ObjectID] = frozenset(),
    thin_pack: bool = False,
    compression_level: int = 6,
    chunk_size: int = 1 << 20,
    batch: int = 512,
    batch_bytes: int = 32 << 20,
    cache_bytes: int = 64 << 20,
) -> Iterator[bytes]:
    """Yield a pack holding exactly the objects *oids* (each once), in chunks.

    Small entries are gathered into chunks of about *chunk_size* bytes and
    larger ones pass through as they are.  Objects keep the order of *oids*
    except that a delta's base, when it is also being sent, goes first.
    Records are read at most *batch* at a time and, going by their stored
    sizes, about *batch_bytes* at a time, so large objects are never all
    held at once.  Raises MissingObject when an object (or a base needed to
    resolve one) is not stored; the error may come after the first chunks
    were yielded.
    """
    wanted = list(dict.fromkeys(oids))
    wanted_set = frozenset(wanted)
    writer = PackWriter(len(wanted))
    cache = BodyCache(cache_bytes)
    out = _Chunker(chunk_size)
    yield from out.add([writer.header()])
    for planned in _batches(store, wanted, batch, batch_bytes):
        # One generator per batch: its records die with its frame, before the
        # next batch is read, so large objects of two batches never coexist.
        yield from _send_batch(
            store,
            writer,
            out,
            planned,
            wanted_set,
            client_has,
            ofs_delta,
            thin_pack,
            compression_level,
            cache,
        )
    yield from out.add([writer.trailer()])
    yield from out.flush()


def _send_batch(
    store: IObjectStore,
    writer: PackWriter,
    out: _Chunker,
    planned: list[ObjectID],
    wanted_set: frozenset[ObjectID],
    client_has: Container[ObjectID],
    ofs_delta: bool,
    thin_pack: bool,
    compression_level: int,
    cache: BodyCache,
) -> Iterator[bytes]:
    part = [o for o in planned if writer.offset_of(o) is None]
    records = store.get_many(part)
    # Bases sent later in this pack are pulled forward: fetch them (and
    # theirs) with the batch rather than one by one.
    fetched = records
    while fetched:
        ahead: set[ObjectID] = set()
        for r in fetched.values():
            base = r.delta_base
            if base in wanted_set and base not in records and writer.offset_of(base) is None:
                ahead.add(base)
        fetched = store.get_many(ahead) if ahead else {}
        records.update(fetched)
    for oid in part:
        if writer.offset_of(oid) is not None:
            continue  # pulled forward as a base
        record = records.pop(oid, None)
        if record is None:
            raise MissingObject(oid)
        for chunks in _emit(
            store,
            writer,
            record,
            records,
            wanted_set,
            client_has,
            ofs_delta,
            thin_pack,
            compression_level,
            cache,
        ):
            yield from out.add(chunks)
        del record  # a sent object need not outlive its bytes
        chunks = []


def _batches(
    store: IObjectStore, wanted: Sequence[ObjectID], batch: int, batch_bytes: int
) -> Iterator[list[ObjectID]]:
    """Split *wanted* into runs of at most *batch* ids and about *batch_bytes* stored bytes."""
    window = batch * 16
    for i in range(0, len(wanted), window):
        ids = wanted[i : i + window]
        stats = store.stat_many(ids)
        part: list[ObjectID] = []
        held = 0
        for oid in ids:
            stat = stats.get(oid)
            cost = stat.stored_bytes if stat is not None else 0  # missing: reported when read
            if part and (len(part) >= batch or held + cost > batch_bytes):
                yield part
                part, held = [], 0
            part.append(oid)
            held += cost
        if part:
            yield part


def _emit(
    store: IObjectStore,
    writer: PackWriter,
    record: PackReadyObject,
    records: dict[ObjectID, PackReadyObject],
    wanted: frozenset[ObjectID],
    client_has: Container[ObjectID],
    ofs_delta: bool,
    thin_pack: bool,
    level: int,
    cache: BodyCache,
) -> Iterator[list[bytes]]:
    """Write *record*, after any of its bases that this pack sends but has not yet."""
    pending = [record]
    queued = {record.oid}
    while pending:
        rec = pending[-1]
        base = rec.delta_base
        if base is None:
            chunks = writer.add_stored(rec)
        elif (base_offset := writer.offset_of(base)) is not None:
            if ofs_delta:
                chunks = writer.add_stored(rec, ofs_base_offset=base_offset)
            else:
                chunks = writer.add_stored(rec, ref_base=True)
        elif base in wanted and base not in queued:
            base_rec = records.get(base) or store.get(base)
            if base_rec is None:
                raise MissingObject(base)
            pending.append(base_rec)
            queued.add(base)
            continue
        elif thin_pack and base in client_has:
            chunks = writer.add_stored(rec, ref_base=True)
        else:
            # A base that is queued but unwritten here means the stored chains
            # loop; resolving reports that instead of looping forever.
            body = resolve_object(store, rec, cache)
            chunks = writer.add_whole(rec.oid, rec.type, body, level)
        pending.pop()
        yield chunks


def resolve_object(store: IObjectStore, record: PackReadyObject, cache: BodyCache) -> bytes:
    """The full body of *record*, applying its delta chain from the store.

    Every body built on the way is offered to *cache*, since sibling deltas
    usually share their bases.
    """
    chain: list[PackReadyObject] = []
    seen: set[ObjectID] = set()
    rec: PackReadyObject | None = record
    oid = record.oid
    while True:
        body = cache.get(oid)
        if body is not None:
            break
        if rec is None:
            rec = store.get(oid)
            if rec is None:
                raise MissingObject(oid, f" (a delta base of {record.oid.decode()})")
        if rec.delta_base is None:
            body = _inflate(rec)
            cache.put(oid, body)
            break
        if oid in seen or len(chain) >= _MAX_CHAIN:
            raise CorruptObject(
                f"delta chain of {record.oid.decode()} loops through {oid.decode()}"
            )
        seen.add(oid)
        chain.append(rec)
        oid, rec = rec.delta_base, None
    for rec in reversed(chain):
        try:
            chunks = apply_delta(body, _inflate(rec))
        except ApplyDeltaError as e:
            raise CorruptObject(
                f"cannot apply the stored delta of {rec.oid.decode()}: {e}"
            ) from None
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(body) != rec.size:
            raise CorruptObject(
                f"stored delta of {rec.oid.decode()} gives {len(body)} bytes, not {rec.size}"
            )
        cache.put(rec.oid, body)
    return body


def _inflate(rec: PackReadyObject) -> bytes:
    try:
        data = zlib.decompress(rec.compressed, bufsize=max(rec.data_size, 1))
    except zlib.error as e:
        raise CorruptObject(f"stored object {rec.oid.decode()} does not inflate: {e}") from None
    if len(data) != rec.data_size:
        raise CorruptObject(
            f"stored object {rec.oid.decode()} inflates to {len(data)} bytes, not {rec.data_size}"
        )
    return data


class _Chunker:
    """Coalesce small pieces into chunks of about ``size`` bytes; slice big ones.

    Slicing keeps every write downstream (transport buffers, side-band
    framing) near ``size`` however large one stored object is.
    """

    def __init__(self, size: int):
        self.size = size
        self._parts: list[bytes] = []
        self._held = 0

    def add(self, pieces: Iterable[bytes]) -> Iterator[bytes]:
        for piece in pieces:
            if len(piece) >= self.size:
                yield from self.flush()
                view = memoryview(piece)
                for start in range(0, len(piece), self.size):
                    yield bytes(view[start : start + self.size])
                continue
            self._parts.append(piece)
            self._held += len(piece)
            if self._held >= self.size:
                yield from self.flush()

    def flush(self) -> Iterator[bytes]:
        if self._parts:
            data = b"".join(self._parts)
            self._parts.clear()
            self._held = 0
            yield data
