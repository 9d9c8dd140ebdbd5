"""Conformance suites for IObjectStore and IMetadataStore, run against every implementation.

Each suite is a pytest mixin.  A concrete test class inherits it and
provides the factory (and, for stores that persist somewhere other than a
directory, the reopen hook)::

    class TestLMDBObjects(ObjectStoreConformance):
        def make_object_store(self):
            return LMDBObjectStore(str(self.tmp_path / "objects"), map_size=1 << 30)

Each test gets a fresh store in ``self.object_store`` / ``self.metadata_store``;
``self.tmp_path`` is pytest's per-test directory.  Stores are closed after
the test (by their ``close()`` when they have one).
"""

from __future__ import annotations

import hashlib
import random
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from zope.interface.verify import verifyObject

from gitstratum.core.objects import CommitInfo, ObjectType, PackReadyObject, TagInfo
from gitstratum.core.oid import ObjectID
from gitstratum.storage.interfaces import (
    IMetadataStore,
    IngestBatch,
    IObjectStore,
    KeyExists,
    ObjectStat,
    Permission,
    RefConflict,
    RefUpdate,
    RepositoryExists,
    RepositoryNotFound,
    SSHKey,
    User,
    UserExists,
    UserNotFound,
)

__all__ = ["ObjectStoreConformance", "MetadataStoreConformance", "fake_oid", "whole_object"]


def fake_oid(seed: object) -> ObjectID:
    """A well-formed object id derived from *seed* (not the hash of any real object)."""
    return ObjectID(hashlib.sha1(repr(seed).encode()).hexdigest().encode("ascii"))


def whole_object(data: bytes, obj_type: ObjectType = ObjectType.BLOB) -> PackReadyObject:
    """A whole (non-delta) pack-ready record of *data*, with its real object id."""
    header = obj_type.type_name + b" " + str(len(data)).encode() + b"\0"
    return PackReadyObject(
        oid=ObjectID(hashlib.sha1(header + data).hexdigest().encode("ascii")),
        type=obj_type,
        size=len(data),
        data_size=len(data),
        compressed=zlib.compress(data),
    )


def _close(store: object) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        close()


class _StoreHarness:
    """Opening, reopening and closing the stores a test makes."""

    tmp_path: Any
    _open_stores: list[object]

    def _track(self, store: Any) -> Any:
        self._open_stores.append(store)
        return store

    def _untrack_and_close(self, store: object) -> None:
        self._open_stores.remove(store)
        _close(store)


class ObjectStoreConformance(_StoreHarness):
    """The whole IObjectStore contract.  Provide ``make_object_store(self)``."""

    object_store: Any

    def make_object_store(self) -> Any:
        raise NotImplementedError("the concrete test class provides make_object_store")

    def reopen_object_store(self, store: Any) -> Any:
        """Close *store* and open the same data again; override for remote stores."""
        self._untrack_and_close(store)
        return self._track(self.make_object_store())

    @pytest.fixture(autouse=True)
    def _object_store_fixture(self, tmp_path: Any) -> Iterator[None]:
        self.tmp_path = tmp_path
        self._open_stores = getattr(self, "_open_stores", [])
        self.object_store = self._track(self.make_object_store())
        yield
        while self._open_stores:
            _close(self._open_stores.pop())

    # -- the interface ------------------------------------------------------

    def test_provides_interface(self) -> None:
        """The store declares and fully implements IObjectStore."""
        assert verifyObject(IObjectStore, self.object_store)

    def test_empty_store_has_nothing(self) -> None:
        """An empty store answers every read with nothing, and empty batches are no-ops."""
        s = self.object_store
        missing = fake_oid("missing")
        assert s.get(missing) is None
        assert s.get_many([missing]) == {}
        assert s.contains([missing]) == set()
        assert s.get_many([]) == {}
        assert s.contains([]) == set()
        assert s.put_many([]) == 0
        assert s.delete_many([missing]) == 0

    def test_whole_object_round_trips(self) -> None:
        """A whole object comes back field for field, its compressed bytes untouched."""
        obj = whole_object(b"hello world\n")
        assert self.object_store.put_many([obj]) == 1
        got = self.object_store.get(obj.oid)
        assert got == obj
        assert got is not None and not got.is_delta and got.depth == 0

    def test_delta_round_trips(self) -> None:
        """A delta keeps its base id, chain depth, both sizes and its exact payload."""
        base = whole_object(b"base " * 50)
        delta = PackReadyObject(
            oid=fake_oid("delta"),
            type=ObjectType.TREE,
            size=260,
            data_size=11,
            compressed=zlib.compress(b"\xfa\x01\x84\x01\x90\x05more"),
            delta_base=base.oid,
            depth=4095,
        )
        self.object_store.put_many([base, delta])
        got = self.object_store.get_many([delta.oid, base.oid])
        assert got == {delta.oid: delta, base.oid: base}
        assert got[delta.oid].delta_base == base.oid and got[delta.oid].depth == 4095

    def test_stat_many_reports_sizes_without_bytes(self) -> None:
        """stat_many gives each stored record's type, sizes and base, and skips missing ids."""
        base = whole_object(b"base " * 50)
        delta = PackReadyObject(
            oid=fake_oid("delta"),
            type=ObjectType.BLOB,
            size=260,
            data_size=11,
            compressed=zlib.compress(b"\xfa\x01\x84\x01\x90\x05more"),
            delta_base=base.oid,
            depth=1,
        )
        self.object_store.put_many([base, delta])
        stats = self.object_store.stat_many([base.oid, delta.oid, fake_oid("absent")])
        assert stats == {
            base.oid: ObjectStat(ObjectType.BLOB, 250, len(base.compressed), None),
            delta.oid: ObjectStat(ObjectType.BLOB, 260, len(delta.compressed), base.oid),
        }

    def test_every_type_round_trips(self) -> None:
        """Each of the four object types is stored and returned as itself."""
        objs = [whole_object(b"x" + bytes([t]), ObjectType(t)) for t in (1, 2, 3, 4)]
        self.object_store.put_many(objs)
        assert {
            o.oid: o.type for o in self.object_store.get_many(o.oid for o in objs).values()
        } == {o.oid: o.type for o in objs}

    def test_empty_and_large_payloads(self) -> None:
        """An empty blob and a megabyte of incompressible data both round-trip exactly."""
        rng = random.Random(7)
        big = whole_object(rng.randbytes(1 << 20))
        empty = whole_object(b"")
        self.object_store.put_many([big, empty])
        assert self.object_store.get(big.oid) == big
        assert self.object_store.get(empty.oid) == empty

    def test_put_many_counts_new_records(self) -> None:
        """put_many reports only records it newly wrote, counting a repeated id once."""
        a, b, c = (whole_object(bytes([i]) * 10) for i in range(3))
        assert self.object_store.put_many([a, b, a]) == 2
        assert self.object_store.put_many([a, b, c]) == 1
        assert self.object_store.put_many([a, b, c]) == 0

    def test_first_write_wins(self) -> None:
        """An id already stored keeps its first record, within a batch and across batches."""
        first = whole_object(b"content")
        second = PackReadyObject(
            oid=first.oid,
            type=first.type,
            size=first.size,
            data_size=5,
            compressed=b"different",
            delta_base=fake_oid("other"),
            depth=1,
        )
        self.object_store.put_many([first, second])
        assert self.object_store.get(first.oid) == first
        assert self.object_store.put_many([second]) == 0
        assert self.object_store.get(first.oid) == first

    def test_reads_return_only_what_exists(self) -> None:
        """get_many and contains return exactly the stored subset, ignoring repeats."""
        stored = [whole_object(b"obj %d" % i) for i in range(5)]
        self.object_store.put_many(stored)
        missing = [fake_oid(("missing", i)) for i in range(5)]
        asked = [o.oid for o in stored] + missing + [stored[0].oid]
        assert self.object_store.get_many(asked) == {o.oid: o for o in stored}
        assert self.object_store.contains(asked) == {o.oid for o in stored}
        assert self.object_store.contains(iter(missing)) == set()

    def test_accepts_one_shot_iterables(self) -> None:
        """Every batch call accepts a generator, consumed once."""
        objs = [whole_object(b"gen %d" % i) for i in range(20)]
        assert self.object_store.put_many(o for o in objs) == 20
        assert len(self.object_store.get_many(o.oid for o in objs)) == 20
        assert len(self.object_store.contains(o.oid for o in objs)) == 20
        assert self.object_store.delete_many(o.oid for o in objs) == 20

    def test_many_objects(self) -> None:
        """A few thousand seeded records are all found again, and only they."""
        rng = random.Random(42)
        objs = [whole_object(rng.randbytes(rng.randrange(0, 200))) for _ in range(3000)]
        unique = {o.oid: o for o in objs}
        assert self.object_store.put_many(objs) == len(unique)
        assert self.object_store.get_many(list(unique)) == unique
        probe = [fake_oid(("absent", i)) for i in range(100)] + list(unique)[:100]
        assert self.object_store.contains(probe) == set(list(unique)[:100])

    def test_delete_many(self) -> None:
        """delete_many removes what it names, counts only real deletions, leaves the rest."""
        a, b, c = (whole_object(bytes([i]) * 3) for i in range(3))
        self.object_store.put_many([a, b, c])
        assert self.object_store.delete_many([a.oid, b.oid, a.oid, fake_oid("none")]) == 2
        assert self.object_store.contains([a.oid, b.oid, c.oid]) == {c.oid}
        assert self.object_store.get(a.oid) is None
        assert self.object_store.delete_many([a.oid]) == 0
        # A deleted id can be written again, with a new record.
        assert self.object_store.put_many([a]) == 1
        assert self.object_store.get(a.oid) == a

    def test_persists_across_reopen(self) -> None:
        """Everything written is there after the store is closed and opened again."""
        objs = [whole_object(b"durable %d" % i) for i in range(10)]
        self.object_store.put_many(objs)
        self.object_store.delete_many([objs[0].oid])
        store = self.reopen_object_store(self.object_store)
        assert store.get_many(o.oid for o in objs) == {o.oid: o for o in objs[1:]}
        assert store.get(objs[0].oid) is None


def _commit(seed: object, parents: tuple[ObjectID, ...] = (), generation: int = 1) -> CommitInfo:
    return CommitInfo(
        oid=fake_oid(("commit", seed)),
        tree=fake_oid(("tree", seed)),
        parents=parents,
        generation=generation,
        commit_time=1_700_000_000 + generation,
    )


def _batch(seed: object) -> IngestBatch:
    """A small, self-consistent batch: a root commit, a child, their trees, a tag and a blob."""
    root = _commit((seed, 0))
    child = _commit((seed, 1), parents=(root.oid,), generation=2)
    blob = fake_oid(("blob", seed))
    tree_body = b"100644 file\0" + bytes.fromhex(blob.decode())
    tag = TagInfo(
        oid=fake_oid(("tag", seed)), target=child.oid, target_type=ObjectType.COMMIT, name=b"v1.0"
    )
    return IngestBatch(
        objects=[
            (root.oid, ObjectType.COMMIT),
            (child.oid, ObjectType.COMMIT),
            (root.tree, ObjectType.TREE),
            (child.tree, ObjectType.TREE),
            (blob, ObjectType.BLOB),
            (tag.oid, ObjectType.TAG),
        ],
        commits=[root, child],
        trees=[(root.tree, tree_body), (child.tree, tree_body + b"")],
        tags=[tag],
    )


def _all_oids(batch: IngestBatch) -> list[ObjectID]:
    return [o for o, _ in batch.objects]


class MetadataStoreConformance(_StoreHarness):
    """The whole IMetadataStore contract.  Provide ``make_metadata_store(self)``."""

    metadata_store: Any

    def make_metadata_store(self) -> Any:
        raise NotImplementedError("the concrete test class provides make_metadata_store")

    def reopen_metadata_store(self, store: Any) -> Any:
        """Close *store* and open the same data again; override for remote stores."""
        self._untrack_and_close(store)
        return self._track(self.make_metadata_store())

    @pytest.fixture(autouse=True)
    def _metadata_store_fixture(self, tmp_path: Any) -> Iterator[None]:
        self.tmp_path = tmp_path
        self._open_stores = getattr(self, "_open_stores", [])
        self.metadata_store = self._track(self.make_metadata_store())
        yield
        while self._open_stores:
            _close(self._open_stores.pop())

    A = fake_oid("A")
    B = fake_oid("B")
    C = fake_oid("C")

    def test_provides_interface(self) -> None:
        """The store declares and fully implements IMetadataStore."""
        assert verifyObject(IMetadataStore, self.metadata_store)

    # -- repositories -------------------------------------------------------

    def test_create_and_get_repository(self) -> None:
        """A created repository is returned as recorded, with a distinct id per repository."""
        m = self.metadata_store
        r1 = m.create_repository("alice/one")
        r2 = m.create_repository("alice/two", public=True, head=b"refs/heads/trunk")
        assert (r1.name, r1.public, r1.head) == ("alice/one", False, b"refs/heads/main")
        assert (r2.name, r2.public, r2.head) == ("alice/two", True, b"refs/heads/trunk")
        assert r1.id != r2.id
        assert m.get_repository("alice/one") == r1
        assert m.get_repository("alice/two") == r2
        assert m.get_repository("alice/three") is None

    def test_create_existing_repository_fails(self) -> None:
        """Creating a name twice raises RepositoryExists and keeps the first record."""
        m = self.metadata_store
        first = m.create_repository("o/r", public=True)
        with pytest.raises(RepositoryExists):
            m.create_repository("o/r")
        assert m.get_repository("o/r") == first

    def test_list_repositories_sorted(self) -> None:
        """list_repositories returns every repository sorted by name."""
        m = self.metadata_store
        assert m.list_repositories() == []
        for name in ["zed/z", "amy/b", "amy/a", "Bob/x", "amy/a-b"]:
            m.create_repository(name)
        assert [r.name for r in m.list_repositories()] == sorted(
            ["zed/z", "amy/b", "amy/a", "Bob/x", "amy/a-b"]
        )

    def test_set_public(self) -> None:
        """set_public changes visibility, returns the new record, and is read back."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        updated = m.set_public("o/r", True)
        assert updated.public and updated.id == r.id
        assert m.get_repository("o/r") == updated
        assert not m.set_public("o/r", False).public
        with pytest.raises(RepositoryNotFound):
            m.set_public("o/missing", True)

    def test_delete_unknown_repository_fails(self) -> None:
        """Deleting a repository that does not exist raises RepositoryNotFound."""
        with pytest.raises(RepositoryNotFound):
            self.metadata_store.delete_repository("o/missing")

    def test_delete_repository_cascades(self) -> None:
        """Deleting a repository removes its refs, graph, trees, tags, membership and grants."""
        m = self.metadata_store
        doomed = m.create_repository("o/doomed")
        kept = m.create_repository("o/kept")
        m.create_user("u")
        batch = _batch("x")
        for repo in (doomed, kept):
            m.ingest(repo, batch)
            m.update_refs(repo, [RefUpdate(b"refs/heads/main", None, self.A)])
            m.grant("u", repo.name, Permission.WRITE)
        m.delete_repository("o/doomed")
        assert m.get_repository("o/doomed") is None
        assert [r.name for r in m.list_repositories()] == ["o/kept"]
        assert m.get_permission("u", "o/doomed") is None
        oids = _all_oids(batch)
        assert m.object_types(doomed, oids) == {}
        assert m.get_commits(doomed, oids) == {}
        assert m.get_trees(doomed, oids) == {}
        assert m.get_tags(doomed, oids) == {}
        with pytest.raises(RepositoryNotFound):
            m.get_refs(doomed)
        # The other repository is untouched.
        assert len(m.object_types(kept, oids)) == len(oids)
        assert len(m.get_commits(kept, oids)) == 2
        assert m.get_refs(kept).refs == {b"refs/heads/main": self.A}
        assert m.get_permission("u", "o/kept") is Permission.WRITE

    def test_recreated_repository_starts_empty(self) -> None:
        """A repository re-created under a deleted name inherits nothing from the old one."""
        m = self.metadata_store
        m.create_user("u")
        old = m.create_repository("o/r", public=True)
        m.ingest(old, _batch("old"))
        m.update_refs(old, [RefUpdate(b"refs/heads/main", None, self.A)])
        m.grant("u", "o/r", Permission.ADMIN)
        m.delete_repository("o/r")
        new = m.create_repository("o/r")
        assert new.id != old.id and not new.public
        assert m.get_refs(new).refs == {}
        assert m.object_types(new, _all_oids(_batch("old"))) == {}
        assert m.get_permission("u", "o/r") is None
        # The stale value of the old repository reaches nothing of the new one.
        with pytest.raises(RepositoryNotFound):
            m.update_refs(old, [RefUpdate(b"refs/heads/x", None, self.A)])
        assert m.get_refs(new).refs == {}

    # -- refs ---------------------------------------------------------------

    def test_new_repository_has_no_refs(self) -> None:
        """A new repository's snapshot is empty, with HEAD at the requested target."""
        m = self.metadata_store
        r = m.create_repository("o/r", head=b"refs/heads/dev")
        snap = m.get_refs(r)
        assert dict(snap.refs) == {}
        assert snap.head == b"refs/heads/dev"
        assert snap.head_oid() is None

    def test_create_update_delete_ref(self) -> None:
        """CAS creates, moves and deletes a ref when each old value matches."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        snap = m.update_refs(r, [RefUpdate(b"refs/heads/main", None, self.A)])
        assert dict(snap.refs) == {b"refs/heads/main": self.A}
        assert snap.head_oid() == self.A
        snap = m.update_refs(r, [RefUpdate(b"refs/heads/main", self.A, self.B)])
        assert dict(snap.refs) == {b"refs/heads/main": self.B}
        snap = m.update_refs(r, [RefUpdate(b"refs/heads/main", self.B, None)])
        assert dict(snap.refs) == {}
        assert m.get_refs(r) == snap

    def test_update_returns_what_get_refs_sees(self) -> None:
        """The snapshot update_refs returns equals the next get_refs."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        snap = m.update_refs(
            r,
            [
                RefUpdate(b"refs/heads/main", None, self.A),
                RefUpdate(b"refs/tags/v1", None, self.B),
            ],
        )
        assert m.get_refs(r) == snap
        assert dict(snap.refs) == {b"refs/heads/main": self.A, b"refs/tags/v1": self.B}

    def test_stale_create_conflicts(self) -> None:
        """Creating a ref that exists (old None) is a conflict."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        m.update_refs(r, [RefUpdate(b"refs/heads/main", None, self.A)])
        with pytest.raises(RefConflict) as e:
            m.update_refs(r, [RefUpdate(b"refs/heads/main", None, self.B)])
        assert e.value.refs == (b"refs/heads/main",)

    def test_stale_update_and_delete_conflict(self) -> None:
        """Moving or deleting with a wrong or missing old value is a conflict."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        m.update_refs(r, [RefUpdate(b"refs/heads/main", None, self.A)])
        for bad in (
            RefUpdate(b"refs/heads/main", self.B, self.C),
            RefUpdate(b"refs/heads/main", self.B, None),
            RefUpdate(b"refs/heads/absent", self.A, self.C),
            RefUpdate(b"refs/heads/absent", self.A, None),
        ):
            with pytest.raises(RefConflict) as e:
                m.update_refs(r, [bad])
            assert e.value.refs == (bad.name,)
        assert dict(m.get_refs(r).refs) == {b"refs/heads/main": self.A}

    def test_apply_push_records_only_what_applied_updates_need(self) -> None:
        """A refused update's batch is never recorded; applied ones land with their refs."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        m.update_refs(r, [RefUpdate(b"refs/heads/main", None, self.A)])
        good = IngestBatch(objects=[(self.B, ObjectType.COMMIT)])
        refused = IngestBatch(objects=[(self.C, ObjectType.BLOB)])
        version = m.get_refs(r).version
        stale = m.apply_push(
            r,
            [
                RefUpdate(b"refs/heads/new", None, self.B),
                RefUpdate(b"refs/heads/main", self.C, self.C),
            ],
            [good, refused],
            [[0], [1]],
            atomic=False,
        )
        assert stale == {b"refs/heads/main"}
        assert m.object_types(r, [self.B, self.C]) == {self.B: ObjectType.COMMIT}
        snapshot = m.get_refs(r)
        assert dict(snapshot.refs) == {b"refs/heads/main": self.A, b"refs/heads/new": self.B}
        assert snapshot.version == version + 1

    def test_apply_push_shared_batch_follows_any_applied_update(self) -> None:
        """A batch two updates need is recorded when either applies, once."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        m.update_refs(r, [RefUpdate(b"refs/heads/main", None, self.A)])
        shared = IngestBatch(objects=[(self.B, ObjectType.COMMIT)])
        stale = m.apply_push(
            r,
            [
                RefUpdate(b"refs/heads/main", self.C, self.B),
                RefUpdate(b"refs/tags/t", None, self.B),
            ],
            [shared],
            [[0], [0]],
            atomic=False,
        )
        assert stale == {b"refs/heads/main"}
        assert m.object_types(r, [self.B]) == {self.B: ObjectType.COMMIT}

    def test_apply_push_atomic_refuses_all(self) -> None:
        """Atomic: one stale update refuses every update and records no batch."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        m.update_refs(r, [RefUpdate(b"refs/heads/main", None, self.A)])
        before = m.get_refs(r)
        stale = m.apply_push(
            r,
            [
                RefUpdate(b"refs/heads/new", None, self.B),
                RefUpdate(b"refs/heads/main", self.C, self.B),
            ],
            [IngestBatch(objects=[(self.B, ObjectType.COMMIT)])],
            [[0], [0]],
            atomic=True,
        )
        assert stale == {b"refs/heads/main"}
        assert m.object_types(r, [self.B]) == {}
        assert m.get_refs(r) == before

    def test_conflict_changes_nothing_and_names_every_stale_ref(self) -> None:
        """One stale ref fails the whole batch; RefConflict names every stale ref and no other."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        before = m.update_refs(
            r,
            [
                RefUpdate(b"refs/heads/a", None, self.A),
                RefUpdate(b"refs/heads/b", None, self.A),
            ],
        )
        with pytest.raises(RefConflict) as e:
            m.update_refs(
                r,
                [
                    RefUpdate(b"refs/heads/a", self.A, self.B),  # fresh
                    RefUpdate(b"refs/heads/b", self.C, self.B),  # stale
                    RefUpdate(b"refs/heads/new", None, self.B),  # fresh
                    RefUpdate(b"refs/heads/c", self.A, None),  # stale: absent
                ],
            )
        assert set(e.value.refs) == {b"refs/heads/b", b"refs/heads/c"}
        assert "refs/heads/b" in str(e.value) and "refs/heads/c" in str(e.value)
        assert m.get_refs(r) == before

    def test_duplicate_ref_in_batch_is_refused(self) -> None:
        """A batch naming one ref twice raises ValueError and changes nothing."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        with pytest.raises(ValueError):
            m.update_refs(
                r,
                [
                    RefUpdate(b"refs/heads/a", None, self.A),
                    RefUpdate(b"refs/heads/a", None, self.B),
                ],
            )
        assert dict(m.get_refs(r).refs) == {}

    def test_version_increases_with_each_change(self) -> None:
        """Every successful CAS and every HEAD change gives a larger version."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        v0 = m.get_refs(r).version
        v1 = m.update_refs(r, [RefUpdate(b"refs/heads/main", None, self.A)]).version
        v2 = m.update_refs(r, [RefUpdate(b"refs/heads/main", self.A, self.B)]).version
        m.set_head(r, b"refs/heads/other")
        v3 = m.get_refs(r).version
        assert v0 < v1 < v2 < v3
        with pytest.raises(RefConflict):
            m.update_refs(r, [RefUpdate(b"refs/heads/main", self.A, self.C)])
        assert m.get_refs(r).version == v3

    def test_set_head(self) -> None:
        """set_head points HEAD anywhere, even at an unborn branch, and the record follows."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        m.update_refs(r, [RefUpdate(b"refs/heads/dev", None, self.A)])
        m.set_head(r, b"refs/heads/dev")
        snap = m.get_refs(r)
        assert snap.head == b"refs/heads/dev" and snap.head_oid() == self.A
        m.set_head(r, b"refs/heads/unborn")
        snap = m.get_refs(r)
        assert snap.head == b"refs/heads/unborn" and snap.head_oid() is None
        repo = m.get_repository("o/r")
        assert repo is not None and repo.head == b"refs/heads/unborn"

    def test_refs_isolated_between_repositories(self) -> None:
        """Refs written in one repository are invisible in another, even with the same names."""
        m = self.metadata_store
        a = m.create_repository("o/a")
        b = m.create_repository("o/b")
        m.update_refs(a, [RefUpdate(b"refs/heads/main", None, self.A)])
        assert dict(m.get_refs(b).refs) == {}
        m.update_refs(b, [RefUpdate(b"refs/heads/main", None, self.B)])
        assert dict(m.get_refs(a).refs) == {b"refs/heads/main": self.A}
        assert dict(m.get_refs(b).refs) == {b"refs/heads/main": self.B}

    def test_many_refs(self) -> None:
        """A push of a thousand refs in one batch is applied whole and read back."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        names = [b"refs/tags/t%04d" % i for i in range(1000)]
        snap = m.update_refs(r, [RefUpdate(n, None, fake_oid(n)) for n in names])
        assert dict(snap.refs) == {n: fake_oid(n) for n in names}

    def test_ref_operations_on_deleted_repository_fail(self) -> None:
        """Ref calls on a repository that was deleted raise RepositoryNotFound."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        m.delete_repository("o/r")
        with pytest.raises(RepositoryNotFound):
            m.get_refs(r)
        with pytest.raises(RepositoryNotFound):
            m.update_refs(r, [RefUpdate(b"refs/heads/main", None, self.A)])
        with pytest.raises(RepositoryNotFound):
            m.set_head(r, b"refs/heads/x")

    # -- graph, trees, tags, membership -------------------------------------

    def test_ingest_and_read_back(self) -> None:
        """Ingested commits, trees, tags and membership come back exactly; others are absent."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        batch = _batch("one")
        m.ingest(r, batch)
        oids = _all_oids(batch) + [fake_oid("stranger")]
        assert m.object_types(r, oids) == dict(batch.objects)
        assert m.get_commits(r, oids) == {c.oid: c for c in batch.commits}
        assert m.get_trees(r, oids) == dict(batch.trees)
        assert m.get_tags(r, oids) == {t.oid: t for t in batch.tags}

    def test_commit_fields_survive(self) -> None:
        """Parent order, many parents, generation and commit time are kept exactly."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        octopus = CommitInfo(
            oid=fake_oid("octopus"),
            tree=fake_oid("t"),
            parents=(self.C, self.A, self.B, fake_oid("d")),
            generation=123456,
            commit_time=2**33,
        )
        root = CommitInfo(oid=self.A, tree=self.B, parents=(), generation=1, commit_time=0)
        m.ingest(r, IngestBatch(commits=[octopus, root]))
        assert m.get_commits(r, [octopus.oid, root.oid]) == {octopus.oid: octopus, root.oid: root}

    def test_tree_bodies_are_exact(self) -> None:
        """Raw tree bodies (binary, NUL bytes, empty) are returned byte for byte."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        rng = random.Random(3)
        trees = [(fake_oid(("t", i)), rng.randbytes(rng.randrange(0, 5000))) for i in range(20)]
        trees.append((fake_oid("empty"), b""))
        m.ingest(r, IngestBatch(trees=trees))
        assert m.get_trees(r, (o for o, _ in trees)) == dict(trees)

    def test_tag_fields_survive(self) -> None:
        """A tag's target, target type and name are kept, for every target type."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        tags = [
            TagInfo(
                oid=fake_oid(("tag", t)),
                target=fake_oid(t),
                target_type=t,
                name=b"n\xc3\xa9-%d" % t,
            )
            for t in ObjectType
        ]
        m.ingest(r, IngestBatch(tags=tags))
        assert m.get_tags(r, [t.oid for t in tags]) == {t.oid: t for t in tags}

    def test_ingest_is_idempotent(self) -> None:
        """Ingesting the same batch twice, or overlapping batches, changes nothing the second time."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        one, two = _batch("one"), _batch("two")
        m.ingest(r, one)
        m.ingest(r, one)
        m.ingest(r, IngestBatch(objects=list(one.objects) + list(two.objects), commits=two.commits))
        oids = _all_oids(one) + _all_oids(two)
        assert m.object_types(r, oids) == dict(list(one.objects) + list(two.objects))
        assert m.get_commits(r, oids) == {c.oid: c for c in list(one.commits) + list(two.commits)}
        assert m.get_trees(r, oids) == dict(one.trees)

    def test_membership_isolated_between_repositories(self) -> None:
        """An object ingested in repository A is not a member of repository B."""
        m = self.metadata_store
        a = m.create_repository("o/a")
        b = m.create_repository("o/b")
        batch = _batch("shared")
        m.ingest(a, batch)
        oids = _all_oids(batch)
        assert m.object_types(b, oids) == {}
        assert m.get_commits(b, oids) == {}
        assert m.get_trees(b, oids) == {}
        assert m.get_tags(b, oids) == {}
        m.ingest(b, IngestBatch(objects=batch.objects[:1]))
        assert m.object_types(b, oids) == dict(batch.objects[:1])
        assert len(m.object_types(a, oids)) == len(oids)

    def test_ingest_into_deleted_repository_fails(self) -> None:
        """Ingest into a deleted repository raises RepositoryNotFound and leaves no records."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        m.delete_repository("o/r")
        with pytest.raises(RepositoryNotFound):
            m.ingest(r, _batch("late"))
        assert m.object_types(r, _all_oids(_batch("late"))) == {}

    def test_large_graph_batch(self) -> None:
        """Thousands of commits in one ingest are all found by one bulk read from a generator."""
        m = self.metadata_store
        r = m.create_repository("o/r")
        commits = [_commit(0)]
        for i in range(1, 3000):
            commits.append(_commit(i, parents=(commits[-1].oid,), generation=i + 1))
        rng = random.Random(1)
        shuffled = commits[:]
        rng.shuffle(shuffled)
        m.ingest(
            r,
            IngestBatch(objects=[(c.oid, ObjectType.COMMIT) for c in shuffled], commits=shuffled),
        )
        got = m.get_commits(r, (c.oid for c in commits))
        assert got == {c.oid: c for c in commits}
        assert len(m.object_types(r, [c.oid for c in commits])) == 3000

    # -- users, tokens, keys, permissions -----------------------------------

    def test_users(self) -> None:
        """Users are created once, read back, and listed sorted by name."""
        m = self.metadata_store
        assert m.create_user("zoe") == User("zoe")
        assert m.create_user("adam", is_admin=True) == User("adam", is_admin=True)
        with pytest.raises(UserExists):
            m.create_user("zoe", is_admin=True)
        assert m.get_user("zoe") == User("zoe")
        assert m.get_user("nobody") is None
        assert m.list_users() == [User("adam", is_admin=True), User("zoe")]

    def test_tokens(self) -> None:
        """A token hash maps to its user; unknown hashes and unknown users are refused."""
        m = self.metadata_store
        m.create_user("u")
        m.create_user("v")
        h1 = hashlib.sha256(b"secret-1").digest()
        h2 = hashlib.sha256(b"secret-2").digest()
        m.add_token("u", h1)
        m.add_token("v", h2)
        assert m.user_for_token(h1) == User("u")
        assert m.user_for_token(h2) == User("v")
        assert m.user_for_token(hashlib.sha256(b"guess").digest()) is None
        with pytest.raises(UserNotFound):
            m.add_token("ghost", hashlib.sha256(b"x").digest())

    def test_ssh_keys(self) -> None:
        """Keys are registered per user, listed, looked up by fingerprint and removed by their owner."""
        m = self.metadata_store
        m.create_user("u")
        m.create_user("v")
        k1 = SSHKey(
            user="u",
            fingerprint="SHA256:bbb",
            blob=b"\x00\x00\x00\x0bssh-ed25519",
            comment="laptop",
        )
        k2 = SSHKey(user="u", fingerprint="SHA256:aaa", blob=b"blob-2")
        k3 = SSHKey(user="v", fingerprint="SHA256:ccc", blob=b"blob-3", comment="ci")
        for k in (k1, k2, k3):
            m.add_ssh_key(k)
        assert sorted(m.list_ssh_keys("u"), key=lambda k: k.fingerprint) == [k2, k1]
        assert m.list_ssh_keys("v") == [k3]
        assert m.list_ssh_keys("nobody") == []
        assert m.user_for_ssh_key("SHA256:bbb") == User("u")
        assert m.user_for_ssh_key("SHA256:zzz") is None
        # Only the owner's name removes a key.
        assert m.remove_ssh_key("v", "SHA256:bbb") is False
        assert m.user_for_ssh_key("SHA256:bbb") == User("u")
        assert m.remove_ssh_key("u", "SHA256:bbb") is True
        assert m.remove_ssh_key("u", "SHA256:bbb") is False
        assert m.user_for_ssh_key("SHA256:bbb") is None
        assert m.list_ssh_keys("u") == [k2]

    def test_ssh_key_errors(self) -> None:
        """A fingerprint registered to anyone is refused with KeyExists; unknown users with UserNotFound."""
        m = self.metadata_store
        m.create_user("u")
        m.create_user("v")
        m.add_ssh_key(SSHKey(user="u", fingerprint="SHA256:k", blob=b"b"))
        with pytest.raises(KeyExists):
            m.add_ssh_key(SSHKey(user="v", fingerprint="SHA256:k", blob=b"b"))
        with pytest.raises(KeyExists):
            m.add_ssh_key(SSHKey(user="u", fingerprint="SHA256:k", blob=b"b"))
        with pytest.raises(UserNotFound):
            m.add_ssh_key(SSHKey(user="ghost", fingerprint="SHA256:g", blob=b"b"))
        assert m.list_ssh_keys("v") == []
        assert m.user_for_ssh_key("SHA256:g") is None

    def test_permissions(self) -> None:
        """Grants are per user and repository, can be changed and revoked."""
        m = self.metadata_store
        m.create_user("u")
        m.create_user("v")
        m.create_repository("o/a")
        m.create_repository("o/b")
        assert m.get_permission("u", "o/a") is None
        m.grant("u", "o/a", Permission.READ)
        assert m.get_permission("u", "o/a") is Permission.READ
        assert m.get_permission("u", "o/b") is None
        assert m.get_permission("v", "o/a") is None
        m.grant("u", "o/a", Permission.ADMIN)
        assert m.get_permission("u", "o/a") is Permission.ADMIN
        m.grant("u", "o/a", None)
        assert m.get_permission("u", "o/a") is None
        m.grant("u", "o/a", None)  # revoking what is not granted is harmless
        assert m.get_permission("nobody", "o/a") is None

    def test_grant_needs_user_and_repository(self) -> None:
        """Granting to an unknown user or on an unknown repository raises and records nothing."""
        m = self.metadata_store
        m.create_user("u")
        m.create_repository("o/a")
        with pytest.raises(UserNotFound):
            m.grant("ghost", "o/a", Permission.READ)
        with pytest.raises(RepositoryNotFound):
            m.grant("u", "o/missing", Permission.READ)
        assert m.get_permission("ghost", "o/a") is None
        assert m.get_permission("u", "o/missing") is None

    # -- durability ---------------------------------------------------------

    def test_persists_across_reopen(self) -> None:
        """Repositories, refs, HEAD, version, graph, users, tokens, keys and grants survive reopening."""
        m = self.metadata_store
        r = m.create_repository("o/r", public=True)
        batch = _batch("durable")
        m.ingest(r, batch)
        snap = m.update_refs(r, [RefUpdate(b"refs/heads/main", None, self.A)])
        m.set_head(r, b"refs/heads/main")
        snap = m.get_refs(r)
        m.create_user("u", is_admin=True)
        token = hashlib.sha256(b"t").digest()
        m.add_token("u", token)
        key = SSHKey(user="u", fingerprint="SHA256:k", blob=b"blob", comment="c")
        m.add_ssh_key(key)
        m.grant("u", "o/r", Permission.WRITE)
        record = m.get_repository("o/r")
        gone = m.create_repository("o/gone")
        m.delete_repository("o/gone")

        m = self.reopen_metadata_store(m)
        assert m.get_repository("o/r") == record
        assert m.get_refs(r) == snap
        oids = _all_oids(batch)
        assert m.object_types(r, oids) == dict(batch.objects)
        assert m.get_commits(r, oids) == {c.oid: c for c in batch.commits}
        assert m.get_trees(r, oids) == dict(batch.trees)
        assert m.get_tags(r, oids) == {t.oid: t for t in batch.tags}
        assert m.get_user("u") == User("u", is_admin=True)
        assert m.user_for_token(token) == User("u", is_admin=True)
        assert m.list_ssh_keys("u") == [key]
        assert m.get_permission("u", "o/r") is Permission.WRITE
        # Ids keep counting across a reopen: a new repository never reuses a
        # deleted one's id, so stale values cannot reach its records.
        assert m.create_repository("o/s").id not in (r.id, gone.id)
