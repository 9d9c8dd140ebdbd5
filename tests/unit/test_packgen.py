"""Building outgoing packs from the LMDB store: verbatim reuse, base ordering, thin packs, resolution."""

from __future__ import annotations

import hashlib
import io
import random
import subprocess
import zlib
from collections.abc import Iterable
from pathlib import Path

import pytest
from dulwich.object_format import SHA1
from dulwich.objects import Blob
from dulwich.pack import OFS_DELTA, REF_DELTA, Pack, PackData, PackStreamReader, create_delta
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zope.interface import implementer

from gitstratum.core.indexer import IndexedPack, PackIndexer
from gitstratum.core.limits import Limits
from gitstratum.core.objects import ObjectType, PackReadyObject
from gitstratum.core.oid import ObjectID
from gitstratum.protocol.packgen import (
    BodyCache,
    CorruptObject,
    MissingObject,
    generate_pack,
    resolve_object,
)
from gitstratum.storage.interfaces import IObjectStore, ObjectStat
from gitstratum.storage.lmdb_objects import LMDBObjectStore
from gitstratum.testing.fixtures import edit_blob, text_blob


def git(*args: str, cwd: Path, input: bytes | None = None) -> bytes:
    return subprocess.run(
        ["git", *args], cwd=cwd, input=input, capture_output=True, check=True
    ).stdout


text = text_blob
edit = edit_blob


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A repository with history (so deltas and chains), with branch `base` at an older commit."""
    path = tmp_path_factory.mktemp("repo")
    git("init", "-q", "-b", "main", ".", cwd=path)
    files = {f"dir{i % 3}/file{i}.txt": text(i) for i in range(12)}
    files["big.bin"] = random.Random(99).randbytes(300_000)
    for commit in range(8):
        for i, name in enumerate(sorted(files)):
            if (i + commit) % 3 == 0 and name.endswith(".txt"):
                files[name] = edit(files[name], commit * 100 + i)
        for name, body in files.items():
            (path / name).parent.mkdir(exist_ok=True)
            (path / name).write_bytes(body)
        git("add", "-A", cwd=path)
        git("commit", "-q", "-m", f"commit {commit}", cwd=path)
        if commit == 4:
            git("branch", "base", cwd=path)
    return path


def rev_objects(repo: Path, *revs: str) -> list[ObjectID]:
    out = git("rev-list", "--objects", *revs, cwd=repo)
    return [ObjectID(line[:40]) for line in out.splitlines()]


def index_bytes(pack: bytes, lookup=None) -> IndexedPack:
    args = (io.BytesIO(pack), Limits()) + ((lookup,) if lookup is not None else ())
    return PackIndexer(*args).run()


@pytest.fixture(scope="module")
def store(repo, tmp_path_factory):
    """The real LMDB store holding every object of the repository as a push would leave it."""
    s = LMDBObjectStore(str(tmp_path_factory.mktemp("objects")))
    pushed = git(
        "pack-objects", "--revs", "--stdout", "--delta-base-offset", cwd=repo, input=b"main\n"
    )
    for batch in index_bytes(pushed).iter_pack_ready():
        s.put_many(batch)
    yield s
    s.close()


@implementer(IObjectStore)
class CountingStore:
    """The LMDB store, with its reads counted."""

    def __init__(self, inner: LMDBObjectStore):
        self.inner = inner
        self.get_many_sizes: list[int] = []
        self.get_many_bytes: list[int] = []
        self.gets: list[ObjectID] = []
        self.requested: set[ObjectID] = set()

    def contains(self, oids: Iterable[ObjectID]) -> set[ObjectID]:
        return self.inner.contains(oids)

    def get(self, oid: ObjectID) -> PackReadyObject | None:
        self.gets.append(oid)
        return self.inner.get(oid)

    def get_many(self, oids: Iterable[ObjectID]) -> dict[ObjectID, PackReadyObject]:
        oids = list(oids)
        self.get_many_sizes.append(len(oids))
        records = self.inner.get_many(oids)
        self.get_many_bytes.append(sum(len(r.compressed) for r in records.values()))
        self.requested.update(oids)
        return records

    def stat_many(self, oids: Iterable[ObjectID]) -> dict[ObjectID, ObjectStat]:
        return self.inner.stat_many(oids)

    def put_many(self, objects: Iterable[PackReadyObject]) -> int:
        return self.inner.put_many(objects)

    def delete_many(self, oids: Iterable[ObjectID]) -> int:
        return self.inner.delete_many(oids)


def pack_of(store, oids, **kw) -> bytes:
    kw.setdefault("ofs_delta", True)
    return b"".join(generate_pack(store, oids, **kw))


def git_accepts(tmp_path: Path, pack: bytes, *flags: str, repo: Path | None = None) -> Path:
    target = repo
    if target is None:
        target = tmp_path / "client.git"
        git("init", "-q", "--bare", str(target), cwd=tmp_path)
    result = subprocess.run(
        ["git", "-C", str(target), "index-pack", "--stdin", "--strict", *flags],
        input=pack,
        capture_output=True,
    )
    assert result.returncode == 0, result.stderr.decode()
    return target


def base_clone(repo: Path, tmp_path: Path) -> Path:
    """A client that has fetched `base` only."""
    client = tmp_path / "client.git"
    git(
        "clone",
        "-q",
        "--bare",
        "--single-branch",
        "-b",
        "base",
        str(repo),
        str(client),
        cwd=tmp_path,
    )
    return client


def entry_kinds(tmp_path: Path, pack: bytes) -> dict[int, int]:
    """pack type number of each entry, by offset, as dulwich reads them."""
    path = tmp_path / "out.pack"
    path.write_bytes(pack)
    with PackData(str(path), SHA1) as data:
        return {u.offset: u.pack_type_num for u in data.iter_unpacked()}


# -- whole repository ------------------------------------------------------------


@pytest.mark.parametrize("ofs", [True, False])
def test_full_pack_is_accepted_by_git(repo, store, tmp_path, ofs):
    """A pack of every object, deltas reused, passes git index-pack --strict; git reads it all."""
    oids = rev_objects(repo, "main")
    pack = pack_of(store, oids, ofs_delta=ofs)
    client = git_accepts(tmp_path, pack)
    listed = git("cat-file", "--batch-all-objects", "--batch-check=%(objectname)", cwd=client)
    assert set(listed.split()) == set(oids)
    kinds = set(entry_kinds(tmp_path, pack).values())
    assert (OFS_DELTA in kinds) == ofs and (REF_DELTA in kinds) == (not ofs)


def test_full_pack_reads_back_with_dulwich(repo, store, tmp_path):
    """dulwich resolves every object of the generated pack to git's bytes."""
    oids = rev_objects(repo, "main")
    (tmp_path / "p.pack").write_bytes(pack_of(store, oids))
    with PackData(str(tmp_path / "p.pack"), SHA1) as data:
        data.create_index(str(tmp_path / "p.idx"))
    with Pack(str(tmp_path / "p"), object_format=SHA1) as pack:
        got = {o.id: o for o in pack.iterobjects()}
    assert set(got) == set(oids)
    for oid in random.Random(1).sample(oids, 20):
        kind = got[oid].type_name.decode()
        assert got[oid].as_raw_string() == git("cat-file", kind, oid.decode(), cwd=repo)


def test_reused_entries_keep_their_exact_bytes(repo, store):
    """Every stored record goes out byte for byte, as the same delta on the same base."""
    oids = rev_objects(repo, "main")
    out = index_bytes(pack_of(store, oids))
    stored = store.get_many(oids)
    assert set(out.objects) == set(oids)
    for oid in oids:
        assert out.pack_ready(oid) == stored[oid]
    assert any(r.delta_base for r in stored.values())


def test_bases_are_sent_before_their_deltas(repo, store):
    """Given deltas before their bases, the pack moves each base forward, sending it once."""
    oids = rev_objects(repo, "main")
    stored = store.get_many(oids)
    deltas_first = sorted(oids, key=lambda o: -stored[o].depth)
    pack = pack_of(store, deltas_first)
    out = index_bytes(pack)
    assert set(out.objects) == set(oids)
    assert int.from_bytes(pack[8:12], "big") == len(oids)
    for oid in oids:
        assert out.pack_ready(oid) == stored[oid]  # still reused, none resolved


def test_duplicate_requests_are_sent_once(repo, store):
    """An id listed twice is one entry, and the header counts it once."""
    oids = rev_objects(repo, "main")[:10]
    pack = pack_of(store, oids + oids[::-1])
    assert int.from_bytes(pack[8:12], "big") == len(set(oids))
    assert set(index_bytes(pack).objects) == set(oids)


# -- partial packs: resolution and thin packs ----------------------------------------


def test_delta_without_its_base_is_resolved_and_recompressed(repo, store, tmp_path):
    """A delta whose base is neither sent nor had goes out whole, compressed at the given level."""
    stored = store.get_many(rev_objects(repo, "main"))
    deep = max(stored.values(), key=lambda r: r.depth)
    assert deep.depth >= 2
    pack = pack_of(store, [deep.oid], compression_level=1)
    git_accepts(tmp_path, pack)
    out = index_bytes(pack)
    rec = out.pack_ready(deep.oid)
    body = git("cat-file", deep.type.type_name.decode(), deep.oid.decode(), cwd=repo)
    assert rec.delta_base is None and rec.depth == 0
    assert rec.compressed == zlib.compress(body, 1)


def test_incremental_pack_resolves_bases_the_client_lacks(repo, store, tmp_path):
    """Without thin-pack, objects based on the client's objects are resolved, and git takes them."""
    new = rev_objects(repo, "main", "^base")
    have = set(rev_objects(repo, "base"))
    pack = pack_of(store, new, client_has=have, thin_pack=False)
    out = index_bytes(pack)
    assert set(out.objects) == set(new)
    assert out.external_bases == frozenset()
    git_accepts(tmp_path, pack, repo=base_clone(repo, tmp_path))


def test_thin_pack_refers_to_client_objects(repo, store, tmp_path):
    """With thin-pack, deltas on objects the client has go out as REF_DELTAs, verbatim."""
    new = rev_objects(repo, "main", "^base")
    have = set(rev_objects(repo, "base"))
    pack = pack_of(store, new, client_has=have, thin_pack=True)
    stored = store.get_many(new)
    thin_deltas = {
        o for o in new if stored[o].delta_base in have and stored[o].delta_base not in new
    }
    assert thin_deltas, "the fixture should give deltas on old objects"

    def lookup(oid):
        kind = git("cat-file", "-t", oid.decode(), cwd=repo).strip()
        return ObjectType.from_name(kind), git("cat-file", kind.decode(), oid.decode(), cwd=repo), 0

    out = index_bytes(pack, lookup)
    assert out.external_bases
    assert out.external_bases <= have
    for oid in thin_deltas:
        assert out.pack_ready(oid).compressed == stored[oid].compressed
    client = git_accepts(tmp_path, pack, "--fix-thin", repo=base_clone(repo, tmp_path))
    for oid in new:
        git("cat-file", "-e", oid.decode(), cwd=client)


def test_thin_pack_without_client_objects_is_self_contained(repo, store, tmp_path):
    """thin_pack with an empty client_has never refers outside the pack."""
    new = rev_objects(repo, "main", "^base")
    pack = pack_of(store, new, thin_pack=True)
    assert index_bytes(pack).external_bases == frozenset()
    git_accepts(tmp_path, pack, repo=base_clone(repo, tmp_path))


def test_siblings_share_resolved_bases(scratch):
    """Resolution caches bodies, so siblings on one unsent base read that base once."""
    base = text(6, 400)
    siblings = [delta_record(base, edit(base, i)) for i in range(4)]
    scratch.put_many([blob_record(base), *siblings])
    counting = CountingStore(scratch)
    out = index_bytes(pack_of(counting, [r.oid for r in siblings]))
    assert counting.gets.count(blob_record(base).oid) == 1
    for i, r in enumerate(siblings):
        assert out.read_object(r.oid) == (ObjectType.BLOB, edit(base, i))
        assert out.objects[r.oid].delta_base is None


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_subset_makes_a_valid_pack(repo, store, data):
    """Any subset, in any order, with any options, indexes back to exactly that subset."""
    oids = rev_objects(repo, "main")
    subset = data.draw(st.lists(st.sampled_from(oids), max_size=60))
    have = set(data.draw(st.lists(st.sampled_from(oids), max_size=60)))
    ofs = data.draw(st.booleans())
    thin = data.draw(st.booleans())
    chunk = data.draw(st.sampled_from([1, 100, 1 << 20]))
    pack = pack_of(
        store, subset, ofs_delta=ofs, client_has=have, thin_pack=thin, chunk_size=chunk, batch=7
    )
    cache = BodyCache(1 << 20)

    def lookup(oid):
        if oid not in have:
            return None
        rec = store.get(oid)
        return rec.type, resolve_object(store, rec, cache), rec.depth

    out = index_bytes(pack, lookup)
    assert set(out.objects) == set(subset)
    assert out.external_bases <= (have if thin else set())
    assert int.from_bytes(pack[8:12], "big") == len(set(subset))


# -- chunking and batching -----------------------------------------------------------


def test_chunks_coalesce_small_entries_and_slice_big_ones(repo, store):
    """Small entries are gathered to chunk_size; a bigger entry goes out in chunk_size slices."""
    oids = rev_objects(repo, "main")
    stored = store.get_many(oids)
    big = max(stored.values(), key=lambda r: len(r.compressed))
    assert len(big.compressed) > 10_000
    chunks = list(generate_pack(store, oids, ofs_delta=True, chunk_size=4096))
    assert b"".join(chunks) == pack_of(store, oids, chunk_size=1 << 30)
    first = chunks.index(big.compressed[:4096])
    slices = len(big.compressed) // 4096 + 1
    assert b"".join(chunks[first : first + slices]) == big.compressed
    assert all(len(c) < 2 * 4096 for c in chunks)  # never one huge write downstream
    assert len(list(generate_pack(store, oids, ofs_delta=True))) <= 2


def test_records_are_read_in_batches(repo, store):
    """The store is read with get_many in batches of at most `batch` ids."""
    oids = rev_objects(repo, "main")
    counting = CountingStore(store)
    pack_of(counting, oids, batch=16)
    assert max(counting.get_many_sizes) <= 16
    assert counting.requested == set(oids)
    assert counting.gets == []  # every base arrived with its batch or before


def test_batches_are_bounded_in_bytes(repo, store):
    """With batch_bytes small, no read holds more than one record beyond the bound."""
    oids = rev_objects(repo, "main")
    counting = CountingStore(store)
    largest = max(len(r.compressed) for r in store.get_many(oids).values())
    whole = pack_of(store, oids)
    assert pack_of(counting, oids, batch_bytes=2048) == whole
    assert max(counting.get_many_bytes) <= 2048 + largest
    assert len(counting.get_many_sizes) > len(oids) // 16


# -- failures ------------------------------------------------------------------------


def test_missing_object_is_a_clear_error(store):
    """An id the store does not hold is reported by id."""
    ghost = ObjectID(b"1" * 40)
    with pytest.raises(MissingObject, match="unable to read 1111111111") as info:
        pack_of(store, [ghost])
    assert info.value.oid == ghost


def blob_record(body: bytes) -> PackReadyObject:
    oid = ObjectID(Blob.from_string(body).id)
    return PackReadyObject(oid, ObjectType.BLOB, len(body), len(body), zlib.compress(body))


def delta_record(base: bytes, body: bytes, depth: int = 1, base_oid=None) -> PackReadyObject:
    data = b"".join(create_delta(base, body))
    return PackReadyObject(
        ObjectID(Blob.from_string(body).id),
        ObjectType.BLOB,
        len(body),
        len(data),
        zlib.compress(data),
        delta_base=base_oid or ObjectID(Blob.from_string(base).id),
        depth=depth,
    )


@pytest.fixture
def scratch(tmp_path):
    s = LMDBObjectStore(str(tmp_path / "scratch"))
    yield s
    s.close()


def test_missing_base_while_resolving(scratch):
    """A delta whose base chain is broken in the store is reported with the missing base."""
    base, top = text(1), edit(text(1), 2)
    rec = delta_record(base, top)
    scratch.put_many([rec])
    with pytest.raises(MissingObject, match="a delta base of"):
        pack_of(scratch, [rec.oid])


def test_looping_chain_in_the_store_is_refused(scratch):
    """Records based on each other (a corrupt store) fail instead of looping forever."""
    a, b = text(3), edit(text(3), 4)
    ra = delta_record(b, a)
    rb = delta_record(a, b)
    scratch.put_many([ra, rb])
    for wanted in ([ra.oid], [ra.oid, rb.oid]):
        with pytest.raises(CorruptObject, match="loops"):
            pack_of(scratch, wanted)


def test_corrupt_stored_bytes_are_refused(scratch):
    """A stored record that does not inflate cannot be resolved."""
    bad = PackReadyObject(ObjectID(b"2" * 40), ObjectType.BLOB, 5, 5, b"not zlib")
    scratch.put_many([bad, delta_record(b"hello", b"hello world", base_oid=bad.oid)])
    with pytest.raises(CorruptObject, match="does not inflate"):
        pack_of(scratch, [ObjectID(Blob.from_string(b"hello world").id)])


def test_empty_pack(store, tmp_path):
    """No objects is a valid, empty pack."""
    pack = pack_of(store, [])
    assert len(pack) == 32
    git_accepts(tmp_path, pack)
    assert list(PackStreamReader(hashlib.sha1, io.BytesIO(pack).read).read_objects()) == []


def test_resolution_through_a_long_stored_chain(scratch, tmp_path):
    """A chain of stored deltas resolves to the right body and git accepts the result."""
    bodies = [text(5)]
    for i in range(30):
        bodies.append(edit(bodies[-1], i))
    records = [blob_record(bodies[0])]
    records += [delta_record(bodies[i - 1], bodies[i], depth=i) for i in range(1, len(bodies))]
    scratch.put_many(records)
    top = records[-1]
    assert resolve_object(scratch, top, BodyCache(0)) == bodies[-1]
    pack = pack_of(scratch, [top.oid])
    git_accepts(tmp_path, pack)
    assert index_bytes(pack).read_object(top.oid) == (ObjectType.BLOB, bodies[-1])


def test_body_cache_is_bounded_in_bytes():
    """The cache evicts least recently used bodies to stay within its byte budget."""
    cache = BodyCache(10)
    a, b, c = (ObjectID(bytes([x]) * 40) for x in b"abc")
    cache.put(a, b"1234")
    cache.put(b, b"5678")
    assert cache.get(a) == b"1234"  # a is now the most recent
    cache.put(c, b"90ab")
    assert cache.get(b) is None and cache.get(a) == b"1234" and cache.get(c) == b"90ab"
    assert cache.size == 8
    cache.put(ObjectID(b"d" * 40), b"x" * 11)  # larger than the whole budget: not kept
    assert cache.size == 8
