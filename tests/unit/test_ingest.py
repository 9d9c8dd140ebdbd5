"""The push pipeline: index, fsck, connectivity, object writes, graph and ref compare-and-swap.

Packs come from the real ``git pack-objects`` (thin ones with ``--thin``)
or are crafted byte by byte; the stores are the real LMDB ones.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import zlib
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import pytest
from dulwich.pack import create_delta

from gitstratum.core.limits import Limits
from gitstratum.core.objects import ObjectType, PackReadyObject
from gitstratum.core.oid import ZERO_OID, ObjectID, to_bin
from gitstratum.protocol.ingest import PushProcessor, read_object
from gitstratum.protocol.receive_pack import Command, PushRequest, RefResult, ReportStatus
from gitstratum.storage.interfaces import RefUpdate, Repository
from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
from gitstratum.storage.lmdb_objects import LMDBObjectStore
from gitstratum.testing.fixtures import generation_numbers, git, import_git_repo, make_small_repo

CAPS = frozenset({b"report-status", b"side-band-64k"})


# -- helpers --------------------------------------------------------------------


class Env:
    """Real LMDB stores, one repository, and a bare source repository made with git."""

    def __init__(self, root: str):
        self.root = root
        self.metadata = LMDBMetadataStore(os.path.join(root, "meta"))
        self.objects = LMDBObjectStore(os.path.join(root, "objects"))
        self.repo = self.metadata.create_repository("acme/app")
        self.src = make_small_repo(os.path.join(root, "src.git"))
        self.processor = PushProcessor(self.metadata, self.objects, Limits())
        self.spools: list[BinaryIO] = []

    def spool(self, data: bytes, prefix: bytes = b"") -> BinaryIO:
        """A temporary file holding *data*, positioned after *prefix* (the request bytes)."""
        f = tempfile.TemporaryFile()
        self.spools.append(f)
        f.write(prefix + data)
        f.seek(len(prefix))
        return f

    def close(self) -> None:
        for f in self.spools:
            f.close()
        self.metadata.close()
        self.objects.close()

    def rev(self, name: str) -> ObjectID:
        return ObjectID(git("rev-parse", name, cwd=self.src).strip())

    def refs(self, repo: Repository | None = None) -> dict[bytes, ObjectID]:
        return dict(self.metadata.get_refs(repo or self.repo).refs)

    def members(self, oids: Sequence[ObjectID], repo: Repository | None = None) -> set[ObjectID]:
        return set(self.metadata.object_types(repo or self.repo, oids))

    def push(
        self,
        commands: Sequence[tuple[bytes, bytes, bytes]],
        pack: BinaryIO | None,
        *,
        caps: frozenset[bytes] = CAPS,
        shallow: Sequence[ObjectID] = (),
        repo: Repository | None = None,
        processor: PushProcessor | None = None,
        progress: list[str] | None = None,
    ) -> ReportStatus:
        request = PushRequest(
            tuple(Command(ObjectID(o), ObjectID(n), r) for o, n, r in commands),
            caps,
            shallow=tuple(shallow),
        )
        return (processor or self.processor).process(
            repo or self.repo, request, pack, progress.append if progress is not None else None
        )

    def import_main(self) -> None:
        """Make the repository hold the source's history (as an earlier push would have)."""
        import_git_repo(self.src, self.metadata, self.objects, self.repo)

    def all_objects(self) -> list[ObjectID]:
        out = git("cat-file", "--batch-all-objects", "--batch-check=%(objectname)", cwd=self.src)
        return [ObjectID(line) for line in out.split()]


@pytest.fixture
def env(tmp_path) -> Iterator[Env]:
    e = Env(str(tmp_path))
    yield e
    e.close()


def git_pack(src: str, revs: Sequence[str], *, thin: bool = False) -> bytes:
    args = ["pack-objects", "--stdout", "--revs"] + (["--thin"] if thin else [])
    return git(*args, cwd=src, input="".join(r + "\n" for r in revs).encode())


def objects_pack(src: str, oids: Sequence[bytes]) -> bytes:
    """A pack of exactly the listed objects."""
    return git("pack-objects", "--stdout", cwd=src, input=b"".join(o + b"\n" for o in oids))


def write_object(src: str, type: str, raw: bytes) -> ObjectID:
    """Write an object verbatim, bypassing git's own checks (so bad objects can be made)."""
    return ObjectID(
        git("hash-object", "-t", type, "--literally", "-w", "--stdin", cwd=src, input=raw).strip()
    )


def tree_entry(mode: bytes, name: bytes, oid: bytes) -> bytes:
    return mode + b" " + name + b"\0" + to_bin(ObjectID(oid))


def commit_raw(
    tree: bytes, parents: Sequence[bytes] = (), when: bytes = b"1700000000 +0000"
) -> bytes:
    lines = [b"tree " + tree] + [b"parent " + p for p in parents]
    lines += [b"author A <a@example.com> " + when, b"committer C <c@example.com> " + when]
    return b"\n".join(lines) + b"\n\nmessage\n"


def object_id(type: bytes, raw: bytes) -> ObjectID:
    return ObjectID(hashlib.sha1(b"%s %d\0" % (type, len(raw)) + raw).hexdigest().encode())


def entry_header(kind: int, size: int) -> bytes:
    out = bytearray()
    c = (kind << 4) | (size & 15)
    size >>= 4
    while size:
        out.append(c | 0x80)
        c = size & 0x7F
        size >>= 7
    out.append(c)
    return bytes(out)


def whole(kind: int, raw: bytes) -> bytes:
    return entry_header(kind, len(raw)) + zlib.compress(raw)


def ref_delta(base: bytes, delta: bytes) -> bytes:
    return entry_header(7, len(delta)) + to_bin(ObjectID(base)) + zlib.compress(delta)


def raw_pack(entries: Sequence[bytes]) -> bytes:
    body = b"PACK" + struct.pack(">LL", 2, len(entries)) + b"".join(entries)
    return body + hashlib.sha1(body).digest()


def grow(work: str) -> None:
    """Commit a change to the big binary file of a clone, which git sends as a delta."""
    path = os.path.join(work, "assets", "blob.bin")
    with open(path, "ab") as f:
        f.write(b"appended bytes\n")
    git("commit", "--quiet", "-am", "grow the blob", cwd=work)


def assert_nothing_visible(
    env: Env, before: dict[bytes, ObjectID], new: Sequence[ObjectID]
) -> None:
    assert env.refs() == before
    assert env.members(new) == set()


# -- read_object ------------------------------------------------------------------


def test_read_object_follows_delta_chains(env):
    """read_object rebuilds a body from a chain of stored deltas and reports its depth."""
    base = b"base content\n" * 20
    mid = base + b"more\n"
    top = mid.replace(b"base", b"BASE", 3)
    ids = [object_id(b"blob", body) for body in (base, mid, top)]
    d1 = b"".join(create_delta(base, mid))
    d2 = b"".join(create_delta(mid, top))
    env.objects.put_many(
        [
            PackReadyObject(ids[0], ObjectType.BLOB, len(base), len(base), zlib.compress(base)),
            PackReadyObject(
                ids[1], ObjectType.BLOB, len(mid), len(d1), zlib.compress(d1), ids[0], 1
            ),
            PackReadyObject(
                ids[2], ObjectType.BLOB, len(top), len(d2), zlib.compress(d2), ids[1], 2
            ),
        ]
    )
    assert read_object(env.objects, ids[0]) == (ObjectType.BLOB, base, 0)
    assert read_object(env.objects, ids[2]) == (ObjectType.BLOB, top, 2)
    assert read_object(env.objects, ObjectID(b"1" * 40)) is None
    env.objects.delete_many([ids[0]])
    assert read_object(env.objects, ids[2]) is None


def test_read_object_refuses_a_looping_chain(env):
    """A corrupt store whose delta chain loops gives None rather than spinning forever."""
    a, b = ObjectID(b"a" * 40), ObjectID(b"b" * 40)
    d = zlib.compress(b"\x01\x01\x01x")
    env.objects.put_many(
        [
            PackReadyObject(a, ObjectType.BLOB, 1, 4, d, b, 1),
            PackReadyObject(b, ObjectType.BLOB, 1, 4, d, a, 1),
        ]
    )
    assert read_object(env.objects, a) is None


# -- a clean push ---------------------------------------------------------------------


def test_push_to_empty_repository_stores_everything(env):
    """A full pack creates the refs, stores every object readable, and records the graph."""
    main, feature, tag = env.rev("main"), env.rev("feature"), env.rev("v1.0")
    pack = git_pack(env.src, ["main", "feature", "v1.0"])
    progress: list[str] = []
    report = env.push(
        [
            (ZERO_OID, main, b"refs/heads/main"),
            (ZERO_OID, feature, b"refs/heads/feature"),
            (ZERO_OID, tag, b"refs/tags/v1.0"),
        ],
        env.spool(pack, prefix=b"request bytes before the pack"),
        progress=progress,
    )
    assert report.ok, report
    assert env.refs() == {
        b"refs/heads/main": main,
        b"refs/heads/feature": feature,
        b"refs/tags/v1.0": tag,
    }
    everything = env.all_objects()
    types = env.metadata.object_types(env.repo, everything)
    assert set(types) == set(everything)
    for oid in everything:
        kind = git("cat-file", "-t", oid.decode(), cwd=env.src).strip().decode()
        body = git("cat-file", kind, oid.decode(), cwd=env.src)
        assert read_object(env.objects, oid)[:2] == (ObjectType.from_name(kind.encode()), body)
    parents = {
        ObjectID(line.split()[0]): tuple(ObjectID(p) for p in line.split()[1:])
        for line in git("rev-list", "--parents", "--all", cwd=env.src).splitlines()
    }
    commits = env.metadata.get_commits(env.repo, parents)
    expected = generation_numbers(parents)
    assert {o: c.generation for o, c in commits.items()} == expected
    assert commits[main].tree == env.rev("main^{tree}") and commits[main].parents == parents[main]
    assert env.metadata.get_tags(env.repo, [tag])[tag].target == main
    trees = env.metadata.get_trees(env.repo, [env.rev("main^{tree}")])
    assert trees[env.rev("main^{tree}")] == git("cat-file", "tree", "main^{tree}", cwd=env.src)
    assert any(p.startswith("Resolving deltas") for p in progress)


def test_generation_numbers_build_on_the_repository_graph(env):
    """Parents already in the repository lend their generation to pushed children."""
    env.import_main()
    base = env.metadata.get_commits(env.repo, [env.rev("main")])[env.rev("main")].generation
    child = write_object(env.src, "commit", commit_raw(env.rev("main^{tree}"), [env.rev("main")]))
    report = env.push(
        [(env.rev("main"), child, b"refs/heads/main")], env.spool(objects_pack(env.src, [child]))
    )
    assert report.ok, report
    assert env.metadata.get_commits(env.repo, [child])[child].generation == base + 1


def test_incremental_thin_pack_uses_this_repositorys_bases(env):
    """A thin pack whose deltas rest on objects the repository holds is completed from the store."""
    work = os.path.join(env.root, "work")
    git("clone", "--quiet", env.src, work)
    env.import_main()
    old = env.rev("main")
    grow(work)
    new = ObjectID(git("rev-parse", "HEAD", cwd=work).strip())
    pack = git_pack(work, [new.decode(), "^" + old.decode()], thin=True)
    # The pack really is thin: git itself cannot index it without fixing it.
    with pytest.raises(subprocess.CalledProcessError):
        git("index-pack", "--stdin", cwd=work, input=pack)
    report = env.push([(old, new, b"refs/heads/main")], env.spool(pack))
    assert report.ok, report
    assert env.refs()[b"refs/heads/main"] == new
    blob = git("rev-parse", "HEAD:assets/blob.bin", cwd=work).strip()
    assert read_object(env.objects, ObjectID(blob))[1] == git(
        "cat-file", "blob", blob.decode(), cwd=work
    )


def test_thin_base_from_another_repository_is_refused(env):
    """Objects that only another repository holds cannot complete a thin pack."""
    env.import_main()
    other = env.metadata.create_repository("acme/other")
    work = os.path.join(env.root, "work")
    git("clone", "--quiet", env.src, work)
    grow(work)
    new = ObjectID(git("rev-parse", "HEAD", cwd=work).strip())
    pack = git_pack(work, [new.decode(), "^" + env.rev("main").decode()], thin=True)
    report = env.push([(ZERO_OID, new, b"refs/heads/main")], env.spool(pack), repo=other)
    assert report.unpack_error is not None and "unresolved" in report.unpack_error
    assert [r.error for r in report.results] == ["unpacker error"]
    assert env.refs(other) == {} and env.members([new], other) == set()


def test_existing_commit_to_new_branch_with_empty_pack(env):
    """A branch created at a commit the repository holds needs only an empty pack."""
    env.import_main()
    report = env.push([(ZERO_OID, env.rev("main~1"), b"refs/heads/older")], env.spool(raw_pack([])))
    assert report.ok, report
    assert env.refs()[b"refs/heads/older"] == env.rev("main~1")


def test_unreachable_pack_objects_are_stored_but_not_members(env):
    """Only what an accepted ref reaches becomes a member; stray pack objects do not."""
    env.import_main()
    stray = write_object(env.src, "blob", b"nobody points at me\n")
    child = write_object(env.src, "commit", commit_raw(env.rev("main^{tree}"), [env.rev("main")]))
    report = env.push(
        [(env.rev("main"), child, b"refs/heads/main")],
        env.spool(objects_pack(env.src, [child, stray])),
    )
    assert report.ok, report
    assert env.members([child, stray]) == {child}
    assert env.objects.contains([stray]) == {stray}


def test_membership_is_per_repository(env):
    """A push to one repository makes nothing a member of another."""
    other = env.metadata.create_repository("acme/other")
    main = env.rev("main")
    assert env.push(
        [(ZERO_OID, main, b"refs/heads/main")], env.spool(git_pack(env.src, ["main"]))
    ).ok
    assert env.members([main]) == {main}
    assert env.members([main], other) == set()


# -- pack failures ------------------------------------------------------------------------


def unpack_fails(env: Env, pack: bytes | None, limits: Limits | None = None) -> ReportStatus:
    """Push *pack* as main and check the whole push failed at unpack with nothing visible."""
    main = env.rev("main")
    before = env.refs()
    processor = PushProcessor(env.metadata, env.objects, limits or Limits())
    report = env.push(
        [(ZERO_OID, main, b"refs/heads/main"), (ZERO_OID, main, b"refs/heads/other")],
        None if pack is None else env.spool(pack),
        processor=processor,
    )
    assert report.unpack_error
    assert [r.error for r in report.results] == ["unpacker error", "unpacker error"]
    assert_nothing_visible(env, before, [main])
    return report


def test_corrupt_pack(env):
    """A flipped byte fails the checksum or the inflate; nothing changes."""
    pack = bytearray(git_pack(env.src, ["main"]))
    pack[len(pack) // 2] ^= 0xFF
    unpack_fails(env, bytes(pack))


def test_truncated_pack(env):
    """A pack cut short is refused."""
    report = unpack_fails(env, git_pack(env.src, ["main"])[:-30])
    assert report.unpack_error


@pytest.mark.parametrize("stream", [False, True])
def test_no_pack_bytes_is_an_empty_pack(env, stream):
    """A request that sends no pack at all is answered per ref, as if the pack were empty."""
    env.import_main()
    before = env.refs()
    main, new = env.rev("main"), ObjectID(b"1" * 40)
    report = env.push(
        [
            (ZERO_OID, main, b"refs/heads/present"),
            (ZERO_OID, new, b"refs/heads/absent"),
            (ZERO_OID, main, b"refs/heads/bad..name"),
        ],
        env.spool(b"") if stream else None,
    )
    assert report.unpack_error is None
    assert [r.error for r in report.results] == [None, "missing necessary objects", "funny refname"]
    assert env.refs() == {**before, b"refs/heads/present": main}


def test_oversized_pack_and_object(env):
    """The pack size and the inflated object size limits both reject the push."""
    pack = git_pack(env.src, ["main"])
    report = unpack_fails(env, pack, Limits(max_pack_bytes=len(pack) - 1))
    assert "maximum allowed size" in report.unpack_error
    report = unpack_fails(env, pack, Limits(max_object_bytes=100))
    assert "limit" in report.unpack_error


def test_delta_missing_base(env):
    """A delta on a base neither in the pack nor in the repository is refused."""
    target = b"hello world\n"
    delta = b"".join(create_delta(b"hello\n", target))
    report = unpack_fails(env, raw_pack([ref_delta(b"1" * 40, delta)]))
    assert "unresolved" in report.unpack_error


def test_delta_cycle(env):
    """Deltas based on each other are refused as a delta cycle."""
    a_body, b_body = b"first body\n", b"second body\n"
    a_id, b_id = object_id(b"blob", a_body), object_id(b"blob", b_body)
    # Insert-only deltas: each rebuilds its body without reading the base it names.
    insert = lambda body: bytes([len(b_body), len(body), len(body)]) + body  # noqa: E731
    report = unpack_fails(
        env, raw_pack([ref_delta(b_id, insert(a_body)), ref_delta(a_id, insert(b_body))])
    )
    assert "cycle" in report.unpack_error


def test_ofs_delta_on_itself(env):
    """An OFS_DELTA whose base offset is its own start is refused."""
    entry = entry_header(6, 4) + b"\x00" + zlib.compress(b"\x01\x01\x01x")
    unpack_fails(env, raw_pack([entry]))


# -- fsck ----------------------------------------------------------------------------------


def fsck_push(env: Env, objects: Sequence[tuple[int, bytes]], tip: ObjectID) -> ReportStatus:
    before = env.refs()
    report = env.push(
        [(ZERO_OID, tip, b"refs/heads/main")],
        env.spool(raw_pack([whole(k, raw) for k, raw in objects])),
    )
    assert report.unpack_error is not None
    assert [r.error for r in report.results] == ["unpacker error"]
    assert_nothing_visible(env, before, [tip])
    return report


def test_fsck_tree_with_dotgit(env):
    """A tree holding ".git" is refused with git's hasDotgit."""
    blob = b"[core]\n"
    tree = tree_entry(b"100644", b".GIT", object_id(b"blob", blob))
    commit = commit_raw(object_id(b"tree", tree))
    tip = object_id(b"commit", commit)
    report = fsck_push(env, [(1, commit), (2, tree), (3, blob)], tip)
    assert (
        "hasDotgit" in report.unpack_error
        and object_id(b"tree", tree).decode() in report.unpack_error
    )


def test_fsck_commit_with_bad_timezone(env):
    """A commit whose date has a bad time zone is refused with badTimezone."""
    tree = b""
    commit = commit_raw(object_id(b"tree", tree), when=b"1700000000 +05")
    report = fsck_push(env, [(1, commit), (2, tree)], object_id(b"commit", commit))
    assert "badTimezone" in report.unpack_error


@pytest.mark.parametrize(
    ("order", "blob", "msg_id"),
    [
        ("blob first", b'[submodule "x"]\n\tpath = x\n\turl = -u./payload\n', "gitmodulesUrl"),
        (
            "tree first",
            b'[submodule "x"]\n\tpath = -x\n\turl = https://e.com/x\n',
            "gitmodulesPath",
        ),
    ],
)
def test_fsck_hostile_gitmodules(env, order, blob, msg_id):
    """A hostile .gitmodules is caught whether the blob arrives before or after the tree naming it."""
    tree = tree_entry(b"100644", b".gitmodules", object_id(b"blob", blob))
    commit = commit_raw(object_id(b"tree", tree))
    objects = [(1, commit), (2, tree), (3, blob)]
    if order == "blob first":
        objects.reverse()
    report = fsck_push(env, objects, object_id(b"commit", commit))
    assert msg_id in report.unpack_error


def test_fsck_gitmodules_blob_already_stored(env):
    """A blob first pushed under another name is checked when a pushed tree names it .gitmodules."""
    blob = b'[submodule "x"]\n\tpath = x\n\turl = --upload-pack=evil\n'
    blob_id = object_id(b"blob", blob)
    innocent = tree_entry(b"100644", b"notes.txt", blob_id)
    first = commit_raw(object_id(b"tree", innocent))
    first_id = object_id(b"commit", first)
    report = env.push(
        [(ZERO_OID, first_id, b"refs/heads/main")],
        env.spool(raw_pack([whole(1, first), whole(2, innocent), whole(3, blob)])),
    )
    assert report.ok, report
    hostile = tree_entry(b"100644", b".gitmodules", blob_id)
    second = commit_raw(object_id(b"tree", hostile), [first_id])
    report = env.push(
        [(first_id, object_id(b"commit", second), b"refs/heads/main")],
        env.spool(raw_pack([whole(1, second), whole(2, hostile)])),
    )
    assert report.unpack_error is not None and "gitmodulesUrl" in report.unpack_error
    assert env.refs() == {b"refs/heads/main": first_id}


# -- connectivity ------------------------------------------------------------------------------


def test_missing_objects_reject_the_ref_only(env):
    """A ref whose history is not all there is refused; another ref of the push still lands."""
    main = env.rev("main")
    # Objects of main's tip only, without its parents: the history is incomplete.
    pack = git_pack(env.src, ["main", "^main~1"])
    report = env.push([(ZERO_OID, main, b"refs/heads/main")], env.spool(pack))
    assert [r.error for r in report.results] == ["missing necessary objects"]
    assert env.refs() == {} and env.members([main]) == set()
    assert env.objects.contains([main]) == set()


def test_missing_objects_from_shallow_client(env):
    """When the gap is behind a commit the client says is shallow, git's shallow refusal is given."""
    main = env.rev("main")
    pack = git_pack(env.src, ["main", "^main~1"])
    report = env.push([(ZERO_OID, main, b"refs/heads/main")], env.spool(pack), shallow=[main])
    assert [r.error for r in report.results] == ["shallow update not allowed"]
    assert env.refs() == {}


@pytest.mark.parametrize("blob_in_pack", [False, True])
def test_wrong_object_type_in_history_is_missing(env, blob_in_pack):
    """A tree entry naming a blob where a tree should be fails connectivity (pack or repository)."""
    env.import_main()
    body = b"a blob posing as a directory\n"
    blob = object_id(b"blob", body) if blob_in_pack else env.rev("main:README.md")
    tree = tree_entry(b"40000", b"dir", blob)
    commit = commit_raw(object_id(b"tree", tree), [env.rev("main")])
    tip = object_id(b"commit", commit)
    entries = [whole(1, commit), whole(2, tree)] + ([whole(3, body)] if blob_in_pack else [])
    report = env.push([(env.rev("main"), tip, b"refs/heads/main")], env.spool(raw_pack(entries)))
    assert [r.error for r in report.results] == ["missing necessary objects"]
    assert env.refs()[b"refs/heads/main"] == env.rev("main")
    assert env.members([tip, blob]) == ({blob} if not blob_in_pack else set())


def test_submodule_commits_are_not_followed(env):
    """A gitlink names a commit of another repository; connectivity does not look for it."""
    env.import_main()
    tree = tree_entry(b"160000", b"vendor", b"5" * 40)
    commit = commit_raw(object_id(b"tree", tree), [env.rev("main")])
    tip = object_id(b"commit", commit)
    report = env.push(
        [(env.rev("main"), tip, b"refs/heads/main")],
        env.spool(raw_pack([whole(1, commit), whole(2, tree)])),
    )
    assert report.ok, report
    assert env.refs()[b"refs/heads/main"] == tip


def test_non_commit_to_branch_is_refused(env):
    """A blob may be a tag but never a branch, as in git."""
    env.import_main()
    blob = env.rev("main:README.md")
    report = env.push(
        [(ZERO_OID, blob, b"refs/heads/blob"), (ZERO_OID, blob, b"refs/tags/blob")],
        env.spool(raw_pack([])),
    )
    assert [r.error for r in report.results] == ["failed to update ref", None]
    assert any("non-commit object" in m for m in report.messages)
    assert b"refs/heads/blob" not in env.refs() and env.refs()[b"refs/tags/blob"] == blob


# -- commands and refs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref",
    [
        b"refs/heads/bad..name",
        b"HEAD",
        b"main",
        b"refs/heads/x.lock",
        b"refs/heads/a b",
        b"refs/main",
        b"",
    ],
)
def test_funny_refnames_are_refused(env, ref):
    """Ref names git would refuse get "funny refname"; the valid ref of the push lands."""
    main = env.rev("main")
    report = env.push(
        [(ZERO_OID, main, ref), (ZERO_OID, main, b"refs/heads/good")],
        env.spool(git_pack(env.src, ["main"])),
    )
    assert [r.error for r in report.results] == ["funny refname", None]
    assert env.refs() == {b"refs/heads/good": main}
    assert any("funny ref" in m for m in report.messages)


def test_one_level_ref_may_be_deleted_not_created(env):
    """refs/foo cannot be pushed, but deleting one is allowed, as in receive-pack."""
    env.import_main()
    main = env.rev("main")
    env.metadata.update_refs(env.repo, [RefUpdate(b"refs/foo", None, main)])
    report = env.push([(main, ZERO_OID, b"refs/foo")], None)
    assert report.ok and b"refs/foo" not in env.refs()


def test_refused_update_leaves_its_objects_unreachable(env):
    """A push refused for a stale old value makes none of its objects members (so none are served)."""
    main = env.rev("main")
    env.metadata.update_refs(env.repo, [RefUpdate(b"refs/heads/main", None, main)])
    report = env.push(
        [(env.rev("main~1"), env.rev("feature"), b"refs/heads/main")],
        env.spool(git_pack(env.src, ["feature"])),
    )
    assert [r.error for r in report.results] == ["failed to update ref"]
    assert env.members(env.all_objects()) == set()
    assert env.refs() == {b"refs/heads/main": main}


def test_objects_follow_the_update_that_reaches_them(env):
    """When one of two updates sharing history is refused, the shared objects still land with the other."""
    main = env.rev("main")
    report = env.push(
        [(main, main, b"refs/heads/stale"), (ZERO_OID, main, b"refs/heads/ok")],
        env.spool(git_pack(env.src, ["main"])),
    )
    assert [r.error for r in report.results] == ["failed to update ref", None]
    assert main in env.members([main])
    history = git("rev-list", "--objects", "main", cwd=env.src).split()
    oids = [ObjectID(o) for o in history if len(o) == 40]
    assert env.members(oids) == set(oids)


def test_over_long_ref_is_refused_alone(env):
    """A ref name over max_ref_bytes gets its own ng; the rest of the push lands."""
    main = env.rev("main")
    long_ref = b"refs/heads/" + b"x" * 600
    report = env.push(
        [(ZERO_OID, main, b"refs/heads/main"), (ZERO_OID, main, long_ref)],
        env.spool(git_pack(env.src, ["main"])),
    )
    assert [r.error for r in report.results] == [None, "refname too long"]
    assert env.refs() == {b"refs/heads/main": main}


def test_duplicate_refs_are_refused(env):
    """Two commands for one ref are both refused."""
    main = env.rev("main")
    report = env.push(
        [(ZERO_OID, main, b"refs/heads/x"), (ZERO_OID, main, b"refs/heads/x")],
        env.spool(git_pack(env.src, ["main"])),
    )
    assert all(r.error and "multiple updates" in r.error for r in report.results)
    assert env.refs() == {}


def test_stale_old_values(env):
    """A wrong old value fails that ref ("failed to update ref" / "failed to delete"), others land."""
    env.import_main()
    before = env.refs()
    main, feature, older = env.rev("main"), env.rev("feature"), env.rev("main~1")
    report = env.push(
        [
            (older, main, b"refs/heads/feature"),  # feature is not at main~1
            (ZERO_OID, main, b"refs/heads/main"),  # main exists already
            (older, ZERO_OID, b"refs/tags/v1.0"),  # v1.0 is not at main~1
            (main, older, b"refs/heads/main2"),  # main2 does not exist
            (ZERO_OID, older, b"refs/heads/new"),
        ],
        env.spool(raw_pack([])),
    )
    assert [r.error for r in report.results] == [
        "failed to update ref",
        "failed to update ref",
        "failed to delete",
        "failed to update ref",
        None,
    ]
    assert env.refs() == {**before, b"refs/heads/new": older}
    assert env.refs()[b"refs/heads/feature"] == feature


def test_delete_only_push(env):
    """Deleting refs needs no pack; the old value must match."""
    env.import_main()
    report = env.push(
        [
            (env.rev("feature"), ZERO_OID, b"refs/heads/feature"),
            (ZERO_OID, ZERO_OID, b"refs/heads/never"),
        ],
        None,
    )
    assert report.ok, report
    assert b"refs/heads/feature" not in env.refs()


def test_atomic_push_with_one_bad_ref(env):
    """With atomic, one refused ref fails them all: its own reason, the rest "atomic push failure"."""
    main = env.rev("main")
    report = env.push(
        [
            (ZERO_OID, main, b"refs/heads/main"),
            (ZERO_OID, main, b"refs/heads/bad..ref"),
            (ZERO_OID, main, b"refs/tags/t"),
        ],
        env.spool(git_pack(env.src, ["main"])),
        caps=CAPS | {b"atomic"},
    )
    assert [r.error for r in report.results] == [
        "atomic push failure",
        "funny refname",
        "atomic push failure",
    ]
    assert_nothing_visible(env, {}, [main])
    assert env.objects.contains([main]) == set()


def test_atomic_push_with_stale_ref(env):
    """With atomic, a compare-and-swap failure on one ref leaves every ref unchanged."""
    env.import_main()
    before = env.refs()
    main, older = env.rev("main"), env.rev("main~1")
    report = env.push(
        [(older, main, b"refs/heads/feature"), (main, older, b"refs/heads/main")],
        env.spool(raw_pack([])),
        caps=CAPS | {b"atomic"},
    )
    assert [r.error for r in report.results] == ["failed to update ref", "atomic push failure"]
    assert env.refs() == before


def test_atomic_push_success(env):
    """An atomic push with every ref valid lands all of them."""
    main, feature = env.rev("main"), env.rev("feature")
    report = env.push(
        [(ZERO_OID, main, b"refs/heads/main"), (ZERO_OID, feature, b"refs/heads/feature")],
        env.spool(git_pack(env.src, ["main", "feature"])),
        caps=CAPS | {b"atomic"},
    )
    assert report.ok, report
    assert env.refs() == {b"refs/heads/main": main, b"refs/heads/feature": feature}


def test_deleting_the_current_branch_is_refused_and_changes_nothing(env):
    """Deleting HEAD's branch is git's "deletion of the current branch prohibited"; the push's
    other commands still apply, and allow_delete_current lets it through."""
    env.import_main()
    main = env.rev("main")
    before = env.refs()
    report = env.push([(main, ZERO_OID, b"refs/heads/main")], None)
    assert report.results == (
        RefResult(b"refs/heads/main", "deletion of the current branch prohibited"),
    )
    assert report.messages == ("error: refusing to delete the current branch: refs/heads/main",)
    assert env.refs() == before
    # Another branch goes; HEAD's stays, in the same push.
    other = next(
        r for r in before if r not in (b"refs/heads/main",) and r.startswith(b"refs/heads/")
    )
    report = env.push(
        [(main, ZERO_OID, b"refs/heads/main"), (before[other], ZERO_OID, other)], None
    )
    assert report.results[0].error is not None and report.results[1].error is None
    assert b"refs/heads/main" in env.refs() and other not in env.refs()
    allowed = PushProcessor(env.metadata, env.objects, Limits(allow_delete_current=True))
    report = env.push([(main, ZERO_OID, b"refs/heads/main")], None, processor=allowed)
    assert report.ok and b"refs/heads/main" not in env.refs()


def test_directory_file_conflicts(env):
    """refs/heads/a and refs/heads/a/b cannot both exist; deleting one in the same push frees the name."""
    env.import_main()
    main = env.rev("main")
    report = env.push(
        [(ZERO_OID, main, b"refs/heads/main/sub"), (ZERO_OID, main, b"refs/heads")],
        env.spool(raw_pack([])),
    )
    assert report.results[0].error == "failed to update ref"
    assert report.results[1].error == "funny refname"
    env.metadata.set_head(env.repo, b"refs/heads/other")  # main may be deleted: not HEAD's
    report = env.push(
        [(main, ZERO_OID, b"refs/heads/main"), (ZERO_OID, main, b"refs/heads/main/sub")],
        env.spool(raw_pack([])),
    )
    assert report.ok, report
    assert env.refs()[b"refs/heads/main/sub"] == main and b"refs/heads/main" not in env.refs()
    # The other way round: a ref where a directory of refs stands, or two new ones clashing.
    report = env.push(
        [
            (ZERO_OID, main, b"refs/heads/main"),
            (ZERO_OID, main, b"refs/tags/x/y"),
            (ZERO_OID, main, b"refs/tags/x"),
        ],
        env.spool(raw_pack([])),
    )
    assert [r.error for r in report.results] == [
        "failed to update ref",
        "failed to update ref",
        "failed to update ref",
    ]
    assert any("'refs/heads/main/sub' exists" in m for m in report.messages)
    assert b"refs/heads/main" not in env.refs() and b"refs/tags/x" not in env.refs()


@pytest.mark.parametrize(
    ("branches", "head"),
    [
        ([b"refs/heads/dev", b"refs/heads/master"], b"refs/heads/master"),
        ([b"refs/heads/dev", b"refs/heads/feature"], b"refs/heads/dev"),
        ([b"refs/heads/main", b"refs/heads/master"], b"refs/heads/main"),
    ],
)
def test_first_push_points_head_at_a_created_branch(env, branches, head):
    """HEAD moves to main, else master, else the first created branch when its target is unborn."""
    env.metadata.set_head(env.repo, b"refs/heads/trunk")
    main = env.rev("main")
    report = env.push(
        [(ZERO_OID, main, b) for b in branches], env.spool(git_pack(env.src, ["main"]))
    )
    assert report.ok, report
    assert env.metadata.get_refs(env.repo).head == head


def test_head_left_alone_when_its_branch_exists(env):
    """A HEAD that names an existing branch is never moved by a push."""
    main = env.rev("main")
    report = env.push(
        [(ZERO_OID, main, b"refs/heads/master"), (ZERO_OID, main, b"refs/heads/main")],
        env.spool(git_pack(env.src, ["main"])),
    )
    assert report.ok
    assert env.metadata.get_refs(env.repo).head == b"refs/heads/main"


# -- with the real git client --------------------------------------------------------------


SERVER = textwrap.dedent(
    """
    import os, sys, tempfile
    from gitstratum.protocol import receive_pack as rp
    from gitstratum.protocol.ingest import PushProcessor
    from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
    from gitstratum.storage.lmdb_objects import LMDBObjectStore
    root = sys.argv[1]
    metadata = LMDBMetadataStore(os.path.join(root, "meta"))
    objects = LMDBObjectStore(os.path.join(root, "objects"))
    repo = metadata.get_repository("acme/app")
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    out.write(rp.advertise(metadata.get_refs(repo), http=False)); out.flush()
    request, start = rp.receive_request(inp.read1)
    pack = None
    if request.expects_pack:
        pack = tempfile.TemporaryFile()
        pack.write(start)
        while chunk := inp.read1(1 << 20):
            pack.write(chunk)
        pack.seek(0)
    said = []
    report = PushProcessor(metadata, objects).process(repo, request, pack, said.append)
    if request.sideband and not request.quiet:
        out.write(b"".join(rp.progress(m) for m in said))
    out.write(rp.encode_response(request, report)); out.flush()
    """
)


def test_real_git_pushes(env):
    """git push (full, then thin and incremental, then a delete) lands in the stores."""
    root = env.root
    env.metadata.close()
    env.objects.close()
    server = os.path.join(root, "server.py")
    with open(server, "w") as f:
        f.write(SERVER)
    wrapper = os.path.join(root, "receive-pack")
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(wrapper, "w") as f:
        f.write(f"#!/bin/sh\nPYTHONPATH={package_root} exec {sys.executable} {server} {root}\n")
    os.chmod(wrapper, 0o755)
    work = os.path.join(root, "work")
    git("clone", "--quiet", env.src, work)
    git("fetch", "--quiet", "origin", "feature:feature", cwd=work)
    remote = os.path.join(root, "remote")
    os.mkdir(remote)

    def push(*args: str) -> str:
        return git(
            "push", "--porcelain", "--receive-pack", wrapper, remote, *args, cwd=work
        ).decode()

    assert "[new branch]" in push("main", "feature", "v1.0")
    grow(work)
    out = push("main")
    assert "refs/heads/main:refs/heads/main" in out and "Done" in out
    assert "[deleted]" in push(":feature")

    metadata = LMDBMetadataStore(os.path.join(root, "meta"))
    objects = LMDBObjectStore(os.path.join(root, "objects"))
    try:
        repo = metadata.get_repository("acme/app")
        snapshot = metadata.get_refs(repo)
        head = ObjectID(git("rev-parse", "HEAD", cwd=work).strip())
        assert dict(snapshot.refs) == {b"refs/heads/main": head, b"refs/tags/v1.0": env.rev("v1.0")}
        blob = ObjectID(git("rev-parse", "HEAD:assets/blob.bin", cwd=work).strip())
        assert read_object(objects, blob)[1] == git("cat-file", "blob", blob.decode(), cwd=work)
        assert metadata.get_commits(repo, [head])[head].parents == (env.rev("main"),)
    finally:
        metadata.close()
        objects.close()
