"""The LMDB object and metadata stores: both conformance suites, plus what is LMDB's own."""

from __future__ import annotations

import threading
from typing import Any

import lmdb
import pytest
import snappy
from hypothesis import given
from hypothesis import strategies as st

from gitstratum.core.objects import ObjectType, PackReadyObject
from gitstratum.core.oid import ObjectID, to_bin
from gitstratum.storage.interfaces import IngestBatch, Permission, RefConflict, RefUpdate
from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
from gitstratum.storage.lmdb_objects import (
    CorruptRecord,
    LMDBObjectStore,
    decode_record,
    encode_record,
)
from gitstratum.testing.conformance import (
    MetadataStoreConformance,
    ObjectStoreConformance,
    fake_oid,
    whole_object,
)

# Small maps keep many test environments within the address space.
_MAP = 1 << 30


class TestLMDBObjectStoreConformance(ObjectStoreConformance):
    def make_object_store(self) -> LMDBObjectStore:
        return LMDBObjectStore(str(self.tmp_path / "objects"), map_size=_MAP)


class TestLMDBMetadataStoreConformance(MetadataStoreConformance):
    def make_metadata_store(self) -> LMDBMetadataStore:
        return LMDBMetadataStore(str(self.tmp_path / "metadata"), map_size=_MAP)


oids = st.binary(min_size=20, max_size=20).map(lambda b: ObjectID(b.hex().encode()))
records = st.builds(
    PackReadyObject,
    oid=oids,
    type=st.sampled_from(list(ObjectType)),
    size=st.integers(0, 2**64 - 1),
    data_size=st.integers(0, 2**64 - 1),
    compressed=st.binary(max_size=300),
    delta_base=st.none() | oids,
    depth=st.integers(0, 4095),
)


@given(records)
def test_record_encoding_round_trips(obj: PackReadyObject) -> None:
    """Every pack-ready record decodes to itself, for any sizes, depth and base."""
    assert decode_record(obj.oid, encode_record(obj)) == obj


def test_record_layout_is_compact() -> None:
    """A whole object costs 20 header bytes over its payload; a delta 20 more for its base."""
    whole = whole_object(b"abc")
    assert len(encode_record(whole)) == 20 + len(whole.compressed)
    delta = PackReadyObject(
        oid=fake_oid("d"),
        type=ObjectType.BLOB,
        size=9,
        data_size=3,
        compressed=b"zz",
        delta_base=whole.oid,
        depth=1,
    )
    value = encode_record(delta)
    assert len(value) == 42 and value[20:40] == to_bin(whole.oid)


def test_corrupt_records_are_reported() -> None:
    """A truncated record or an unknown type raises CorruptRecord, not a bare struct error."""
    good = encode_record(whole_object(b"abc"))
    with pytest.raises(CorruptRecord):
        decode_record(fake_oid("x"), good[:10])
    with pytest.raises(CorruptRecord):
        decode_record(fake_oid("x"), b"\x09" + good[1:])
    delta_flag_without_base = good[:1] + b"\x01" + good[2:20]
    with pytest.raises(CorruptRecord):
        decode_record(fake_oid("x"), delta_flag_without_base)


def test_depth_out_of_range_is_refused(tmp_path: Any) -> None:
    """A delta depth that does not fit the record is refused before anything is written."""
    store = LMDBObjectStore(str(tmp_path / "o"), map_size=_MAP)
    try:
        bad = PackReadyObject(
            oid=fake_oid("deep"),
            type=ObjectType.BLOB,
            size=1,
            data_size=1,
            compressed=b"x",
            delta_base=fake_oid("base"),
            depth=70000,
        )
        ok = whole_object(b"ok")
        with pytest.raises(ValueError):
            store.put_many([ok, bad])
        assert store.contains([ok.oid, bad.oid]) == set()
    finally:
        store.close()


def test_object_keys_are_binary_ids(tmp_path: Any) -> None:
    """Records are keyed by the 20-byte binary id in the 'objects' sub-database."""
    path = str(tmp_path / "o")
    obj = whole_object(b"keyed")
    store = LMDBObjectStore(path, map_size=_MAP)
    store.put_many([obj])
    assert store.count() == 1
    store.close()
    env = lmdb.open(path, max_dbs=4, readonly=True)
    try:
        db = env.open_db(b"objects", create=False)
        with env.begin(db=db) as txn:
            assert [bytes(k) for k, _ in txn.cursor()] == [to_bin(obj.oid)]
            assert txn.get(to_bin(obj.oid)) == encode_record(obj)
    finally:
        env.close()


@pytest.mark.parametrize("cls", [LMDBObjectStore, LMDBMetadataStore])
def test_environment_options(tmp_path: Any, cls: Any) -> None:
    """Both stores open their environment synchronous, without readahead or writemap, with 1024 readers."""
    store = cls(str(tmp_path / "nested" / "dir"), map_size=_MAP)
    try:
        assert store.path == str(tmp_path / "nested" / "dir")
        flags = store._env.flags()
        assert flags["sync"] and flags["metasync"] and flags["subdir"]
        assert not flags["readahead"] and not flags["writemap"]
        assert store._env.max_readers() == 1024
        assert store._env.info()["map_size"] == _MAP
    finally:
        store.close()


def test_default_map_sizes(tmp_path: Any) -> None:
    """Without map_size the object store maps 1 TiB and the metadata store 64 GiB."""
    objects = LMDBObjectStore(str(tmp_path / "o"))
    metadata = LMDBMetadataStore(str(tmp_path / "m"))
    try:
        assert objects._env.info()["map_size"] == 1 << 40
        assert metadata._env.info()["map_size"] == 1 << 36
    finally:
        objects.close()
        metadata.close()


def test_objects_from_many_threads(tmp_path: Any) -> None:
    """Concurrent writers and readers on one store lose nothing and see whole records."""
    store = LMDBObjectStore(str(tmp_path / "o"), map_size=_MAP)
    errors: list[BaseException] = []
    batches = [[whole_object(b"t%d-%d" % (t, i)) for i in range(200)] for t in range(8)]

    def work(batch: list[PackReadyObject]) -> None:
        try:
            for start in range(0, len(batch), 20):
                chunk = batch[start : start + 20]
                store.put_many(chunk)
                got = store.get_many(o.oid for o in chunk)
                assert got == {o.oid: o for o in chunk}
        except BaseException as e:  # collected and re-raised on the test thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        everything = [o for b in batches for o in b]
        assert store.contains(o.oid for o in everything) == {o.oid for o in everything}
        assert store.count() == len(everything)
    finally:
        store.close()


def test_ref_cas_from_many_threads(tmp_path: Any) -> None:
    """Racing compare-and-swaps on one ref serialise: every success moves it exactly once."""
    store = LMDBMetadataStore(str(tmp_path / "m"), map_size=_MAP)
    repo = store.create_repository("o/r")
    store.update_refs(repo, [RefUpdate(b"refs/heads/main", None, fake_oid(0))])
    wins: list[int] = []
    lock = threading.Lock()

    def bump(rounds: int) -> None:
        for _ in range(rounds):
            while True:
                current = store.get_refs(repo).refs[b"refs/heads/main"]
                n = counter_of[current]
                try:
                    store.update_refs(
                        repo, [RefUpdate(b"refs/heads/main", current, fake_oid(n + 1))]
                    )
                except RefConflict:
                    continue
                with lock:
                    wins.append(n + 1)
                break

    counter_of = {fake_oid(i): i for i in range(400)}
    threads = [threading.Thread(target=bump, args=(25,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sorted(wins) == list(range(1, 201))
        snap = store.get_refs(repo)
        assert snap.refs[b"refs/heads/main"] == fake_oid(200)
        assert snap.version == 201
    finally:
        store.close()


def test_trees_are_stored_snappy_compressed(tmp_path: Any) -> None:
    """Tree bodies are kept snappy-compressed under repo id + binary oid."""
    path = str(tmp_path / "m")
    store = LMDBMetadataStore(path, map_size=_MAP)
    repo = store.create_repository("o/r")
    body = b"100644 a\0" + b"\x11" * 20
    store.ingest(repo, IngestBatch(trees=[(fake_oid("t"), body)]))
    store.close()
    env = lmdb.open(path, max_dbs=32, readonly=True)
    try:
        db = env.open_db(b"trees", create=False)
        with env.begin(db=db) as txn:
            key = repo.id.to_bytes(8, "big") + to_bin(fake_oid("t"))
            assert txn.get(key) == snappy.compress(body)
    finally:
        env.close()


def test_delete_repository_leaves_no_keys(tmp_path: Any) -> None:
    """After delete_repository no key of any sub-database mentions the repository."""
    path = str(tmp_path / "m")
    store = LMDBMetadataStore(path, map_size=_MAP)
    store.create_user("u")
    repo = store.create_repository("o/r")
    other = store.create_repository("o/r2")
    oid = fake_oid("c")
    for r in (repo, other):
        store.ingest(r, IngestBatch(objects=[(oid, ObjectType.BLOB)], trees=[(oid, b"")]))
        store.update_refs(r, [RefUpdate(b"refs/heads/main", None, oid)])
        store.grant("u", r.name, Permission.READ)
    store.delete_repository("o/r")
    store.close()
    env = lmdb.open(path, max_dbs=32, readonly=True)
    id_prefix = repo.id.to_bytes(8, "big")
    try:
        with env.begin() as txn:
            names = [bytes(k) for k, _ in txn.cursor()]
        remaining: list[tuple[bytes, bytes]] = []
        for name in names:
            db = env.open_db(name, create=False)
            with env.begin(db=db) as txn:
                remaining += [(name, bytes(k)) for k, _ in txn.cursor()]
        for db_name, key in remaining:
            if db_name in (b"refs", b"commits", b"trees", b"tags", b"members", b"state"):
                assert not key.startswith(id_prefix), (db_name, key)
            assert key not in (b"o/r", b"u\0o/r", b"o/r\0u"), (db_name, key)
        assert (b"perms", b"u\0o/r2") in remaining
    finally:
        env.close()


@pytest.mark.parametrize("name", ["", "a\0b"])
def test_names_with_nul_are_refused(tmp_path: Any, name: str) -> None:
    """Empty names and names containing NUL (the key separator) are refused with ValueError."""
    store = LMDBMetadataStore(str(tmp_path / "m"), map_size=_MAP)
    try:
        with pytest.raises(ValueError):
            store.create_repository(name)
        with pytest.raises(ValueError):
            store.create_user(name)
        assert store.get_repository(name) is None
        assert store.get_user(name) is None
        assert store.list_repositories() == [] and store.list_users() == []
    finally:
        store.close()


def test_overlong_ref_name_is_refused(tmp_path: Any) -> None:
    """A ref name longer than an LMDB key allows is refused with ValueError, changing nothing."""
    store = LMDBMetadataStore(str(tmp_path / "m"), map_size=_MAP)
    try:
        repo = store.create_repository("o/r")
        with pytest.raises(ValueError):
            store.update_refs(
                repo,
                [
                    RefUpdate(b"refs/heads/ok", None, fake_oid(1)),
                    RefUpdate(b"refs/heads/" + b"x" * 600, None, fake_oid(1)),
                ],
            )
        assert dict(store.get_refs(repo).refs) == {}
    finally:
        store.close()
