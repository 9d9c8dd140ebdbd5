"""Indexing a received pack: resolution, thin packs, limits and every way a pack can be bad."""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest
from dulwich.object_format import SHA1
from dulwich.pack import OFS_DELTA, REF_DELTA, apply_delta, create_delta, pack_object_header
from dulwich.repo import Repo
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gitstratum.core.indexer import (
    DeltaCycle,
    DeltaTooDeep,
    IndexedPack,
    MissingBases,
    ObjectTooLarge,
    PackError,
    PackIndexer,
    PackTooLarge,
)
from gitstratum.core.limits import Limits
from gitstratum.core.objects import ObjectType, PackReadyObject
from gitstratum.core.oid import ObjectID, from_bin, to_bin
from gitstratum.protocol.packgen import BodyCache, resolve_object
from gitstratum.storage.lmdb_objects import LMDBObjectStore
from gitstratum.testing.fixtures import edit_blob, text_blob

LIMITS = Limits()
BLOB = ObjectType.BLOB


def oid_of(type: ObjectType, body: bytes) -> ObjectID:
    return from_bin(hashlib.sha1(b"%s %d\x00" % (type.type_name, len(body)) + body).digest())


def delta(base: bytes, target: bytes) -> bytes:
    return b"".join(create_delta(base, target))


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def insert_only(source_size: int, target: bytes) -> bytes:
    """A delta that builds *target* from inserts alone, never reading its base."""
    ops = b"".join(
        bytes([len(p)]) + p for p in (target[i : i + 127] for i in range(0, len(target), 127))
    )
    return varint(source_size) + varint(len(target)) + ops


class PackBuilder:
    """Hand-made packs, including malformed ones, with a correct trailer unless told otherwise."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.offset = 12

    def raw(self, data: bytes) -> int:
        start = self.offset
        self.parts.append(data)
        self.offset += len(data)
        return start

    def entry(
        self,
        kind: int,
        data: bytes,
        base: int | bytes | None = None,
        *,
        size: int | None = None,
        compressed: bytes | None = None,
    ) -> int:
        head = pack_object_header(kind, base, len(data) if size is None else size, SHA1)
        return self.raw(bytes(head) + (zlib.compress(data) if compressed is None else compressed))

    def whole(self, body: bytes, type: ObjectType = BLOB, **kw) -> int:
        return self.entry(type, body, **kw)

    def ofs(self, base_start: int, data: bytes, **kw) -> int:
        return self.entry(OFS_DELTA, data, self.offset - base_start, **kw)

    def ref(self, base: ObjectID, data: bytes, **kw) -> int:
        return self.entry(REF_DELTA, data, to_bin(base), **kw)

    def build(
        self, count: int | None = None, version: int = 2, trailer: bytes | None = None
    ) -> bytes:
        n = len(self.parts) if count is None else count
        body = struct.pack(">4sLL", b"PACK", version, n) + b"".join(self.parts)
        return body + (hashlib.sha1(body).digest() if trailer is None else trailer)


class Seen:
    """Records on_object calls and checks each delta's base was reported before it."""

    def __init__(self) -> None:
        self.calls: list[tuple[ObjectID, ObjectType, bytes]] = []

    def __call__(self, oid: ObjectID, type: ObjectType, body: bytes) -> None:
        assert oid_of(type, body) == oid
        self.calls.append((oid, type, body))

    def check_order(self, pack: IndexedPack) -> None:
        order = {oid: i for i, (oid, _, _) in enumerate(self.calls)}
        assert len(order) == len(self.calls), "an object was reported twice"
        assert set(order) == set(pack.objects)
        for oid, rec in pack.objects.items():
            if rec.delta_base is not None and rec.delta_base in pack.objects:
                assert order[rec.delta_base] < order[oid]


def index(pack: bytes, limits: Limits = LIMITS, lookup=None, **kw) -> tuple[IndexedPack, Seen]:
    seen = Seen()
    args = (io.BytesIO(pack), limits) + ((lookup,) if lookup is not None else ())
    result = PackIndexer(*args, **kw).run(seen)
    seen.check_order(result)
    return result, seen


text = text_blob
edit = edit_blob


# -- a real repository, packed by git -----------------------------------------------


def git(*args: str, cwd: Path, input: bytes | None = None) -> bytes:
    return subprocess.run(
        ["git", *args], cwd=cwd, input=input, capture_output=True, check=True
    ).stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A repository with history, so git packs it with ofs deltas and chains; `base` is older."""
    path = tmp_path_factory.mktemp("repo")
    git("init", "-q", "-b", "main", ".", cwd=path)
    files = {f"dir{i % 3}/file{i}.txt": text(i) for i in range(12)}
    for commit in range(8):
        for i, name in enumerate(sorted(files)):
            if (i + commit) % 3 == 0:
                files[name] = edit(files[name], commit * 100 + i)
        for name, body in files.items():
            (path / name).parent.mkdir(exist_ok=True)
            (path / name).write_bytes(body)
        git("add", "-A", cwd=path)
        git("commit", "-q", "-m", f"commit {commit}", cwd=path)
        if commit == 4:
            git("branch", "base", cwd=path)
    return path


def all_objects(repo: Path, *revs: str) -> set[ObjectID]:
    out = git("rev-list", "--objects", *revs, cwd=repo)
    return {ObjectID(line[:40]) for line in out.splitlines()}


def git_pack(repo: Path, revs: str, *flags: str) -> bytes:
    return git("pack-objects", "--revs", "--stdout", *flags, cwd=repo, input=revs.encode())


def git_body(repo: Path, oid: ObjectID) -> tuple[ObjectType, bytes]:
    with Repo(str(repo)) as r:
        obj = r.object_store[oid]
        return ObjectType(obj.type_num), obj.as_raw_string()


def repo_lookup(repo: Path, depth: int = 0, calls: list[ObjectID] | None = None):
    def lookup(oid: ObjectID) -> tuple[ObjectType, bytes, int] | None:
        if calls is not None:
            calls.append(oid)
        try:
            return (*git_body(repo, oid), depth)
        except KeyError:
            return None

    return lookup


@pytest.mark.parametrize("flags", [("--delta-base-offset",), ()], ids=["ofs", "ref"])
def test_indexes_a_git_pack(repo, tmp_path, flags):
    """Every object of a git-made pack is found, with git's ids, bodies, offsets and depths."""
    pack = git_pack(repo, "main\n", *flags)
    path = tmp_path / "x.pack"
    path.write_bytes(pack)
    with open(path, "rb") as spool:
        seen = Seen()
        result = PackIndexer(spool, LIMITS).run(seen)
        seen.check_order(result)
        assert set(result.objects) == all_objects(repo, "--all")
        assert result.external_bases == frozenset()
        deltas = [o for o in result.objects.values() if o.delta_base is not None]
        assert any(o.depth > 1 for o in deltas), "the fixture should produce delta chains"
        for oid, type, body in seen.calls:
            assert git_body(repo, oid) == (type, body)
            assert result.read_object(oid) == (type, body)
        # git's own view of the same pack: where each entry ends, and chain depth.
        git("index-pack", str(path), cwd=tmp_path)
        verify = git("verify-pack", "-v", str(path), cwd=tmp_path).decode()
        checked = 0
        for line in verify.splitlines():
            fields = line.split()
            if len(fields) < 5 or len(fields[0]) != 40:
                continue
            checked += 1
            rec = result.objects[ObjectID(fields[0].encode())]
            assert rec.offset + rec.comp_len == int(fields[4]) + int(fields[3])
            assert rec.depth == (int(fields[5]) if len(fields) > 5 else 0)
            if len(fields) > 5:
                assert rec.delta_base == ObjectID(fields[6].encode())
        assert checked == len(result.objects)


def test_kept_deltas_are_the_pushed_bytes(repo):
    """A delta stays a delta record whose compressed bytes are the entry's, which rebuild the body."""
    pack = git_pack(repo, "main\n", "--delta-base-offset")
    result, seen = index(pack)
    bodies = {oid: body for oid, _, body in seen.calls}
    for oid, rec in result.objects.items():
        ready = result.pack_ready(oid)
        assert pack[rec.offset : rec.offset + rec.comp_len] == ready.compressed
        payload = zlib.decompress(ready.compressed)
        assert len(payload) == ready.data_size
        if ready.delta_base is None:
            assert payload == bodies[oid] and ready.size == len(payload)
        else:
            assert b"".join(apply_delta(bodies[ready.delta_base], payload)) == bodies[oid]
            assert ready.size == len(bodies[oid])


def test_thin_pack_takes_bases_from_the_store(repo):
    """A thin pack's REF_DELTA bases come from base_lookup, only for ids the pack lacks."""
    pack = git_pack(repo, "main\n^base\n", "--thin", "--delta-base-offset")
    calls: list[ObjectID] = []
    result, seen = index(pack, lookup=repo_lookup(repo, depth=5, calls=calls))
    new = all_objects(repo, "main", "^base")
    assert set(result.objects) == new
    assert result.external_bases, "git should have sent a thin pack"
    assert result.external_bases == frozenset(calls)
    assert not result.external_bases & new
    assert result.external_bases <= all_objects(repo, "base")
    for rec in result.objects.values():
        if rec.delta_base in result.external_bases:
            assert rec.depth == 6  # the stored depth of the base, plus one
    for oid, type, body in seen.calls:
        assert git_body(repo, oid) == (type, body)
        assert result.read_object(oid) == (type, body)


def test_thin_pack_against_the_lmdb_store(repo, tmp_path):
    """A push completed from objects an earlier push left in the LMDB store indexes in full."""
    store = LMDBObjectStore(str(tmp_path / "objects"))
    try:
        first, _ = index(git_pack(repo, "base\n", "--delta-base-offset"))
        for batch in first.iter_pack_ready(4096):
            store.put_many(batch)
        cache = BodyCache(1 << 20)

        def lookup(oid: ObjectID) -> tuple[ObjectType, bytes, int] | None:
            rec = store.get(oid)
            return None if rec is None else (rec.type, resolve_object(store, rec, cache), rec.depth)

        second, seen = index(git_pack(repo, "main\n^base\n", "--thin"), lookup=lookup)
        assert set(second.objects) == all_objects(repo, "main", "^base")
        for rec in second.objects.values():
            if rec.delta_base in second.external_bases:
                assert rec.depth == store.get(rec.delta_base).depth + 1
        for oid, type, body in seen.calls:
            assert git_body(repo, oid) == (type, body)
    finally:
        store.close()


def test_thin_pack_without_its_bases_names_them(repo):
    """Missing thin-pack bases fail like git ("unresolved deltas") and are listed."""
    pack = git_pack(repo, "main\n^base\n", "--thin")
    with pytest.raises(MissingBases, match=r"pack has \d+ unresolved deltas") as info:
        index(pack)
    assert info.value.oids
    assert info.value.oids <= all_objects(repo, "base")


def test_pack_may_start_mid_file():
    """The pack starts at the spool's position; recorded offsets are absolute in the spool."""
    b = PackBuilder()
    b.whole(b"hello\n")
    pack = b.build()
    spool = io.BytesIO(b"0123456789" + pack)
    spool.seek(10)
    result = PackIndexer(spool, LIMITS).run()
    (rec,) = result.objects.values()
    assert spool.getvalue()[rec.offset : rec.offset + rec.comp_len] == zlib.compress(b"hello\n")
    assert result.read_object(rec.oid) == (BLOB, b"hello\n")


def test_large_objects_cross_read_boundaries():
    """Objects spanning many read buffers (and zlib slices) are inflated and hashed correctly."""
    rng = random.Random(7)
    big = rng.randbytes(3 << 20)
    b = PackBuilder()
    first = b.whole(big)
    b.ofs(first, delta(big, big[:1000] + b"changed" + big[1000:]))
    b.whole(b"small after big")
    with tempfile.TemporaryFile() as spool:
        spool.write(b.build())
        spool.seek(0)
        result = PackIndexer(spool, LIMITS).run()
        assert set(result.objects) == {
            oid_of(BLOB, big),
            oid_of(BLOB, big[:1000] + b"changed" + big[1000:]),
            oid_of(BLOB, b"small after big"),
        }
        assert result.read_object(oid_of(BLOB, big)) == (BLOB, big)


def test_ref_delta_before_its_base():
    """A REF_DELTA may come before the entry holding its base."""
    base, target = text(1), edit(text(1), 2)
    b = PackBuilder()
    b.ref(oid_of(BLOB, base), delta(base, target))
    b.whole(base)
    result, seen = index(b.build())
    assert [c[0] for c in seen.calls] == [oid_of(BLOB, base), oid_of(BLOB, target)]
    assert result.objects[oid_of(BLOB, target)].delta_base == oid_of(BLOB, base)


def test_deltas_inherit_their_base_type():
    """A delta on a tree is a tree, hashed as one."""
    entry = b"100644 a.txt\x00" + bytes(20)
    tree, tree2 = entry, entry + b"100644 b.txt\x00" + bytes(range(20))
    b = PackBuilder()
    start = b.whole(tree, ObjectType.TREE)
    b.ofs(start, delta(tree, tree2))
    result, _ = index(b.build())
    assert result.objects[oid_of(ObjectType.TREE, tree2)].type == ObjectType.TREE


def test_on_object_errors_propagate():
    """An exception from on_object (the caller's fsck) aborts indexing unchanged."""

    class Refused(Exception):
        pass

    def refuse(oid, type, body):
        if body == b"bad":
            raise Refused(oid)

    b = PackBuilder()
    b.whole(b"good")
    b.whole(b"bad")
    with pytest.raises(Refused):
        PackIndexer(io.BytesIO(b.build()), LIMITS).run(refuse)


def test_runs_once():
    """An indexer is single-use: its state belongs to one pack."""
    b = PackBuilder()
    b.whole(b"x")
    indexer = PackIndexer(io.BytesIO(b.build()), LIMITS)
    indexer.run()
    with pytest.raises(RuntimeError):
        indexer.run()


# -- duplicates ---------------------------------------------------------------------


def test_duplicate_whole_objects_keep_the_first():
    """The same object twice is recorded once, at its first entry, and reported once."""
    b = PackBuilder()
    b.whole(b"same")
    b.whole(b"other")
    b.whole(b"same", compressed=zlib.compress(b"same", 1))
    result, seen = index(b.build())
    assert len(result.objects) == 2 and len(seen.calls) == 2
    assert result.pack_ready(oid_of(BLOB, b"same")).compressed == zlib.compress(b"same")


def test_delta_that_duplicates_a_whole_object_is_dropped():
    """A delta resolving to an object already in the pack leaves the whole copy in place."""
    base, target = text(3), edit(text(3), 4)
    b = PackBuilder()
    first = b.whole(base)
    b.whole(target)
    b.ofs(first, delta(base, target))
    result, seen = index(b.build())
    assert result.objects[oid_of(BLOB, target)].delta_base is None
    assert len(seen.calls) == 2


def test_children_of_a_duplicate_entry_resolve():
    """A delta based on the second copy of an object resolves, with depth from the kept copy."""
    base, target = text(5), edit(text(5), 6)
    b = PackBuilder()
    b.whole(base)
    second = b.whole(base)
    b.ofs(second, delta(base, target))
    b.ref(oid_of(BLOB, target), delta(target, edit(target, 7)))
    result, _ = index(b.build())
    assert len(result.objects) == 3
    assert result.objects[oid_of(BLOB, target)].depth == 1
    assert result.objects[oid_of(BLOB, edit(target, 7))].depth == 2


def test_delta_reproducing_its_thin_base_is_not_recorded():
    """A delta resolving to the store object it is based on adds nothing (and no self-loop)."""
    base = text(8)
    b = PackBuilder()
    b.ref(oid_of(BLOB, base), delta(base, base))
    result, seen = index(b.build(), lookup=lambda oid: (BLOB, base, 0))
    assert result.objects == {} and seen.calls == []
    assert result.external_bases == {oid_of(BLOB, base)}


# -- bounded memory -----------------------------------------------------------------


def bushy_pack() -> tuple[bytes, dict[ObjectID, bytes], ObjectID]:
    """Wide and deep delta trees on a whole base and on a thin base."""
    bodies: dict[ObjectID, bytes] = {}
    b = PackBuilder()
    root = text(10, 200)
    start = b.whole(root)
    bodies[oid_of(BLOB, root)] = root
    thin = text(11, 200)
    level = [(start, root)]
    for depth in range(3):
        nxt = []
        for parent_start, parent in level:
            for k in range(3):
                child = edit(parent, depth * 100 + k + len(nxt))
                bodies[oid_of(BLOB, child)] = child
                nxt.append((b.ofs(parent_start, delta(parent, child)), child))
        level = nxt
    parents = [thin]
    for k in range(6):
        child = edit(parents[k // 2], 1000 + k)
        bodies[oid_of(BLOB, child)] = child
        b.ref(oid_of(BLOB, parents[k // 2]), delta(parents[k // 2], child))
        parents.append(child)
    return b.build(), bodies, oid_of(BLOB, thin)


@pytest.mark.parametrize("cache", [0, 1, 9000, 96 << 20])
def test_resolution_is_the_same_under_any_base_cache(cache):
    """Dropping held bases (and rebuilding them from the spool) never changes the result."""
    pack, bodies, thin = bushy_pack()
    thin_body = text(11, 200)
    lookups: list[ObjectID] = []

    def lookup(oid):
        lookups.append(oid)
        return (BLOB, thin_body, 0) if oid == thin else None

    result, seen = index(pack, lookup=lookup, base_cache_bytes=cache)
    assert {oid: body for oid, _, body in seen.calls} == bodies
    assert result.external_bases == {thin}
    assert set(lookups) == {thin}
    if cache >= 1 << 20:
        assert lookups == [thin]  # nothing was dropped, so nothing was rebuilt
    reference, _ = index(pack, lookup=lookup)
    assert result.objects == reference.objects


# -- IndexedPack --------------------------------------------------------------------


def test_iter_pack_ready_batches_are_bounded(repo):
    """Batches hold at most batch_bytes of compressed data (or one bigger record), in pack order."""
    pack = git_pack(repo, "main\n", "--delta-base-offset")
    result, _ = index(pack)
    batches = list(result.iter_pack_ready(2000))
    assert len(batches) > 1
    flat = [r for batch in batches for r in batch]
    assert [r.oid for r in flat] == sorted(result.objects, key=lambda o: result.objects[o].offset)
    for batch in batches:
        assert len(batch) == 1 or sum(len(r.compressed) for r in batch) <= 2000
    for rec in flat:
        assert rec == result.pack_ready(rec.oid)
        assert isinstance(rec, PackReadyObject)


def test_pack_ready_of_unknown_object_is_a_key_error():
    """Asking for an object the pack does not hold is a KeyError, not garbage."""
    b = PackBuilder()
    b.whole(b"x")
    result, _ = index(b.build())
    with pytest.raises(KeyError):
        result.pack_ready(oid_of(BLOB, b"y"))
    with pytest.raises(KeyError):
        result.read_object(oid_of(BLOB, b"y"))


# -- limits -------------------------------------------------------------------------


def chain_pack(length: int) -> bytes:
    body = text(20)
    b = PackBuilder()
    start = b.whole(body)
    for i in range(length):
        nxt = edit(body, i)
        start = b.ofs(start, delta(body, nxt))
        body = nxt
    return b.build()


def test_max_pack_bytes():
    """A pack longer than max_pack_bytes is refused before anything is read."""
    pack = chain_pack(2)
    with pytest.raises(PackTooLarge, match="exceeds maximum allowed size"):
        index(pack, Limits(max_pack_bytes=len(pack) - 1))
    index(pack, Limits(max_pack_bytes=len(pack)))


def test_max_pack_objects():
    """A header announcing more objects than allowed is refused."""
    pack = chain_pack(2)
    with pytest.raises(PackTooLarge, match="too many objects"):
        index(pack, Limits(max_pack_objects=2))
    index(pack, Limits(max_pack_objects=3))


def test_max_object_bytes_is_checked_before_inflating():
    """An entry whose header claims a huge size is refused without inflating it."""
    b = PackBuilder()
    b.whole(b"tiny", size=1 << 40)
    with pytest.raises(ObjectTooLarge, match="larger than the 1000-byte limit"):
        index(b.build(), Limits(max_object_bytes=1000))
    b = PackBuilder()
    b.whole(b"x" * 1000)
    index(b.build(), Limits(max_object_bytes=1000))


def test_max_object_bytes_applies_to_delta_targets():
    """A small delta that would build an oversized object is refused from its header."""
    base = b"a" * 1000
    b = PackBuilder()
    start = b.whole(base)
    b.ofs(start, delta(base, base * 50))
    pack = b.build()
    with pytest.raises(ObjectTooLarge):
        index(pack, Limits(max_object_bytes=10_000))
    index(pack, Limits(max_object_bytes=50_000))


def test_max_inflated_bytes():
    """The total inflated size of the pack's objects is bounded."""
    b = PackBuilder()
    for i in range(3):
        b.whole(bytes([i]) * 1000)
    pack = b.build()
    with pytest.raises(PackTooLarge, match="inflates to more than 2999 bytes"):
        index(pack, Limits(max_inflated_bytes=2999))
    index(pack, Limits(max_inflated_bytes=3000))


def test_max_delta_depth():
    """A chain one longer than max_delta_depth is refused; one at the limit is accepted."""
    with pytest.raises(DeltaTooDeep, match=r"\(5 > 4\)"):
        index(chain_pack(5), Limits(max_delta_depth=4))
    result, _ = index(chain_pack(4), Limits(max_delta_depth=4))
    assert max(o.depth for o in result.objects.values()) == 4


def test_max_delta_depth_counts_the_stored_base_depth():
    """A thin delta on a stored base at the depth limit would exceed it."""
    base = text(30)
    b = PackBuilder()
    b.ref(oid_of(BLOB, base), delta(base, edit(base, 1)))
    pack = b.build()
    with pytest.raises(DeltaTooDeep):
        index(pack, Limits(max_delta_depth=3), lookup=lambda oid: (BLOB, base, 3))
    result, _ = index(pack, Limits(max_delta_depth=4), lookup=lambda oid: (BLOB, base, 3))
    assert result.objects[oid_of(BLOB, edit(base, 1))].depth == 4


# -- malformed packs ----------------------------------------------------------------


def test_bad_signature_and_version():
    """Not a pack, or a version git does not write, is refused like git does."""
    b = PackBuilder()
    b.whole(b"x")
    pack = b.build()
    with pytest.raises(PackError, match="pack signature mismatch"):
        index(b"KCAP" + pack[4:])
    with pytest.raises(PackError, match="pack version 4 unsupported"):
        index(b.build(version=4))


@pytest.mark.parametrize("data", [b"", b"PACK", b"PACK\x00\x00\x00\x02\x00\x00\x00\x00"])
def test_too_short_to_be_a_pack(data):
    """Fewer bytes than a header and trailer is a truncated pack."""
    with pytest.raises(PackError, match="early EOF"):
        index(data)


def test_empty_pack_is_valid():
    """A pack of no objects indexes to nothing."""
    result, _ = index(PackBuilder().build())
    assert result.objects == {}


def test_fewer_objects_than_announced():
    """A header count larger than the entries present is a truncated pack."""
    b = PackBuilder()
    b.whole(b"x")
    with pytest.raises(PackError, match="early EOF"):
        index(b.build(count=2))


def test_more_objects_than_announced():
    """Entries beyond the header's count are junk, as git says."""
    b = PackBuilder()
    b.whole(b"x")
    b.whole(b"y")
    with pytest.raises(PackError, match="junk at the end"):
        index(b.build(count=1))


def test_checksum_mismatch():
    """A trailer that is not the SHA-1 of the pack is refused."""
    b = PackBuilder()
    b.whole(b"x")
    with pytest.raises(PackError, match=r"SHA1 mismatch"):
        index(b.build(trailer=bytes(20)))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_truncation_is_a_pack_error(repo, data):
    """Cutting a valid pack anywhere gives a PackError, never another exception."""
    pack = _small_git_pack(repo)
    cut = data.draw(st.integers(min_value=0, max_value=len(pack) - 1))
    with pytest.raises(PackError):
        index(pack[:cut])


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_corrupted_byte_is_a_pack_error(repo, data):
    """Changing any one byte of a valid pack gives a PackError, never another exception."""
    pack = bytearray(_small_git_pack(repo))
    at = data.draw(st.integers(min_value=0, max_value=len(pack) - 1))
    pack[at] ^= data.draw(st.integers(min_value=1, max_value=255))
    with pytest.raises(PackError):
        index(bytes(pack))


_SMALL_PACKS: dict[Path, bytes] = {}


def _small_git_pack(repo: Path) -> bytes:
    if repo not in _SMALL_PACKS:
        _SMALL_PACKS[repo] = git_pack(repo, "base\n^base~2\n", "--delta-base-offset")
    return _SMALL_PACKS[repo]


def test_unknown_object_type():
    """Type 5 (reserved) is not an object type."""
    b = PackBuilder()
    b.entry(5, b"x")
    with pytest.raises(PackError, match="unknown object type 5"):
        index(b.build())


def test_corrupt_zlib_stream():
    """Bytes that are not a zlib stream are a PackError even under a valid trailer."""
    b = PackBuilder()
    b.whole(b"hello", compressed=b"\x78\x9c" + b"\xff" * 30)
    with pytest.raises(PackError, match="corrupt zlib stream"):
        index(b.build())


def test_inflated_size_must_match_header():
    """An entry inflating to more or fewer bytes than its header says is refused."""
    b = PackBuilder()
    b.whole(b"0123456789", size=5)
    with pytest.raises(PackError, match="more than the 5 bytes"):
        index(b.build())
    b = PackBuilder()
    b.whole(b"0123456789", size=20)
    with pytest.raises(PackError, match="inflates to 10 bytes, its header says 20"):
        index(b.build())


def test_ofs_delta_offset_zero_is_a_cycle():
    """An OFS_DELTA naming itself as base is a delta cycle."""
    b = PackBuilder()
    b.whole(b"x")
    b.entry(OFS_DELTA, delta(b"x", b"xy"), 0)
    with pytest.raises(DeltaCycle, match="delta offset 0 is invalid"):
        index(b.build())


def test_ofs_delta_before_the_pack():
    """An OFS_DELTA reaching back past the first entry is out of bound."""
    b = PackBuilder()
    b.whole(b"x")
    b.entry(OFS_DELTA, delta(b"x", b"xy"), b.offset - 5)
    with pytest.raises(PackError, match="out of bound"):
        index(b.build())


def test_ofs_delta_into_the_middle_of_an_entry():
    """An OFS_DELTA must point at the start of an entry."""
    b = PackBuilder()
    start = b.whole(b"some base body")
    b.ofs(start + 1, delta(b"x", b"xy"))
    with pytest.raises(PackError, match="is not the start of an object"):
        index(b.build())


def test_ofs_delta_offset_overflow():
    """An OFS_DELTA offset of absurd length is refused, not looped over."""
    b = PackBuilder()
    b.whole(b"x")
    b.raw(bytes(pack_object_header(OFS_DELTA, 1, 2, SHA1))[:-1] + b"\xff" * 12 + b"\x01")
    with pytest.raises(PackError, match="offset value overflow"):
        index(b.build())


def test_delta_that_does_not_apply():
    """A delta whose source size does not match its base is a PackError."""
    b = PackBuilder()
    start = b.whole(b"short")
    b.ofs(start, delta(b"a longer base than the real one", b"target"))
    with pytest.raises(PackError, match="bad delta"):
        index(b.build())


def test_delta_resolving_to_an_empty_tree_body():
    """Only a blob may be empty; a delta making an empty tree is refused."""
    tree = b"100644 a\x00" + bytes(20)
    b = PackBuilder()
    start = b.whole(tree, ObjectType.TREE)
    b.ofs(start, varint(len(tree)) + varint(0))
    with pytest.raises(PackError, match="resolves to an empty tree"):
        index(b.build())


def test_corrupt_delta_header():
    """A delta too short to hold its size header is refused in the first pass."""
    b = PackBuilder()
    start = b.whole(b"x")
    b.ofs(start, b"\x80")
    with pytest.raises(PackError, match="corrupt delta header"):
        index(b.build())


def test_ref_delta_cycle_is_reported_as_a_cycle():
    """Two REF_DELTAs based on each other (one needing no base at all) are a delta cycle."""
    a, b_body = text(40), edit(text(40), 41)
    b = PackBuilder()
    b.ref(oid_of(BLOB, b_body), delta(b_body, a))
    b.ref(oid_of(BLOB, a), insert_only(len(a), b_body))
    with pytest.raises(DeltaCycle, match="pack has 2 unresolved deltas: delta cycle"):
        index(b.build())


def test_delta_based_on_itself_is_a_cycle():
    """A REF_DELTA whose own result is its base is a delta cycle."""
    body = text(42)
    b = PackBuilder()
    b.ref(oid_of(BLOB, body), insert_only(len(body), body))
    with pytest.raises(DeltaCycle):
        index(b.build())


def test_unprovable_cycle_is_reported_as_missing_bases():
    """Deltas that only copy from bases nobody has are missing bases, as git reports them."""
    a, b_body = text(43), edit(text(43), 44)
    b = PackBuilder()
    b.ref(oid_of(BLOB, b_body), delta(b_body, a))
    b.ref(oid_of(BLOB, a), delta(a, b_body))
    with pytest.raises(MissingBases, match="pack has 2 unresolved deltas") as info:
        index(b.build())
    assert info.value.oids == {oid_of(BLOB, a), oid_of(BLOB, b_body)}
    assert not isinstance(info.value, DeltaCycle)


def test_ofs_chain_on_a_missing_ref_base_counts_every_delta():
    """Deltas hanging off an unresolved REF_DELTA are unresolved too, and counted."""
    base = text(45)
    b = PackBuilder()
    first = b.ref(oid_of(BLOB, base), delta(base, edit(base, 1)))
    b.ofs(first, delta(edit(base, 1), edit(base, 2)))
    with pytest.raises(MissingBases, match="pack has 2 unresolved deltas") as info:
        index(b.build())
    assert info.value.oids == {oid_of(BLOB, base)}


# -- random delta forests -----------------------------------------------------------


@st.composite
def forests(draw):
    """Distinct bodies, each whole or a delta on another, laid out in a random pack order."""
    n = draw(st.integers(min_value=1, max_value=10))
    seed = draw(st.integers(min_value=0, max_value=2**32))
    rng = random.Random(seed)
    bases: list[int | None] = []
    for i in range(n):
        bases.append(None if i == 0 or rng.random() < 0.3 else rng.randrange(i))
    types = [rng.choice(list(ObjectType)) for _ in range(n)]
    bodies: list[bytes] = []
    for i in range(n):
        if bases[i] is None:
            bodies.append(rng.randbytes(rng.randrange(1, 400)))
        else:
            parent = bodies[bases[i]]
            cut = rng.randrange(len(parent) + 1)
            bodies.append(parent[:cut] + rng.randbytes(rng.randrange(1, 50)) + parent[cut:])
            types[i] = types[bases[i]]
    thin = {i for i in range(n) if bases[i] is None and i in bases and rng.random() < 0.4}
    order = [i for i in range(n) if i not in thin]
    rng.shuffle(order)
    use_ofs = [rng.random() < 0.6 for _ in range(n)]
    cache = draw(st.sampled_from([0, 100, 1 << 20]))
    return bases, types, bodies, thin, order, use_ofs, cache


@settings(max_examples=120, deadline=None)
@given(forests())
def test_random_delta_forests_resolve(forest):
    """Any acyclic mix of whole, OFS and REF entries in any order, thin or not, resolves exactly."""
    bases, types, bodies, thin, order, use_ofs, cache = forest
    oids = [oid_of(t, body) for t, body in zip(types, bodies, strict=True)]
    assume(len(set(oids)) == len(oids))
    b = PackBuilder()
    starts: dict[int, int] = {}
    for i in order:
        base = bases[i]
        if base is None:
            starts[i] = b.whole(bodies[i], types[i])
        elif use_ofs[i] and base in starts:
            starts[i] = b.ofs(starts[base], delta(bodies[base], bodies[i]))
        else:
            starts[i] = b.ref(oids[base], delta(bodies[base], bodies[i]))

    def lookup(oid):
        i = oids.index(oid)
        return (types[i], bodies[i], 0) if i in thin else None

    result, seen = index(b.build(), lookup=lookup, base_cache_bytes=cache)
    assert set(result.objects) == {oids[i] for i in order}
    assert result.external_bases == {oids[i] for i in thin}

    def depth(i):
        return 0 if bases[i] is None else depth(bases[i]) + 1

    for i in order:
        rec = result.objects[oids[i]]
        assert rec.type == types[i] and rec.size == len(bodies[i])
        assert rec.delta_base == (None if bases[i] is None else oids[bases[i]])
        assert rec.depth == depth(i)
        assert result.read_object(oids[i]) == (types[i], bodies[i])
    assert sorted(seen.calls) == sorted((oids[i], types[i], bodies[i]) for i in order)


def test_spool_file_descriptor_is_left_open(tmp_path):
    """The indexer reads the caller's spool but leaves it open for the records to be read later."""
    path = tmp_path / "p.pack"
    b = PackBuilder()
    b.whole(b"kept")
    path.write_bytes(b.build())
    with open(path, "rb") as spool:
        result = PackIndexer(spool, LIMITS).run()
        assert not spool.closed
        assert result.read_object(oid_of(BLOB, b"kept")) == (BLOB, b"kept")
    assert os.path.exists(path)
