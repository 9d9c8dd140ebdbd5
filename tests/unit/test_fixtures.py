"""The shipped test fixtures: the git runner, the small repository and the importer."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from gitstratum.core.objects import ObjectType
from gitstratum.core.oid import ObjectID, oid
from gitstratum.storage.interfaces import RefUpdate, Repository
from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
from gitstratum.storage.lmdb_objects import LMDBObjectStore
from gitstratum.testing.conformance import fake_oid
from gitstratum.testing.fixtures import (
    GitCommandError,
    generation_numbers,
    git,
    import_git_repo,
    make_small_repo,
)

_MAP = 1 << 30


@pytest.fixture
def stores(tmp_path: Any) -> Iterator[tuple[LMDBMetadataStore, LMDBObjectStore, Repository]]:
    metadata = LMDBMetadataStore(str(tmp_path / "metadata"), map_size=_MAP)
    objects = LMDBObjectStore(str(tmp_path / "objects"), map_size=_MAP)
    repo = metadata.create_repository("o/r")
    yield metadata, objects, repo
    metadata.close()
    objects.close()


def _show_ref(path: str) -> dict[bytes, ObjectID]:
    out = git("show-ref", cwd=path)
    return {name: oid(value) for value, name in (line.split(b" ", 1) for line in out.splitlines())}


def _all_objects(path: str) -> dict[ObjectID, ObjectType]:
    out = git(
        "cat-file", "--batch-all-objects", "--batch-check=%(objectname) %(objecttype)", cwd=path
    )
    return {
        oid(value): ObjectType.from_name(kind)
        for value, kind in (line.split(b" ") for line in out.splitlines())
    }


def _git_generations(path: str) -> dict[ObjectID, int]:
    """Generation numbers computed from git's own parent lists, oldest first."""
    out = git("rev-list", "--all", "--topo-order", "--reverse", "--parents", cwd=path)
    gen: dict[ObjectID, int] = {}
    for line in out.splitlines():
        c, *parents = (oid(x) for x in line.split())
        gen[c] = 1 + max((gen[p] for p in parents), default=0)
    return gen


# -- git ----------------------------------------------------------------------


def test_git_returns_stdout(tmp_path: Any) -> None:
    """git() runs the real binary and returns what it printed."""
    assert git("--version").startswith(b"git version ")
    path = str(tmp_path / "r")
    git("init", "--quiet", path)
    assert git("rev-parse", "--git-dir", cwd=path).strip() == b".git"


def test_git_identity_is_fixed() -> None:
    """Author and committer identities and dates are fixed, so commits are reproducible."""
    assert (
        git("var", "GIT_AUTHOR_IDENT").strip() == b"A U Thor <author@example.com> 1700000000 +0000"
    )
    assert (
        git("var", "GIT_COMMITTER_IDENT").strip()
        == b"C O Mitter <committer@example.com> 1700000000 +0000"
    )


def test_git_env_and_input(tmp_path: Any) -> None:
    """Extra environment overrides the defaults, and input reaches git's stdin."""
    ident = git("var", "GIT_AUTHOR_IDENT", env={"GIT_AUTHOR_NAME": "Other"})
    assert ident.startswith(b"Other <author@example.com>")
    path = str(tmp_path / "r")
    git("init", "--quiet", "--bare", path)
    blob = git("hash-object", "-w", "--stdin", cwd=path, input=b"hello\n").strip()
    assert blob == b"ce013625030ba8dba906f756967f9e9ca394464a"


def test_git_failure_carries_stderr(tmp_path: Any) -> None:
    """A failing command raises GitCommandError whose message includes git's complaint."""
    path = str(tmp_path / "r")
    git("init", "--quiet", "--bare", path)
    with pytest.raises(GitCommandError) as e:
        git("rev-parse", "--verify", "no-such-ref", cwd=path)
    assert e.value.returncode != 0
    assert "Needed a single revision" in str(e.value)


# -- make_small_repo ------------------------------------------------------------


def test_small_repo_shape(tmp_path: Any) -> None:
    """The default repository has main, feature, an annotated and a lightweight tag, HEAD at main."""
    path = make_small_repo(str(tmp_path / "r.git"))
    assert git("rev-parse", "--is-bare-repository", cwd=path).strip() == b"true"
    refs = _show_ref(path)
    assert set(refs) == {
        b"refs/heads/main",
        b"refs/heads/feature",
        b"refs/tags/v1.0",
        b"refs/tags/v0.1",
    }
    assert git("symbolic-ref", "HEAD", cwd=path).strip() == b"refs/heads/main"
    assert git("rev-list", "--count", "main", cwd=path).strip() == b"5"
    assert git("cat-file", "-t", "v1.0", cwd=path).strip() == b"tag"
    assert git("rev-parse", "v1.0^{commit}", cwd=path).strip() == refs[b"refs/heads/main"]
    assert git("cat-file", "-t", "v0.1", cwd=path).strip() == b"commit"
    assert git("rev-list", "--count", "main..feature", cwd=path).strip() == b"2"
    merge_base = git("merge-base", "main", "feature", cwd=path).strip()
    assert git("rev-list", "--count", merge_base.decode(), cwd=path).strip() == b"3"
    git("fsck", "--strict", "--no-dangling", cwd=path)


def test_small_repo_tree_variety(tmp_path: Any) -> None:
    """Trees hold nested directories, an executable, a symlink and a binary file; a file is deleted."""
    path = make_small_repo(str(tmp_path / "r.git"))
    entries = {
        line.split(b"\t")[1]: line.split(b" ")[0]
        for line in git("ls-tree", "-r", "main", cwd=path).splitlines()
    }
    assert entries[b"bin/run.sh"] == b"100755"
    assert entries[b"link-to-readme"] == b"120000"
    assert entries[b"src/pkg/deep/data.txt"] == b"100644"
    assert b"assets/blob.bin" in entries
    assert b"src/module_0.py" not in entries
    assert b"src/module_0.py" in git("ls-tree", "-r", "--name-only", "v0.1", cwd=path).split()


def test_small_repo_is_deterministic(tmp_path: Any) -> None:
    """The same arguments give the same object ids, in any directory."""
    a = make_small_repo(str(tmp_path / "a.git"))
    b = make_small_repo(str(tmp_path / "b.git"))
    assert _show_ref(a) == _show_ref(b)
    assert _all_objects(a) == _all_objects(b)


def test_small_repo_options(tmp_path: Any) -> None:
    """commits, branches and tags shape the repository as asked."""
    path = make_small_repo(str(tmp_path / "r.git"), commits=1, branches=False, tags=False)
    assert set(_show_ref(path)) == {b"refs/heads/main"}
    assert git("rev-list", "--count", "main", cwd=path).strip() == b"1"
    path = make_small_repo(str(tmp_path / "big.git"), commits=12, tags=False)
    assert set(_show_ref(path)) == {b"refs/heads/main", b"refs/heads/feature"}
    assert git("rev-list", "--count", "main", cwd=path).strip() == b"12"
    with pytest.raises(ValueError):
        make_small_repo(str(tmp_path / "none.git"), commits=0)


# -- generation numbers ---------------------------------------------------------


def test_generation_numbers() -> None:
    """Roots are 1, every other commit 1 + its highest parent; absent parents count as 0."""
    a, b, c, d, e, shallow = (fake_oid(x) for x in "abcdeS")
    parents = {a: (), b: (a,), c: (b,), d: (a,), e: (d, c), fake_oid("x"): (shallow,)}
    assert generation_numbers(parents) == {a: 1, b: 2, c: 3, d: 2, e: 4, fake_oid("x"): 1}


def test_generation_numbers_long_history() -> None:
    """A history far deeper than the recursion limit is numbered without recursion."""
    chain = [fake_oid(i) for i in range(5000)]
    parents = {c: ((chain[i - 1],) if i else ()) for i, c in enumerate(chain)}
    gen = generation_numbers(dict(reversed(list(parents.items()))))
    assert gen[chain[-1]] == 5000 and gen[chain[0]] == 1


# -- import_git_repo ------------------------------------------------------------


def test_import_copies_every_object(tmp_path: Any, stores: Any) -> None:
    """Every object is stored whole (depth 0) and inflates to a body that hashes to its id."""
    metadata, objects, repo = stores
    path = make_small_repo(str(tmp_path / "r.git"))
    import_git_repo(path, metadata, objects, repo)
    expected = _all_objects(path)
    got = objects.get_many(expected)
    assert set(got) == set(expected)
    for o, record in got.items():
        assert record.type is expected[o]
        assert record.delta_base is None and record.depth == 0
        body = zlib.decompress(record.compressed)
        assert len(body) == record.size == record.data_size
        header = record.type.type_name + b" %d\0" % len(body)
        assert hashlib.sha1(header + body).hexdigest().encode() == o
    assert metadata.object_types(repo, expected) == expected


def test_import_sets_refs_and_head(tmp_path: Any, stores: Any) -> None:
    """The snapshot holds exactly git's refs (tags unpeeled) and HEAD's symref target."""
    metadata, objects, repo = stores
    path = make_small_repo(str(tmp_path / "r.git"))
    git("symbolic-ref", "HEAD", "refs/heads/feature", cwd=path)
    snap = import_git_repo(path, metadata, objects, repo)
    assert dict(snap.refs) == _show_ref(path)
    assert snap.head == b"refs/heads/feature"
    assert snap.head_oid() == _show_ref(path)[b"refs/heads/feature"]
    assert metadata.get_refs(repo) == snap


def test_import_records_graph_trees_and_tags(tmp_path: Any, stores: Any) -> None:
    """Commits carry git's parents, tree, time and generation; trees and tags are recorded."""
    metadata, objects, repo = stores
    path = make_small_repo(str(tmp_path / "r.git"), commits=8)
    import_git_repo(path, metadata, objects, repo)
    everything = _all_objects(path)
    commits = metadata.get_commits(repo, everything)
    assert set(commits) == {o for o, t in everything.items() if t is ObjectType.COMMIT}
    assert {c: info.generation for c, info in commits.items()} == _git_generations(path)
    for c, info in commits.items():
        fields = git("show", "-s", "--format=%T %ct %P", c.decode(), cwd=path).split()
        assert info.tree == fields[0]
        assert info.commit_time == int(fields[1])
        assert info.parents == tuple(fields[2:])
    trees = metadata.get_trees(repo, everything)
    assert set(trees) == {o for o, t in everything.items() if t is ObjectType.TREE}
    for t, body in trees.items():
        assert body == git("cat-file", "tree", t.decode(), cwd=path)
    tags = metadata.get_tags(repo, everything)
    (tag,) = tags.values()
    assert tag.oid == _show_ref(path)[b"refs/tags/v1.0"]
    assert tag.name == b"v1.0" and tag.target_type is ObjectType.COMMIT
    assert tag.target == _show_ref(path)[b"refs/heads/main"]


def test_import_reads_packed_repositories(tmp_path: Any, stores: Any) -> None:
    """A repository whose objects and refs are packed (with deltas) imports the same way."""
    metadata, objects, repo = stores
    path = make_small_repo(str(tmp_path / "r.git"), commits=10)
    git("repack", "-a", "-d", "-q", cwd=path)
    git("pack-refs", "--all", cwd=path)
    assert git("count-objects", "-v", cwd=path).startswith(b"count: 0\n")
    snap = import_git_repo(path, metadata, objects, repo)
    assert dict(snap.refs) == _show_ref(path)
    expected = _all_objects(path)
    assert objects.contains(expected) == set(expected)
    assert metadata.object_types(repo, expected) == expected


def test_import_twice_syncs_refs(tmp_path: Any, stores: Any) -> None:
    """Importing again is idempotent, and makes the refs match the repository once more."""
    metadata, objects, repo = stores
    path = make_small_repo(str(tmp_path / "r.git"))
    first = import_git_repo(path, metadata, objects, repo)
    again = import_git_repo(path, metadata, objects, repo)
    assert again.refs == first.refs and again.version == first.version
    metadata.update_refs(repo, [RefUpdate(b"refs/heads/stray", None, fake_oid("stray"))])
    git("update-ref", "-d", "refs/heads/feature", cwd=path)
    git("update-ref", "refs/heads/main", "main~1", cwd=path)
    synced = import_git_repo(path, metadata, objects, repo)
    assert dict(synced.refs) == _show_ref(path)
    assert b"refs/heads/stray" not in synced.refs
